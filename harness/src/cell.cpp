#include "opensci/harness/cell.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>

#include "opensci/error.hpp"
#include "opensci/harness/backends.hpp"
#include "opensci/harness/compare.hpp"
#include "opensci/harness/diagnosis.hpp"
#include "opensci/parallel/cell_parallel.hpp"

namespace opensci::harness {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// The JSON object in a file; null when the file is missing or not a JSON object.
json read_json(const fs::path& p) {
  std::ifstream in(p);
  if (!in) return json();
  try {
    auto j = json::parse(in);
    return j.is_object() ? j : json();
  } catch (const json::exception&) {
    return json();
  }
}

std::vector<int64_t> read_i64(const SafetensorsFile& f, const std::string& name, int64_t count) {
  auto values = f.read_i64(name);
  if (static_cast<int64_t>(values.size()) != count)
    fail("{}: tensor '{}' has {} elements, expected {} (batch x seq of the logits)", f.path().string(), name,
         values.size(), count);
  return values;
}

// The batch the capture ran, read back from its output (ids, mask and positions as used).
TokenBatch batch_of(const fs::path& output) {
  const SafetensorsFile f(output);
  const auto& logits = f.at("logits");
  if (logits.shape.size() != 3) fail("{}: 'logits' has shape {}, expected [batch, seq, vocab]", output.string(), shape_str(logits.shape));
  TokenBatch t;
  t.batch = logits.shape[0];
  t.seq = logits.shape[1];
  t.input_ids = read_i64(f, "input_ids", t.batch * t.seq);
  t.attention_mask = read_i64(f, "attention_mask", t.batch * t.seq);
  t.position_ids = read_i64(f, "position_ids", t.batch * t.seq);
  return t;
}

void write_result(const fs::path& path, const json& j) {
  fs::create_directories(path.parent_path());
  const auto tmp = path.string() + ".tmp";
  std::ofstream(tmp) << j.dump(2) << "\n";
  fs::rename(tmp, path);
}

}  // namespace

int run_cell(const CellOptions& o) {
  json result = {{"name", o.name},
                 {"labels", o.labels},
                 {"expect", o.expect},
                 {"backend", o.backend},
                 {"precision", o.precision},
                 {"capture_dir", o.capture.string()},
                 {"model_dir", o.model.string()}};
  const auto finish = [&](const std::string& verdict, int code, const std::string& summary) {
    result["verdict"] = verdict;
    result["summary"] = summary;
    write_result(o.result, result);
    fmt::print("{}: {}\n", verdict, summary);
    return code;
  };

  if (fs::exists(o.capture / "SKIPPED")) {
    std::ifstream in(o.capture / "SKIPPED");
    std::string reason((std::istreambuf_iterator<char>(in)), {});
    while (!reason.empty() && reason.back() == '\n') reason.pop_back();
    return finish("not-run", 77, "capture could not run here: " + reason);
  }
  const auto outcome = read_json(o.capture / "outcome.json");
  if (outcome.is_null())
    return finish("fail", 1, fmt::format("no capture outcome at {} (did the capture fixture run?)", (o.capture / "outcome.json").string()));
  auto provenance = read_json(o.capture / "provenance.json");
  if (provenance.is_null()) provenance = json::object();  // a capture that died early has none
  result["capture"] = outcome;
  result["provenance"] = provenance;
  const auto expected_hazard = o.expect.starts_with("xfail:") ? o.expect.substr(6) : std::string();

  Diagnosis diagnosis;
  bool passed = false;
  std::string summary;
  const Checkpoint ck(o.model);
  const auto status = outcome.value("status", std::string("missing"));
  if (status != "ok") {
    summary = fmt::format("capture {}: {}", status, outcome.value("detail", std::string()));
    if (outcome.contains("error") && outcome["error"].is_object()) {
      const auto& e = outcome["error"];
      if (auto f = diagnose_error(e.value("stage", ""), e.value("type", ""), e.value("message", "")))
        diagnosis.findings.push_back(*f);
    }
  } else {
    const auto tol = load_tolerance(o.tolerance_file, o.tolerance);
    const auto output = o.capture / "output.safetensors";
    const auto tokens = batch_of(output);
    // sp/ep cells: the sharded reference on real ranks, checked against the unsharded one first.
    const auto sharded = parallel::run_parallel_reference(o, ck, tokens, result);
    if (sharded.status == parallel::ParallelReference::Status::NotRun) return finish("not-run", 77, sharded.summary);
    if (sharded.status == parallel::ParallelReference::Status::Failed) return finish("fail", 1, sharded.summary);
    const auto ref = sharded.status == parallel::ParallelReference::Status::Ok
                         ? sharded.reference
                         : run_reference(o.backend, ck, tokens, o.precision, true);
    const auto ref_path = fs::path(o.result).replace_extension(".reference.safetensors");
    fs::create_directories(ref_path.parent_path());
    write_forward_result(ref, tokens, ref_path, {{"producer", "opensci-compat reference"}, {"backend", o.backend}, {"precision", o.precision}});
    const auto cmp = compare_outputs(output, ref_path, tol);
    fmt::print("{}", format_comparison(cmp, tol));
    result["comparison"] = to_json(cmp, tol);
    result["reference_output"] = ref_path.string();
    passed = cmp.passed();
    for (auto& f : diagnose_loaded_weights(ck, o.capture / "state_dict.safetensors", outcome.value("dtype", std::string("float32"))))
      diagnosis.findings.push_back(f);
    for (auto& f : diagnose_comparison(cmp, tol, ck.config(), provenance, outcome.value("dtype", std::string("float32"))))
      diagnosis.findings.push_back(f);
    // Torch numerics vs modeling code: the same forward through ATen ops from C++ (no
    // transformers, no remote code). If it matches the reference, the fault is in the modeling code.
    const auto backends = available_backends();
    if (!passed && o.backend != "libtorch" && std::find(backends.begin(), backends.end(), "libtorch") != backends.end()) {
      const auto lt = run_reference("libtorch", ck, tokens, "fp32", false);
      const auto lt_path = fs::path(o.result).replace_extension(".libtorch.safetensors");
      write_forward_result(lt, tokens, lt_path, {{"producer", "opensci-compat libtorch backend"}});
      const auto lt_cmp = compare_outputs(lt_path, ref_path, tol);
      result["libtorch_vs_reference"] = to_json(lt_cmp, tol);
      diagnosis.findings.push_back(
          lt_cmp.passed()
              ? Finding{"", "torch numerics agree with the reference: the fault is in the modeling code",
                        fmt::format("the same forward through libtorch (ATen ops, no transformers) is within tolerance "
                                    "of the reference (max|Δlogit| {:.2e}), transformers is not",
                                    lt_cmp.max_abs)}
              : Finding{"", "libtorch differs from the reference too: torch numerics, not only modeling code",
                        fmt::format("libtorch vs reference max|Δlogit| {:.2e}", lt_cmp.max_abs)});
    }
    summary = passed ? fmt::format("max|Δlogit| {:.2e} <= {:.0e}, top-1 {:.3f}", cmp.max_abs, tol.logits_max_abs, cmp.top1_agreement)
                     : fmt::format("{}", fmt::join(cmp.failures, "; "));
  }
  result["diagnosis"] = diagnosis.to_json();
  for (const auto& f : diagnosis.findings)
    fmt::print("  diagnosis{}: {} — {}\n", f.hazard.empty() ? "" : " [" + f.hazard + "]", f.title, f.evidence);

  const auto named = diagnosis.hazard();
  if (expected_hazard.empty()) {
    if (passed) return finish("pass", 0, summary);
    return finish("fail", 1, summary + (named ? " — diagnosed " + *named : ""));
  }
  if (passed)
    return finish("xpass", 1,
                  fmt::format("expected to fail with {} but passed ({}): update the matrix's expected outcome", expected_hazard, summary));
  if (named && *named == expected_hazard)
    return finish("xfail", 0, fmt::format("fails as expected with {}: {}", expected_hazard, summary));
  return finish("fail", 1,
                fmt::format("expected failure {} but the evidence says {}: {}", expected_hazard,
                            named ? *named : std::string("no known hazard"), summary));
}

}  // namespace opensci::harness
