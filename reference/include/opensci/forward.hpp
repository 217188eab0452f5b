// The OpenSci forward pass on CPU: embeddings -> N x (pre-norm attention, pre-norm MLP) ->
// final norm -> LM head. Three precisions share one code path:
//   Precision::Golden  every op in double, plain loops (the oracle);
//   Precision::Fast    fp32 with OpenBLAS sgemm and OpenMP threads (what torch does on CPU);
//   Precision::BF16    the fast path with bf16 storage: weights rounded to bf16 once, every op
//                      computed in fp32 and its output rounded to bf16 (round-to-nearest-even) at
//                      the points torch rounds a bf16 model: linear outputs (bias added before the
//                      rounding), RMSNorm (normalised value, then weight x value), RoPE (cos/sin,
//                      each product, the sum), attention output, SiLU and the gate x up product,
//                      every residual add, the logits.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "opensci/checkpoint.hpp"

namespace opensci {

enum class Precision { Golden, Fast, BF16 };

// A padded batch. Rows are left-padded; mask 0 marks padding.
struct TokenBatch {
  int64_t batch = 0;
  int64_t seq = 0;
  std::vector<int64_t> input_ids;       // [batch, seq]
  std::vector<int64_t> attention_mask;  // [batch, seq], 1 = token, 0 = pad
  std::vector<int64_t> position_ids;    // [batch, seq]; default: cumsum(mask) - 1, pads at 0

  static TokenBatch from_list(const std::vector<int64_t>& ids);  // one unpadded row
  // {"input_ids": [[..], ..], "attention_mask": [[..], ..], "position_ids"?: [[..], ..]}
  static TokenBatch from_json_file(const std::filesystem::path& path);
  void validate(int64_t vocab_size, const std::string& where) const;  // ids in range, mask 0/1
};

// Known defects the reference can be made to commit, for the mutation tests (tests/mutation):
// each must turn at least one matrix cell red with the right diagnosis. Never set in a real run.
//   "drop-bias:<tensor>"  the named bias read as zeros
//   "theta-x2"            RoPE with twice the config's theta
//   "skip-qk-norm"        no per-head q/k RMSNorm
//   "swap-rope-halves"    rotate-half with its halves swapped (the rotation runs backwards)
struct ForwardOptions {
  Precision precision = Precision::Golden;
  bool capture_hidden = false;  // per-layer tensors (names below)
  std::string defect;           // "" = none (see above)

  ForwardOptions(Precision p = Precision::Golden, bool hidden = false, std::string defect_ = {})
      : precision(p), capture_hidden(hidden), defect(std::move(defect_)) {}
};

// Hidden-state names shared with the capture script (harness/python/capture.py):
//   hidden.embed          embeddings                          [batch, seq, H]
//   attn.{i}              attention block output (o_proj)     [batch, seq, H]
//   mlp.{i}               MLP / MoE block output              [batch, seq, H]
//   hidden.layer.{i}      decoder layer i output              [batch, seq, H]
//   hidden.final_norm     final RMSNorm output                [batch, seq, H]
struct ForwardResult {
  int64_t batch = 0, seq = 0, vocab = 0, hidden = 0;
  std::vector<float> logits;                                         // [batch, seq, vocab]
  std::vector<std::pair<std::string, std::vector<float>>> hiddens;  // in layer order
};

ForwardResult forward(const Checkpoint& checkpoint, const TokenBatch& tokens, const ForwardOptions& options);

// Writes logits, attention_mask, position_ids and the captured hidden states as safetensors.
void write_forward_result(const ForwardResult& result, const TokenBatch& tokens, const std::filesystem::path& out,
                          const std::map<std::string, std::string>& metadata);

}  // namespace opensci
