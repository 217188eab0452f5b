#include "opensci/harness/cell.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "opensci/error.hpp"
#include "opensci/harness/backends.hpp"
#include "opensci/harness/compare.hpp"
#include "opensci/harness/diagnosis.hpp"
#include "opensci/harness/hazards.hpp"
#include "opensci/harness/measurements.hpp"
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

void write_result(const fs::path& path, const json& j) {
  if (path.has_parent_path()) fs::create_directories(path.parent_path());
  const auto tmp = path.string() + ".tmp";
  std::ofstream(tmp) << j.dump(2) << "\n";
  fs::rename(tmp, path);
}

// "" when the capture's output holds exactly the cell's batch, else what differs and where.
std::string check_inputs(const fs::path& output, const TokenBatch& cell) {
  const SafetensorsFile f(output);
  const auto& logits = f.at("logits");
  if (logits.shape.size() != 3 || logits.shape[0] != cell.batch || logits.shape[1] != cell.seq)
    return fmt::format("'logits' has shape {}, the cell's batch is [{}, {}, vocab]", shape_str(logits.shape), cell.batch,
                       cell.seq);
  const std::pair<const char*, const std::vector<int64_t>*> tensors[] = {
      {"input_ids", &cell.input_ids}, {"attention_mask", &cell.attention_mask}, {"position_ids", &cell.position_ids}};
  for (const auto& [name, expected] : tensors) {
    if (!f.contains(name)) return fmt::format("the capture has no '{}' tensor", name);
    const auto got = f.read_i64(name);
    if (got.size() != expected->size())
      return fmt::format("'{}' has {} values, the cell's batch {}", name, got.size(), expected->size());
    for (size_t i = 0; i < got.size(); ++i)
      if (got[i] != (*expected)[i])
        return fmt::format("'{}' differs from the cell's batch at [{}, {}]: capture {}, batch {} (the capture ran "
                           "other inputs; its positions are not the ones the cell compares)",
                           name, static_cast<int64_t>(i) / cell.seq, static_cast<int64_t>(i) % cell.seq, got[i],
                           (*expected)[i]);
  }
  return "";
}

std::string json_str(const json& j, const char* key) {
  return j.is_object() && j.contains(key) && j[key].is_string() ? j[key].get<std::string>() : std::string();
}

// The transformers version the environment and the capture report must be the declared one,
// and the two must agree with each other.
std::vector<std::string> version_problems(const std::string& declared, const json& outcome, const json& provenance) {
  std::vector<std::string> out;
  const auto env_version = json_str(outcome.value("environment", json::object()), "transformers");
  const auto ran = json_str(provenance.value("versions", json::object()), "transformers");
  if (!declared.empty() && !env_version.empty() && !version_matches(declared, env_version))
    out.push_back(fmt::format("transformers version: the matrix declares {} for this environment, the environment has "
                              "{} (outcome.json environment.transformers)",
                              declared, env_version));
  if (!declared.empty() && !ran.empty() && !version_matches(declared, ran))
    out.push_back(fmt::format("transformers version: the matrix declares {}, the capture ran {} (provenance.json "
                              "versions.transformers)",
                              declared, ran));
  if (!env_version.empty() && !ran.empty() && env_version != ran)
    out.push_back(fmt::format("transformers version: the environment reports {} but the capture imported {}",
                              env_version, ran));
  return out;
}

std::vector<std::string> sorted(std::vector<std::string> v) {
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  return v;
}

std::string hazard_list(const std::vector<std::string>& h) { return h.empty() ? "no known hazard" : fmt::format("{}", fmt::join(h, ", ")); }

// One capture judged against the reference output: its comparison and diagnosis.
struct Judged {
  bool ok = false;              // capture status ok and inputs are the cell's
  std::string problem;          // why not ok
  Comparison cmp;
  Diagnosis diagnosis;
};

Judged judge_capture(const fs::path& capture, const json& outcome, const json& provenance, const CellOptions& o,
                     const HazardTable& table, const Checkpoint& ck, const TokenBatch& batch, const fs::path& ref_path,
                     const Tolerance& tol) {
  Judged j;
  const auto status = outcome.value("status", std::string("missing"));
  if (status != "ok") {
    j.problem = fmt::format("capture {}: {}", status, outcome.value("detail", std::string()));
    if (outcome.contains("error") && outcome["error"].is_object()) {
      const auto& e = outcome["error"];
      for (auto& f : diagnose_error(table, e.value("stage", ""), e.value("type", ""), e.value("message", ""),
                                    e.value("traceback", "")))
        j.diagnosis.findings.push_back(f);
    }
    return j;
  }
  const auto output = capture / "output.safetensors";
  if (auto p = check_inputs(output, batch); !p.empty()) {
    j.problem = p;
    return j;
  }
  j.cmp = compare_outputs(output, ref_path, tol);
  int64_t tokens = 0;
  for (auto m : batch.attention_mask) tokens += m != 0;
  if (j.cmp.positions != tokens) {
    j.problem = fmt::format("compared {} positions, the cell's batch has {} tokens", j.cmp.positions, tokens);
    return j;
  }
  j.ok = true;
  for (auto& f : diagnose_loaded_weights(table, ck, capture / "state_dict.safetensors", o.dtype))
    j.diagnosis.findings.push_back(f);
  for (auto& f : diagnose_comparison(table, j.cmp, tol, ck.config(), provenance, o.dtype))
    j.diagnosis.findings.push_back(f);
  return j;
}

}  // namespace

bool version_matches(const std::string& declared, const std::string& actual) {
  if (declared.empty() || declared == "latest" || declared == "unknown") return true;
  return actual == declared || actual.starts_with(declared + ".");
}

int run_cell(const CellOptions& o) {
  json result = {{"name", o.name},           {"labels", o.labels},   {"expect", o.expect},
                 {"backend", o.backend},     {"precision", o.precision}, {"capture_dir", o.capture.string()},
                 {"model_dir", o.model.string()}, {"declared_transformers", o.transformers},
                 {"requested_dtype", o.dtype}};
  const auto finish = [&](const std::string& verdict, int code, const std::string& summary) {
    result["verdict"] = verdict;
    result["summary"] = summary;
    write_result(o.result, result);
    print_ctest_measurements(result, o.result);
    fmt::print("{}: {}\n", verdict, summary);
    return code;
  };

  if (fs::exists(o.capture / "SKIPPED")) {
    std::ifstream in(o.capture / "SKIPPED");
    std::string reason((std::istreambuf_iterator<char>(in)), {});
    while (!reason.empty() && reason.back() == '\n') reason.pop_back();
    const auto skipped = read_json(o.capture / "SKIPPED.json");
    result["not_run"] = {{"reason", reason}, {"unreachable", skipped.is_object() && skipped.value("unreachable", false)}};
    return finish("not-run", 77, "capture could not run here: " + reason);
  }
  if (o.tokens_file.empty()) fail("cell {}: --tokens-file is required (the cell owns its inputs)", o.name);
  const auto table = HazardTable::load(o.hazards_file.empty() ? HazardTable::default_file() : o.hazards_file);
  const auto expected_hazard = o.expect.starts_with("xfail:") ? o.expect.substr(6) : std::string();
  const Hazard* expected = expected_hazard.empty() ? nullptr : &table.at(expected_hazard, "cell " + o.name + " --expect");
  if (!expected && o.expect != "pass") fail("cell {}: --expect must be 'pass' or 'xfail:<hazard>', got '{}'", o.name, o.expect);

  const auto outcome = read_json(o.capture / "outcome.json");
  if (outcome.is_null())
    return finish("fail", 1, fmt::format("no capture outcome at {} (did the capture fixture run?)", (o.capture / "outcome.json").string()));
  auto provenance = read_json(o.capture / "provenance.json");
  if (provenance.is_null()) provenance = json::object();  // a capture that died early has none
  result["capture"] = outcome;
  result["provenance"] = provenance;

  // Labels never lie: the versions are the declared ones, whatever the verdict would be.
  if (const auto problems = version_problems(o.transformers, outcome, provenance); !problems.empty())
    return finish("fail", 1, fmt::format("{}", fmt::join(problems, "; ")));

  const TokenBatch batch = TokenBatch::from_json_file(o.tokens_file);
  const Checkpoint ck(o.model);
  batch.validate(ck.config().vocab_size, o.tokens_file.string());
  const auto tol = load_tolerance(o.tolerance_file, o.tolerance);
  // The reference forward, on the cell's batch. sp/ep cells: the sharded reference on real ranks,
  // checked against the unsharded one first (parallel/src/cell_parallel.cpp).
  const auto sharded = parallel::run_parallel_reference(o, ck, batch, result);
  if (sharded.status == parallel::ParallelReference::Status::NotRun) return finish("not-run", 77, sharded.summary);
  if (sharded.status == parallel::ParallelReference::Status::Failed) return finish("fail", 1, sharded.summary);
  const auto ref = sharded.status == parallel::ParallelReference::Status::Ok
                       ? sharded.reference
                       : run_reference(o.backend, ck, batch, o.precision, true, o.reference_defect);
  if (!o.reference_defect.empty()) result["reference_defect"] = o.reference_defect;
  auto ref_path = fs::path(o.result).replace_extension(".reference.safetensors");
  if (ref_path.has_parent_path()) fs::create_directories(ref_path.parent_path());
  write_forward_result(ref, batch, ref_path,
                       {{"producer", "opensci-compat reference"}, {"backend", o.backend}, {"precision", o.precision}});
  result["reference_output"] = ref_path.string();

  Judged j = judge_capture(o.capture, outcome, provenance, o, table, ck, batch, ref_path, tol);
  const bool ran = outcome.value("status", std::string()) == "ok";
  if (ran && !j.ok) {
    // The capture ran, but not what the cell asks: never a pass, never an expected failure.
    result["diagnosis"] = j.diagnosis.to_json();
    return finish("fail", 1, j.problem);
  }
  if (j.ok) {
    fmt::print("{}", format_comparison(j.cmp, tol));
    result["comparison"] = to_json(j.cmp, tol);
    // Torch numerics vs modeling code: the same forward through ATen ops from C++ (no
    // transformers, no remote code). If it matches the reference, the fault is in the modeling code.
    const auto backends = available_backends();
    if (!j.cmp.passed() && o.backend != "libtorch" &&
        std::find(backends.begin(), backends.end(), "libtorch") != backends.end()) {
      const auto lt = run_reference("libtorch", ck, batch, "fp32", false);
      const auto lt_path = fs::path(o.result).replace_extension(".libtorch.safetensors");
      write_forward_result(lt, batch, lt_path, {{"producer", "opensci-compat libtorch backend"}});
      const auto lt_cmp = compare_outputs(lt_path, ref_path, tol);
      result["libtorch_vs_reference"] = to_json(lt_cmp, tol);
      j.diagnosis.findings.push_back(
          lt_cmp.passed()
              ? Finding{"", "torch numerics agree with the reference: the fault is in the modeling code",
                        fmt::format("the same forward through libtorch (ATen ops, no transformers) is within tolerance "
                                    "of the reference (max|Δlogit| {:.2e}), transformers is not",
                                    lt_cmp.max_abs),
                        "note", ""}
              : Finding{"", "libtorch differs from the reference too: torch numerics, not only modeling code",
                        fmt::format("libtorch vs reference max|Δlogit| {:.2e}", lt_cmp.max_abs), "note", ""});
    }
  }
  result["diagnosis"] = j.diagnosis.to_json();
  for (const auto& f : j.diagnosis.findings)
    fmt::print("  diagnosis{}: {} — {}\n", f.hazard.empty() ? "" : fmt::format(" [{}{}]", f.hazard, f.basis == "pattern" ? "?" : ""),
               f.title, f.evidence);

  const auto named = j.diagnosis.hazards();
  const auto named_str = hazard_list(named);
  const bool dtype_wrong = std::find(named.begin(), named.end(), table.hazard_for_evidence("effective_dtype_differs")) != named.end();
  const std::string numbers =
      j.ok ? (j.cmp.passed() ? fmt::format("max|Δlogit| {:.2e} <= {:.0e}, top-1 {:.3f}", j.cmp.max_abs,
                                           tol.logits_max_abs, j.cmp.top1_agreement)
                             : fmt::format("{}", fmt::join(j.cmp.failures, "; ")))
           : j.problem;

  if (!expected) {
    if (j.ok && j.cmp.passed() && !dtype_wrong) return finish("pass", 0, numbers);
    if (j.ok && j.cmp.passed())
      return finish("fail", 1, fmt::format("within tolerance ({}) but in the wrong dtype: the dtype is part of the verdict — {}",
                                           numbers, j.diagnosis.findings.front().evidence));
    return finish("fail", 1, numbers + (named.empty() ? "" : " — diagnosed " + named_str));
  }

  // ---- an expected failure: proven, not guessed ----
  const auto& h = *expected;
  const auto others = [&] {
    std::vector<std::string> v;
    for (const auto& n : named)
      if (n != h.id) v.push_back(n);
    return v;
  }();
  if (j.ok && j.cmp.passed() && !dtype_wrong)
    return finish("xpass", 1,
                  fmt::format("expected to fail with {} but passed ({}): update the matrix's expected outcome", h.id, numbers));
  if (h.kind == "error") {
    if (j.ok)
      return finish("fail", 1, fmt::format("expected {} (an exception: {}), but the capture ran: {}", h.id, h.title, numbers));
    if (outcome.value("status", std::string()) != "error")
      return finish("fail", 1, fmt::format("expected {} (an exception), but the capture did not raise: {}", h.id, j.problem));
    if (std::find(named.begin(), named.end(), h.id) == named.end())
      return finish("fail", 1, fmt::format("expected failure {} but the evidence says {}: {}", h.id, named_str, j.problem));
    if (!others.empty())
      return finish("fail", 1, fmt::format("expected {}, also {}: the exception matches more than one hazard's signature: {}",
                                           h.id, hazard_list(others), j.problem));
    return finish("xfail", 0, fmt::format("fails as expected with {} ({}): {}", h.id, h.title, j.problem));
  }
  // numeric / dtype hazards
  if (!j.ok)
    return finish("fail", 1, fmt::format("expected {} (wrong numbers), but the capture did not produce output: {}{}", h.id,
                                         j.problem, named.empty() ? "" : " — diagnosed " + named_str));
  if (!others.empty())
    return finish("fail", 1, fmt::format("expected {}, also {}: {}", h.id, hazard_list(others), numbers));
  for (const auto& f : j.diagnosis.findings)
    if (f.basis == "evidence" && f.hazard.empty())
      return finish("fail", 1, fmt::format("expected {}, also something no hazard explains ({}: {}): {}", h.id, f.title,
                                           f.evidence, numbers));
  std::string consistency_note;
  for (const auto& check : h.consistent_with) {
    std::string why;
    if (consistent_with(check, j.cmp, tol, why)) continue;
    // Garbage inv_freq large enough to overflow fp32 makes NaN/Inf keys, and those reach position
    // 0 through its masked scores (NaN + mask is NaN): position 0 cannot be compared then. Only
    // with that evidence, a non-finite position 0, and a counterfactual capture that must pass.
    const bool pos0_nonfinite = !j.cmp.per_position_max_abs.empty() && !std::isfinite(j.cmp.per_position_max_abs[0]);
    const bool overflow_evidence = std::any_of(j.diagnosis.findings.begin(), j.diagnosis.findings.end(), [&](const auto& f) {
      return f.basis == "evidence" && f.hazard == h.id && f.detector == "inv_freq_garbage" && f.overflows_fp32;
    });
    if (check == "position0_matches" && pos0_nonfinite && overflow_evidence && h.counterfactual()) {
      consistency_note = "; position 0 is not comparable (non-finite: the garbage inv_freq overflows fp32), so the "
                         "counterfactual decides";
      continue;
    }
    return finish("fail", 1, fmt::format("expected {}, but the failure is not consistent with it ({}): {}", h.id, why, numbers));
  }
  // The capture's own evidence must name the hazard (a numeric pattern only suspects it: an
  // attention-scale or k-norm fault also spares position 0).
  if (std::find(named.begin(), named.end(), h.id) == named.end()) {
    const auto suspects = j.diagnosis.suspects();
    return finish("fail", 1, fmt::format("expected failure {} but the evidence says {}{}: {}", h.id, named_str,
                                         std::find(suspects.begin(), suspects.end(), h.id) != suspects.end()
                                             ? fmt::format(" ({} is only suspected from the numeric pattern; evidence: {})",
                                                           h.id, fmt::join(h.evidence, ", "))
                                             : std::string(),
                                         numbers));
  }
  std::string proof = fmt::format("evidence: {}", [&] {
    for (const auto& f : j.diagnosis.findings)
      if (f.basis == "evidence" && f.hazard == h.id) return f.evidence;
    return std::string();
  }());
  if (h.counterfactual()) {
    const auto fix = fmt::format("{}", fmt::join(h.fix_shims, " + "));
    if (o.counterfactual.empty())
      return finish("fail", 1, fmt::format("expected {}: cannot prove it, no counterfactual capture (the run with {}'s fix {}) "
                                           "was given", h.id, h.id, fix));
    const auto cf_outcome = read_json(o.counterfactual / "outcome.json");
    auto cf_prov = read_json(o.counterfactual / "provenance.json");
    if (cf_prov.is_null()) cf_prov = json::object();
    json cf = {{"capture_dir", o.counterfactual.string()}, {"fix", h.fix_shims}};
    const auto cf_fail = [&](const std::string& why) {
      result["counterfactual"] = cf;
      return finish("fail", 1, fmt::format("expected {} alone, but with {}'s fix ({}) {}", h.id, h.id, fix, why));
    };
    if (cf_outcome.is_null()) return cf_fail(fmt::format("there is no capture outcome at {}", o.counterfactual.string()));
    cf["outcome"] = cf_outcome;
    // It must be the same run plus the fix: same variant + suffix, shims, model, versions, dtype.
    std::vector<std::string> want_shims = o.shims;
    want_shims.insert(want_shims.end(), h.fix_shims.begin(), h.fix_shims.end());
    std::vector<std::string> cf_shims;
    if (cf_outcome.contains("shims") && cf_outcome["shims"].is_array())
      for (const auto& s : cf_outcome["shims"]) cf_shims.push_back(s.get<std::string>());
    const auto want_variant = o.variant + counterfactual_suffix(h.id);
    if (!o.variant.empty() && json_str(cf_outcome, "variant") != want_variant)
      return cf_fail(fmt::format("the counterfactual capture is of variant '{}', expected '{}'", json_str(cf_outcome, "variant"), want_variant));
    if (sorted(cf_shims) != sorted(want_shims))
      return cf_fail(fmt::format("the counterfactual capture applied shims [{}], expected [{}]", fmt::join(cf_shims, ", "),
                                 fmt::join(want_shims, ", ")));
    if (json_str(cf_prov, "model_dir") != json_str(provenance, "model_dir"))
      return cf_fail(fmt::format("the counterfactual capture loaded {}, the cell's capture {}", json_str(cf_prov, "model_dir"),
                                 json_str(provenance, "model_dir")));
    if (json_str(cf_outcome, "dtype") != json_str(outcome, "dtype"))
      return cf_fail(fmt::format("the counterfactual capture ran {}, the cell's capture {}", json_str(cf_outcome, "dtype"),
                                 json_str(outcome, "dtype")));
    if (const auto vp = version_problems(o.transformers, cf_outcome, cf_prov); !vp.empty())
      return cf_fail(fmt::format("{}", fmt::join(vp, "; ")));
    const auto cf_env = cf_outcome.value("environment", json::object());
    const auto env = outcome.value("environment", json::object());
    if (json_str(cf_env, "torch") != json_str(env, "torch") || json_str(cf_env, "transformers") != json_str(env, "transformers"))
      return cf_fail(fmt::format("the counterfactual ran in another environment (torch {} / transformers {}, the cell's "
                                 "capture torch {} / transformers {})", json_str(cf_env, "torch"), json_str(cf_env, "transformers"),
                                 json_str(env, "torch"), json_str(env, "transformers")));
    Judged cj = judge_capture(o.counterfactual, cf_outcome, cf_prov, o, table, ck, batch, ref_path, tol);
    if (cj.ok) cf["comparison"] = to_json(cj.cmp, tol);
    cf["diagnosis"] = cj.diagnosis.to_json();
    if (!cj.ok) return cf_fail(fmt::format("the capture does not run: {}", cj.problem));
    if (!cj.cmp.passed())
      return cf_fail(fmt::format("the capture still fails: {}{}", fmt::join(cj.cmp.failures, "; "),
                                 cj.diagnosis.hazards().empty() ? "" : " — diagnosed " + hazard_list(cj.diagnosis.hazards())));
    if (const auto cf_named = cj.diagnosis.hazards(); !cf_named.empty())
      return cf_fail(fmt::format("the capture passes but the evidence still names {}", hazard_list(cf_named)));
    result["counterfactual"] = cf;
    proof += fmt::format("; proven: with {} the same capture passes (max|Δlogit| {:.2e})", fix, cj.cmp.max_abs);
  }
  return finish("xfail", 0, fmt::format("fails as expected with {} ({}): {}; {}", h.id, h.title, numbers, proof + consistency_note));
}

}  // namespace opensci::harness
