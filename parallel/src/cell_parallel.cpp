#include "opensci/parallel/cell_parallel.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cstring>
#include <fstream>

#include "opensci/convert.hpp"
#include "opensci/error.hpp"
#include "opensci/harness/backends.hpp"
#include "opensci/harness/compare.hpp"
#include "opensci/parallel/launcher.hpp"
#include "opensci/safetensors.hpp"

namespace opensci::parallel {
namespace fs = std::filesystem;
using nlohmann::json;

void write_tokens_json(const TokenBatch& t, const fs::path& path) {
  auto rows = [&](const std::vector<int64_t>& v) {
    json m = json::array();
    for (int64_t b = 0; b < t.batch; ++b)
      m.push_back(std::vector<int64_t>(v.begin() + b * t.seq, v.begin() + (b + 1) * t.seq));
    return m;
  };
  fs::create_directories(path.parent_path());
  std::ofstream(path) << json{{"input_ids", rows(t.input_ids)},
                              {"attention_mask", rows(t.attention_mask)},
                              {"position_ids", rows(t.position_ids)}}
                             .dump()
                      << "\n";
}

ForwardResult read_forward_output(const fs::path& path) {
  const SafetensorsFile f(path);
  const auto& logits = f.at("logits");
  if (logits.shape.size() != 3) fail("{}: 'logits' has shape {}, expected [batch, seq, vocab]", path.string(), shape_str(logits.shape));
  ForwardResult r;
  r.batch = logits.shape[0];
  r.seq = logits.shape[1];
  r.vocab = logits.shape[2];
  r.logits = f.read_f32("logits");
  for (const auto& t : f.tensors()) {
    if (t.name == "logits" || t.dtype == DType::I64) continue;
    if (t.shape.size() != 3 || t.shape[0] != r.batch || t.shape[1] != r.seq)
      fail("{}: tensor '{}' has shape {}, expected [{}, {}, hidden]", path.string(), t.name, shape_str(t.shape), r.batch, r.seq);
    r.hidden = t.shape[2];
    r.hiddens.emplace_back(t.name, f.read_f32(t.name));
  }
  return r;
}

namespace {

// Bit-for-bit comparison of two forward results: "" when identical, else the first difference.
struct BitDiff {
  int64_t differing = 0, compared = 0;
  std::string first;
};

BitDiff bit_compare(const ForwardResult& a, const ForwardResult& b) {
  BitDiff d;
  auto one = [&](const std::string& name, const std::vector<float>& x, const std::vector<float>& y, int64_t width) {
    if (x.size() != y.size()) {
      d.differing += 1;
      if (d.first.empty()) d.first = fmt::format("'{}' has {} values sharded, {} unsharded", name, x.size(), y.size());
      return;
    }
    for (size_t i = 0; i < x.size(); ++i) {
      ++d.compared;
      if (std::memcmp(&x[i], &y[i], sizeof(float)) == 0) continue;
      if (d.differing++ == 0) {
        const auto w = static_cast<size_t>(width), s = static_cast<size_t>(a.seq);
        d.first = fmt::format("'{}'[{}, {}, {}]: sharded {:.9g}, unsharded {:.9g}", name, i / w / s, (i / w) % s, i % w,
                              x[i], y[i]);
      }
    }
  };
  one("logits", a.logits, b.logits, a.vocab);
  std::map<std::string, const std::vector<float>*> theirs;
  for (const auto& [n, v] : b.hiddens) theirs[n] = &v;
  for (const auto& [n, v] : a.hiddens) {
    if (!theirs.count(n)) {
      d.differing += 1;
      if (d.first.empty()) d.first = fmt::format("'{}' is missing from the unsharded reference", n);
      continue;
    }
    one(n, v, *theirs.at(n), a.hidden);
    theirs.erase(n);
  }
  for (const auto& [n, _] : theirs) {
    d.differing += 1;
    if (d.first.empty()) d.first = fmt::format("the sharded forward did not produce '{}'", n);
  }
  return d;
}

std::string layout_label(int sp, int ep) {
  if (sp > 1 && ep > 1) return fmt::format("sp{}xep{}", sp, ep);
  return ep > 1 ? fmt::format("ep{}", ep) : fmt::format("sp{}", sp);
}

}  // namespace

ParallelReference run_parallel_reference(const harness::CellOptions& o, const Checkpoint& ck, const TokenBatch& tokens,
                                         json& result) {
  ParallelReference out;
  if (o.sp * o.ep <= 1) return out;
  const auto label = layout_label(o.sp, o.ep);
  json par = {{"sp", o.sp}, {"ep", o.ep}, {"ranks", o.sp * o.ep}, {"layout", label}};
  const auto done = [&](ParallelReference::Status s, std::string summary) {
    out.status = s;
    out.summary = std::move(summary);
    par["summary"] = out.summary;
    result["parallel"] = par;
    return out;
  };
  std::string why;
  if (!launcher_available(&why)) return done(ParallelReference::Status::NotRun, label + " needs MPI ranks: " + why);
  if (o.backend != "cpu")
    return done(ParallelReference::Status::NotRun,
                fmt::format("{}: the sharded reference computes on the host (backend cpu); backend '{}' has no sharded "
                            "forward (GPU ranks use the NCCL engine with the host reference, see parallel/README.md)",
                            label, o.backend));
  if (o.ep > 1 && !ck.config().is_moe())
    return done(ParallelReference::Status::Failed,
                fmt::format("{}: ep {} on a dense model (no experts to partition): the matrix names an impossible layout",
                            label, o.ep));

  const auto work = fs::path(o.result).replace_extension(".parallel");
  fs::create_directories(work);
  const auto tokens_file = work / "tokens.json";
  write_tokens_json(tokens, tokens_file);

  // MoE checkpoints stored per expert: every rank reads its block of the converter's fused layout.
  fs::path model = o.model;
  const auto layouts = detect_expert_layouts(ck);
  bool per_expert = false;
  for (int64_t l = 0; l < ck.config().num_layers; ++l)
    per_expert |= ck.config().is_sparse_layer(l) && layouts[static_cast<size_t>(l)] == ExpertLayout::PerExpert;
  if (per_expert) {
    convert::ConvertOptions c;
    c.input = o.model;
    c.output = work / "model-fused";
    c.to = convert::Format::HfFused;
    fs::remove_all(c.output);
    const auto report = convert::convert_checkpoint(c);
    // The remote code and tokenizer files are not tensors: the ranks only need config + tensors.
    par["converted"] = {{"from", report.from}, {"to", report.to}, {"dir", c.output.string()},
                        {"tensors", report.output_tensors}};
    model = c.output;
  }

  LaunchOptions lo;
  lo.program = o.rank_program;
  lo.model = model;
  lo.tokens_file = tokens_file;
  lo.work = work / "job";
  lo.precision = o.precision;
  lo.sp = o.sp;
  lo.ep = o.ep;
  lo.hidden_states = true;
  lo.timeout = std::chrono::seconds(o.parallel_timeout_s);
  // Fault tests (tests/parallel): a rank that crashes, hangs, ... on purpose. Always said aloud.
  if (const char* fault = std::getenv("OPENSCI_PARALLEL_FAULT"); fault && *fault) {
    lo.inject_fault = fault;
    par["injected_fault"] = fault;
    fmt::print("  {}: injecting rank fault '{}' (OPENSCI_PARALLEL_FAULT)\n", label, fault);
  }
  const auto launch = launch_sharded(lo);
  par["launch"] = launch.to_json();
  for (const auto& k : launch.ranks)
    fmt::print("  {} rank {}: {}{}{}\n", label, k.rank, k.state, k.stage.empty() ? "" : " at '" + k.stage + "'",
               k.detail.empty() ? "" : " — " + k.detail);
  if (!launch.ok) {
    for (const auto& k : launch.ranks)
      if (!k.stderr_tail.empty() && k.state != "finished")
        fmt::print("  rank {} stderr:\n    {}\n", k.rank, fmt::format("{}", k.stderr_tail));
    return done(ParallelReference::Status::Failed, fmt::format("sharded reference ({}, {} ranks) failed: {}", label,
                                                               launch.world, launch.summary));
  }
  out.reference = read_forward_output(launch.output);

  // The sharded forward must compute what the unsharded one computes.
  const auto unsharded = harness::run_reference(o.backend, ck, tokens, o.precision, true);
  json vs;
  bool agrees = false;
  std::string disagreement;
  if (o.precision == "fp64") {
    const auto d = bit_compare(out.reference, unsharded);
    vs = {{"rule", "bit-identical (fp64: no reduction crosses ranks)"},
          {"compared", d.compared},
          {"differing", d.differing},
          {"first_difference", d.first}};
    agrees = d.differing == 0;
    disagreement = fmt::format("{} of {} values differ from the unsharded fp64 reference, first {}", d.differing,
                               d.compared, d.first);
    fmt::print("  {} vs sp1/ep1 (fp64): {}\n", label,
               agrees ? fmt::format("bit-identical ({} values)", d.compared) : disagreement);
  } else {
    const auto tol = harness::load_tolerance(o.tolerance_file, "fp32-sharded");
    const auto unsharded_path = work / "unsharded.safetensors";
    write_forward_result(unsharded, tokens, unsharded_path, {{"producer", "opensci-compat reference (unsharded)"}});
    const auto cmp = harness::compare_outputs(launch.output, unsharded_path, tol);
    const auto d = bit_compare(out.reference, unsharded);
    vs = harness::to_json(cmp, tol);
    vs["rule"] = "tolerance fp32-sharded";
    vs["bit_identical"] = d.differing == 0;
    vs["differing"] = d.differing;
    agrees = cmp.passed();
    disagreement = fmt::format("differs from the unsharded fp32 reference beyond fp32-sharded: {}",
                               fmt::format("{}", fmt::join(cmp.failures, "; ")));
    fmt::print("  {} vs sp1/ep1 (fp32): max|Δlogit| {:.2e} ({} values differ in their bits){}\n", label, cmp.max_abs,
               d.differing, agrees ? "" : " — " + disagreement);
  }
  par["vs_unsharded"] = vs;
  if (!agrees)
    return done(ParallelReference::Status::Failed, fmt::format("sharded reference ({}) {}", label, disagreement));
  return done(ParallelReference::Status::Ok,
              fmt::format("{} on {} ranks ({:.2f} s) agrees with sp1/ep1", label, launch.world, launch.wall_seconds));
}

}  // namespace opensci::parallel
