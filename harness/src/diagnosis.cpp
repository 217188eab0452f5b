#include "opensci/harness/diagnosis.hpp"

#include <fmt/format.h>

#include <cmath>
#include <limits>
#include <regex>

#include "opensci/error.hpp"
#include "opensci/ops.hpp"

namespace opensci::harness {
namespace fs = std::filesystem;

namespace {

// A finding named by an evidence detector: the hazard comes from the table.
Finding evidence(const HazardTable& table, const std::string& detector, std::string title, std::string what) {
  return {table.hazard_for_evidence(detector), std::move(title), std::move(what), "evidence", detector};
}

void add_unique(std::vector<std::string>& v, const std::string& s) {
  if (!s.empty() && std::find(v.begin(), v.end(), s) == v.end()) v.push_back(s);
}

}  // namespace

std::vector<std::string> Diagnosis::hazards() const {
  std::vector<std::string> out;
  for (const auto& f : findings)
    if (f.basis == "evidence") add_unique(out, f.hazard);
  return out;
}

std::vector<std::string> Diagnosis::suspects() const {
  const auto confirmed = hazards();
  std::vector<std::string> out;
  for (const auto& f : findings)
    if (f.basis == "pattern" && std::find(confirmed.begin(), confirmed.end(), f.hazard) == confirmed.end())
      add_unique(out, f.hazard);
  return out;
}

std::optional<std::string> Diagnosis::hazard() const {
  const auto h = hazards();
  if (h.empty()) return std::nullopt;
  return h.front();
}

nlohmann::json Diagnosis::to_json() const {
  nlohmann::json j = nlohmann::json::array();
  for (const auto& f : findings)
    j.push_back({{"hazard", f.hazard}, {"title", f.title}, {"evidence", f.evidence}, {"basis", f.basis},
                 {"detector", f.detector}});
  const auto first = hazard();
  return {{"hazard", first ? nlohmann::json(*first) : nlohmann::json()},
          {"hazards", hazards()},
          {"suspects", suspects()},
          {"findings", j}};
}

std::vector<Finding> diagnose_error(const HazardTable& table, const std::string& stage, const std::string& type,
                                    const std::string& message, const std::string& traceback) {
  const auto where = fmt::format("{} during {}: {}", type, stage, message.substr(0, 300));
  std::vector<Finding> out;
  for (const auto& id : table.error_matches(type, message, traceback)) {
    const auto& h = table.at(id, "diagnosis");
    out.push_back({id, h.title, where + fmt::format(" (matches {}'s signature in {})", id, table.file().filename().string()),
                   "evidence", "error_signature"});
  }
  if (out.empty()) out.push_back({"", "exception in the capture process (no hazard signature matches)", where, "note", ""});
  return out;
}

std::vector<Finding> diagnose_loaded_weights(const HazardTable& table, const Checkpoint& ck,
                                             const fs::path& state_dict_path, const std::string& capture_dtype) {
  std::vector<Finding> out;
  if (!fs::exists(state_dict_path)) return out;
  const SafetensorsFile sd(state_dict_path);
  const auto& c = ck.config();
  // bf16 captures round every weight once: half an ulp of bf16 relative to the value.
  const double rel_tol = capture_dtype == "bfloat16" ? 4e-3 : capture_dtype == "float16" ? 5e-4 : 0.0;
  std::vector<std::string> differing;
  double worst = 0;
  for (const auto& name : ck.names()) {
    if (!sd.contains(name)) continue;  // e.g. experts fused by transformers 5.x: checked by the MoE converter cells
    const auto a = ck.file_of(name).read_f64(name);
    const auto& info = sd.at(name);
    if (element_count(info.shape) != static_cast<int64_t>(a.size())) {
      differing.push_back(name);
      continue;
    }
    const auto b = sd.read_f64(name);
    double max_rel = 0;
    for (size_t i = 0; i < a.size(); ++i)
      max_rel = std::max(max_rel, std::abs(a[i] - b[i]) / std::max(std::abs(a[i]), 1e-30));
    if (!(max_rel <= rel_tol)) {
      differing.push_back(name);
      worst = std::max(worst, max_rel);
    }
  }
  if (!differing.empty()) {
    // Init functions reset norm weights to 1 and biases to 0: that pattern is H8's damage. Other
    // differences are real but unexplained (no hazard named).
    const bool init_pattern = std::any_of(differing.begin(), differing.end(), [](const auto& n) {
      return n.find("norm") != std::string::npos || n.ends_with(".bias");
    });
    const auto what = fmt::format("{} tensors differ after loading (worst relative difference {:.3g}), first: {}",
                                  differing.size(), worst, differing.front());
    if (init_pattern)
      out.push_back(evidence(table, "loaded_params_reinitialised", "loaded norm weights / biases differ from the checkpoint", what));
    else
      out.push_back({"", "loaded parameters differ from the checkpoint", what, "evidence", "loaded_params_differ"});
  }
  // Tied embeddings: lm_head must be the embedding matrix after loading.
  if (c.tie_word_embeddings && sd.contains("lm_head.weight") && sd.contains("model.embed_tokens.weight")) {
    const auto head = sd.read_f64("lm_head.weight");
    const auto emb = sd.read_f64("model.embed_tokens.weight");
    if (head != emb)
      out.push_back(evidence(table, "lm_head_untied", "lm_head is not tied to the embeddings",
                             "config ties the embeddings, but the loaded lm_head.weight differs from "
                             "model.embed_tokens.weight (a randomly initialised head)"));
  }
  // RoPE inverse frequencies, when the model keeps them as a buffer.
  const auto expected = ops::rope_inv_freq(c.head_dim, c.rope_theta);
  for (const auto& t : sd.tensors()) {
    if (!t.name.ends_with("inv_freq")) continue;
    const auto got = sd.read_f64(t.name);
    if (got.size() != expected.size()) continue;
    double max_rel = 0;
    size_t overflowing = 0;  // non-finite, or |f| * position > FLT_MAX for a position <= 4096
    for (size_t i = 0; i < got.size(); ++i) {
      const double rel = std::abs(got[i] - expected[i]) / expected[i];
      max_rel = std::isfinite(rel) ? std::max(max_rel, rel) : std::numeric_limits<double>::infinity();
      if (!std::isfinite(got[i]) || std::abs(got[i]) * 4096.0 > std::numeric_limits<float>::max()) ++overflowing;
    }
    if (!(max_rel < 1e-5)) {  // fp32 rounding of 1/theta^(2i/d) is ~6e-8 relative
      // Garbage (zeros, uninitialised memory) vs a smooth, wrong theta: a wrong theta keeps
      // inv_freq[0] = 1 and decays geometrically.
      const bool geometric = std::abs(got[0] - 1.0) < 1e-6 && got.size() > 2 && got[1] > 0 && got[1] < 1 &&
                             std::abs(got[2] / got[1] - got[1]) < 1e-4;
      const auto what =
          fmt::format("{} holds {} (max relative error {:.3g}); expected 1/{}^(2i/{}) = [{:.6g}, {:.6g}, ...]", t.name,
                      got.size() > 2 ? fmt::format("[{:.6g}, {:.6g}, {:.6g}, ...]", got[0], got[1], got[2]) : "?",
                      max_rel, c.rope_theta, c.head_dim, expected[0], expected.size() > 1 ? expected[1] : 0.0);
      if (geometric) {
        out.push_back(evidence(table, "inv_freq_wrong_theta", "RoPE theta differs from the config", what));
      } else {
        auto f = evidence(table, "inv_freq_garbage", "RoPE inv_freq is not initialised",
                          overflowing == 0 ? what
                                           : fmt::format("{}; {} of {} entries non-finite or >= 8.3e34, so position x "
                                                         "inv_freq overflows fp32",
                                                         what, overflowing, got.size()));
        f.overflows_fp32 = overflowing > 0;
        out.push_back(f);
      }
      break;
    }
  }
  return out;
}

std::vector<Finding> diagnose_comparison(const HazardTable& table, const Comparison& cmp, const Tolerance& tol,
                                         const ModelConfig& config, const nlohmann::json& provenance,
                                         const std::string& requested_dtype) {
  std::vector<Finding> out;
  const auto effective = provenance.value("effective_dtype", std::string());
  if (!effective.empty() && effective != requested_dtype)  // "bfloat16+float32" (mixed) is not float32 either
    out.push_back(evidence(table, "effective_dtype_differs", "model ran in another dtype than requested",
                           fmt::format("requested {}, parameters were {} after loading", requested_dtype, effective)));
  if (cmp.passed()) return out;
  if (cmp.nonfinite_a > 0)
    out.push_back({"", "non-finite logits", fmt::format("{} NaN/Inf logits in the candidate", cmp.nonfinite_a), "note", ""});
  // Position pattern: RoPE at position 0 is the identity, so a RoPE fault leaves position 0
  // exact. So does an attention-scale or k-norm fault: a pattern, never proof.
  std::string why;
  if (cmp.first_divergent_position && *cmp.first_divergent_position > 0 &&
      consistent_with("position0_matches", cmp, tol, why)) {
    // Garbage inv_freq jumps at position 1; a wrong theta grows smoothly with position.
    const auto& p = cmp.per_position_max_abs;
    const bool smooth = p.size() > 3 && p[1] < 0.25 * p.back();
    out.push_back({smooth ? "H7" : "H3",
                   smooth ? "position pattern of a wrong RoPE theta (or any fault that spares position 0)"
                          : "position pattern of a RoPE fault (or any fault that spares position 0)",
                   fmt::format("position 0 matches (max|Δ| {:.2e}); position {} on diverge (max|Δ| at pos 1: {:.2e}, "
                               "last: {:.2e})",
                               p[0], *cmp.first_divergent_position, p.size() > 1 ? p[1] : 0.0, p.back()),
                   "pattern", ""});
  }
  // Hidden states all match but logits do not: the LM head differs (H5 when the config ties).
  if (consistent_with("hidden_states_match", cmp, tol, why))
    out.push_back({config.tie_word_embeddings ? "H5" : "", "every hidden state matches but the logits do not",
                   fmt::format("max|Δlogit| {:.3e} with all {} per-layer tensors within {:.1e}: the LM head differs",
                               cmp.max_abs, cmp.layers.size(), tol.hidden_max_abs),
                   "pattern", ""});
  if (cmp.first_divergent_layer)
    out.push_back({"", "first divergent layer",
                   fmt::format("{} is the first tensor beyond {:.1e} (see per-layer table)", *cmp.first_divergent_layer,
                               tol.hidden_max_abs),
                   "note", ""});
  return out;
}

bool consistent_with(const std::string& check, const Comparison& cmp, const Tolerance& tol, std::string& why) {
  if (check == "position0_matches") {
    if (cmp.per_position_max_abs.empty()) {
      why = "no per-position differences were computed";
      return false;
    }
    if (cmp.per_position_max_abs[0] <= tol.logits_max_abs) return true;
    why = fmt::format("position 0 differs by {:.2e} (> {:.0e}): RoPE is the identity there, so something else is wrong",
                      cmp.per_position_max_abs[0], tol.logits_max_abs);
    return false;
  }
  if (check == "hidden_states_match") {
    if (cmp.layers.empty()) {
      why = "the capture has no per-layer hidden states";
      return false;
    }
    if (!cmp.first_divergent_layer && cmp.max_abs > tol.logits_max_abs) return true;
    why = cmp.first_divergent_layer ? fmt::format("{} already diverges, before the LM head", *cmp.first_divergent_layer)
                                    : std::string("the logits match");
    return false;
  }
  fail("unknown consistency check '{}' (known: position0_matches, hidden_states_match)", check);
}

}  // namespace opensci::harness
