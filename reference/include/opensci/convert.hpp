// Checkpoint conversion between the three layouts an OpenSci MoE (or dense) model lives in:
//
//   hf-per-expert  HF names, experts stored one by one (transformers <= 4.57, published models):
//                  model.layers.{l}.mlp.experts.{j}.{gate,up}_proj.weight [I, H], down_proj [H, I]
//   hf-fused       HF names, experts fused as transformers 5.x holds them (hazard H9):
//                  model.layers.{l}.mlp.experts.gate_up_proj [E, 2I, H] (gate rows, then up rows)
//                  model.layers.{l}.mlp.experts.down_proj    [E, H, I]
//                  As input, the transposed fused layout ([E, H, 2I] / [E, I, H], written by some
//                  exporters) is recognised by shape and transposed; a shape that fits both
//                  layouts (2I == H, or I == H) is refused as ambiguous unless the input's
//                  layout is stated (ConvertOptions::fused_input, CLI --fused-input).
//   megatron       Megatron-core GPTModel names (TE spec), one directory per tensor-parallel rank:
//                  DIR/config.json (the HF config) + DIR/mp_rank_{r:02d}/model[-*].safetensors.
//                  linear_qkv is laid out per query group (the group's q heads, its k head, its v
//                  head); linear_fc1 holds [gate; up] of the rank's slice; norms fused into TE
//                  linears (linear_qkv.layer_norm_weight = input_layernorm, dense
//                  linear_fc1.layer_norm_weight = post_attention_layernorm, MoE layers
//                  pre_mlp_layernorm); the lineage's q/k norm names map to q_layernorm/k_layernorm;
//                  router = mlp.router.weight; experts SequentialMLP
//                  (mlp.experts.local_experts.{j}.linear_fc{1,2}.weight) or TEGroupedMLP
//                  (mlp.experts.linear_fc{1,2}.weight{j}). Column-parallel tensors (qkv, fc1,
//                  embeddings, output layer) split rows, row-parallel ones (linear_proj, fc2)
//                  split columns, everything else is replicated on every rank (and must be
//                  byte-identical across ranks on input). Expert TP = TP, EP = PP = 1.
//                  Input: the non-TE names input_layernorm / pre_mlp_layernorm are accepted too.
//
// Conversion streams: the input is read shard by shard (one shard of every rank at a time,
// memory-mapped), output shard k holds the tensors completed while reading input shard k and is
// written straight to disk as it is produced. Only input tensors still needed by a later shard
// (a layer whose experts straddle a shard boundary) are copied to memory, so peak memory stays
// below one input shard plus one layer's experts. Values are never converted: every output
// byte is a byte of the input (round trips are bit-exact; the dtype is kept).
//
// Every problem is a hard error naming file, tensor, found and expected shape: unknown tensors,
// missing or duplicate experts, a layer with a partial expert set or both expert layouts,
// shapes that fit no (or more than one) layout, dtypes that differ inside a fused tensor,
// replicated tensors that differ between ranks. Problems found while reading the headers are
// collected and reported together before anything is written.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace opensci::convert {

enum class Format { HfPerExpert, HfFused, Megatron };
std::string_view format_name(Format format);  // "hf-per-expert", "hf-fused", "megatron"
Format format_from_name(std::string_view name);

enum class MegatronExperts { Sequential, Grouped };  // local_experts.{j}.linear_fc1 / linear_fc1.weight{j}

// Layout of fused HF expert tensors in the input: told apart by shape (Auto), or stated, which is
// needed only when a shape fits both (2I == H or I == H) and Auto refuses to guess.
enum class FusedInput { Auto, V5, Transposed };

struct ConvertOptions {
  std::filesystem::path input;   // HF model directory, or a Megatron directory (has mp_rank_00/)
  std::filesystem::path output;  // created; must not exist or be empty
  Format to = Format::HfFused;
  int tp = 1;                    // tensor-parallel size of a Megatron output
  MegatronExperts megatron_experts = MegatronExperts::Sequential;
  std::filesystem::path config;  // HF config.json; default: input/config.json
  uint64_t max_shard_bytes = 0;  // split an output shard above this size; 0 = one per input shard
  FusedInput fused_input = FusedInput::Auto;
};

struct ConvertReport {
  std::string from;           // detected input layout, e.g. "hf (layers 1,3 per-expert; 2 fused)"
  std::string to;
  int input_tp = 1, output_tp = 1;
  size_t input_shards = 0, output_shards = 0;  // files, all ranks together
  size_t input_tensors = 0, output_tensors = 0;
  uint64_t input_bytes = 0, output_bytes = 0;  // tensor payload bytes
  std::vector<std::string> notes;    // e.g. transposed layers that were re-laid out
  std::vector<std::string> dropped;  // tensors with no place in the output format, with the reason
};

ConvertReport convert_checkpoint(const ConvertOptions& options);

// The directory layout of a Megatron output / input rank.
std::string megatron_rank_dir(int rank);  // "mp_rank_00"

}  // namespace opensci::convert
