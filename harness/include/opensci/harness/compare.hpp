// Comparison of two forward outputs (safetensors with `logits` [batch, seq, vocab] and,
// optionally, per-layer tensors named as in reference/include/opensci/forward.hpp).
// Pad positions (attention_mask == 0) are excluded: their values are undefined in every
// implementation. A constant shift of a row's logits is not a behaviour change, so
// log-softmax and KL are reported beside raw logits.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace opensci::harness {

// Acceptance thresholds of one matrix cell; `reason` says why the values are what they are.
struct Tolerance {
  std::string name;
  double logits_max_abs = 1e-4;
  double logsoftmax_max_abs = 1e-4;
  double hidden_max_abs = 1e-4;     // a layer above this is "divergent" (diagnosis only)
  double top1_agreement_min = 1.0;  // fraction of positions whose argmax must agree
  double logits_rel_l2_max = 0;     // ||a - b|| / ||b|| over logits; 0 = not checked (bf16 cells use it)
  std::string reason;
};

// Reads matrix/tolerances.json: {"<name>": {"logits_max_abs": .., "reason": ".."}, ...}.
Tolerance load_tolerance(const std::filesystem::path& file, const std::string& name);

struct LayerDiff {
  std::string name;  // hidden.embed, attn.0, mlp.0, hidden.layer.0, ..., hidden.final_norm
  double max_abs = 0;
  double rel_l2 = 0;              // ||a - b|| / ||b||
  int64_t worst_position = -1;    // position id of max_abs
};

struct Comparison {
  int64_t batch = 0, seq = 0, vocab = 0, positions = 0;  // positions = non-pad tokens compared
  double max_abs = 0;              // max |a - b| over logits
  double max_rel = 0;              // max |a - b| / max(|b|, 1e-6)
  double rel_l2 = 0;               // ||a - b|| / ||b||
  double rmse = 0;
  double cosine = 0;
  double top1_agreement = 0;       // fraction of positions with equal argmax
  double logsoftmax_max_abs = 0;
  double kl_mean = 0, kl_max = 0;  // KL(softmax(b) || softmax(a)) per position
  int64_t nonfinite_a = 0, nonfinite_b = 0;
  std::vector<double> per_position_max_abs;  // [max position id + 1], max over rows (pads skipped)
  std::vector<LayerDiff> layers;             // in forward order, names present in both files
  std::optional<std::string> first_divergent_layer;
  std::optional<int64_t> first_divergent_position;  // first position id whose logits exceed tol
  std::vector<std::string> failures;                // empty = within tolerance
  bool passed() const { return failures.empty(); }
};

// `a` is the candidate (e.g. transformers), `b` the reference.
Comparison compare_outputs(const std::filesystem::path& a, const std::filesystem::path& b, const Tolerance& tol);

nlohmann::json to_json(const Comparison& c, const Tolerance& tol);
std::string format_comparison(const Comparison& c, const Tolerance& tol);  // human-readable report

// Forward order of hidden-state names: hidden.embed, attn.i, mlp.i, hidden.layer.i, ..., hidden.final_norm.
std::vector<std::string> layer_order(const std::vector<std::string>& names);

}  // namespace opensci::harness
