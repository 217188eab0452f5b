#include "opensci/harness/diagnosis.hpp"

#include <fmt/format.h>

#include <cmath>
#include <regex>

#include "opensci/ops.hpp"

namespace opensci::harness {
namespace fs = std::filesystem;

std::optional<std::string> Diagnosis::hazard() const {
  for (const auto& f : findings)
    if (!f.hazard.empty()) return f.hazard;
  return std::nullopt;
}

nlohmann::json Diagnosis::to_json() const {
  nlohmann::json j = nlohmann::json::array();
  for (const auto& f : findings) j.push_back({{"hazard", f.hazard}, {"title", f.title}, {"evidence", f.evidence}});
  return {{"hazard", hazard() ? nlohmann::json(*hazard()) : nlohmann::json()}, {"findings", j}};
}

std::optional<Finding> diagnose_error(const std::string& stage, const std::string& type, const std::string& message) {
  const auto where = fmt::format("{} during {}: {}", type, stage, message.substr(0, 300));
  auto has = [&](const char* s) { return message.find(s) != std::string::npos; };
  if ((type == "ImportError" || type == "ModuleNotFoundError") && (has("TransformersKwargs") || has("LossKwargs")))
    return Finding{"H1", "kwargs class missing in this transformers version", where};
  if ((type == "ImportError" || type == "ModuleNotFoundError") && has("check_model_inputs"))
    return Finding{"H12", "check_model_inputs missing in this transformers version", where};
  if (type == "KeyError" && has("default")) return Finding{"H2", "ROPE_INIT_FUNCTIONS has no 'default'", where};
  if (type == "AttributeError" && has("'list' object has no attribute 'keys'"))
    return Finding{"H4", "_tied_weights_keys must be a dict", where};
  if (has("on the meta device") || has("Cannot copy out of meta tensor"))  // measured on 5.3.0 (matrix/MEASURED.md)
    return Finding{"H17", "tensors left on the meta device after loading (tied lm_head not tied)", where};
  if (has("size mismatch") && (has("mlp.gate") || has("experts")))
    return Finding{"H13", "MoE config keys written by another major version", where};
  return Finding{"", "exception in the capture process", where};
}

std::vector<Finding> diagnose_loaded_weights(const Checkpoint& ck, const fs::path& state_dict_path,
                                             const std::string& capture_dtype) {
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
    const bool init_pattern = std::any_of(differing.begin(), differing.end(), [](const auto& n) {
      return n.find("norm") != std::string::npos || n.ends_with(".bias");
    });
    out.push_back({init_pattern ? "H8" : "",
                   "loaded parameters differ from the checkpoint",
                   fmt::format("{} tensors differ after loading (worst relative difference {:.3g}), first: {}",
                               differing.size(), worst, differing.front())});
  }
  // Tied embeddings: lm_head must be the embedding matrix after loading.
  if (c.tie_word_embeddings && sd.contains("lm_head.weight") && sd.contains("model.embed_tokens.weight")) {
    const auto head = sd.read_f64("lm_head.weight");
    const auto emb = sd.read_f64("model.embed_tokens.weight");
    if (head != emb)
      out.push_back({"H5", "lm_head is not tied to the embeddings",
                     "config ties the embeddings, but the loaded lm_head.weight differs from model.embed_tokens.weight "
                     "(a randomly initialised head)"});
  }
  // RoPE inverse frequencies, when the model keeps them as a buffer.
  const auto expected = ops::rope_inv_freq(c.head_dim, c.rope_theta);
  for (const auto& t : sd.tensors()) {
    if (!t.name.ends_with("inv_freq")) continue;
    const auto got = sd.read_f64(t.name);
    if (got.size() != expected.size()) continue;
    double max_rel = 0;
    for (size_t i = 0; i < got.size(); ++i) max_rel = std::max(max_rel, std::abs(got[i] - expected[i]) / expected[i]);
    if (!(max_rel < 1e-5)) {  // fp32 rounding of 1/theta^(2i/d) is ~6e-8 relative
      // Garbage (zeros, uninitialised memory) vs a smooth, wrong theta: a wrong theta keeps
      // inv_freq[0] = 1 and decays geometrically.
      const bool geometric = std::abs(got[0] - 1.0) < 1e-6 && got.size() > 2 && got[1] > 0 && got[1] < 1 &&
                             std::abs(got[2] / got[1] - got[1]) < 1e-4;
      out.push_back({geometric ? "H7" : "H3",
                     geometric ? "RoPE theta differs from the config" : "RoPE inv_freq is not initialised",
                     fmt::format("{} holds {} (max relative error {:.3g}); expected 1/{}^(2i/{}) = [{:.6g}, {:.6g}, ...]",
                                 t.name, got.size() > 2 ? fmt::format("[{:.6g}, {:.6g}, {:.6g}, ...]", got[0], got[1], got[2]) : "?",
                                 max_rel, c.rope_theta, c.head_dim, expected[0], expected.size() > 1 ? expected[1] : 0.0)});
      break;
    }
  }
  return out;
}

std::vector<Finding> diagnose_comparison(const Comparison& cmp, const Tolerance& tol, const ModelConfig& config,
                                         const nlohmann::json& provenance, const std::string& requested_dtype) {
  std::vector<Finding> out;
  const auto effective = provenance.value("effective_dtype", std::string());
  if (!effective.empty() && effective != requested_dtype)  // "bfloat16+float32" (mixed) is not float32 either
    out.push_back({"H6", "model ran in another dtype than requested",
                   fmt::format("requested {}, parameters were {} after loading", requested_dtype, effective)});
  if (cmp.passed()) return out;
  if (cmp.nonfinite_a > 0)
    out.push_back({"", "non-finite logits", fmt::format("{} NaN/Inf logits in the candidate", cmp.nonfinite_a)});
  // Position pattern: RoPE at position 0 is the identity, so a RoPE fault leaves position 0 exact.
  if (!cmp.per_position_max_abs.empty() && cmp.per_position_max_abs[0] <= tol.logits_max_abs &&
      cmp.first_divergent_position && *cmp.first_divergent_position > 0) {
    // Garbage inv_freq jumps at position 1; a wrong theta grows smoothly with position.
    const auto& p = cmp.per_position_max_abs;
    const bool smooth = p.size() > 3 && p[1] < 0.25 * p.back();
    out.push_back({smooth ? "H7" : "H3", smooth ? "RoPE frequencies wrong (smooth in position)" : "RoPE frequencies wrong",
                   fmt::format("position 0 matches (max|Δ| {:.2e}); position {} on diverge (max|Δ| at pos 1: {:.2e}, last: {:.2e})",
                               p[0], *cmp.first_divergent_position, p.size() > 1 ? p[1] : 0.0, p.back())});
  }
  // Hidden states all match but logits do not: the LM head (tying) is wrong.
  if (!cmp.layers.empty() && !cmp.first_divergent_layer && cmp.max_abs > tol.logits_max_abs)
    out.push_back({config.tie_word_embeddings ? "H5" : "", "every hidden state matches but the logits do not",
                   fmt::format("max|Δlogit| {:.3e} with all {} per-layer tensors within {:.1e}: the LM head differs",
                               cmp.max_abs, cmp.layers.size(), tol.hidden_max_abs)});
  if (cmp.first_divergent_layer)
    out.push_back({"", "first divergent layer",
                   fmt::format("{} is the first tensor beyond {:.1e} (see per-layer table)", *cmp.first_divergent_layer,
                               tol.hidden_max_abs)});
  return out;
}

}  // namespace opensci::harness
