// toyify: a user's model (a local directory or a Hub repo) shrunk to toy size, keeping what
// makes it *that* model: its remote code, every config key that need not change, its own tensor
// names, shard layout and dtypes (read from the index and the safetensors headers only, never
// the payloads), and the relations between its dimensions (head_dim vs hidden/heads, the GQA
// ratio, tied or untied head, experts and top-k, dense layers among sparse ones). Weights are
// the toy builder's deterministic per-tensor streams (harness/toy.hpp), so the same source and
// options give the same bytes on any machine. Every change is recorded in the output config under
// `_toyified_from` (key, from, to, why); a config it cannot shrink faithfully is refused, naming
// the key.
#pragma once

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "opensci/safetensors.hpp"

namespace opensci::harness {

// One tensor of the source checkpoint, as its index / header describes it.
struct SourceTensor {
  std::string name, shard;  // shard: file name inside the model dir
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
};

// What toyify reads of a model: config, remote code, tensor list. Built from a directory
// (read_local_source) or from the Hub (read_hub_source in hub.hpp: small files downloaded into
// the HF cache, safetensors headers fetched with Range requests).
struct ModelSource {
  std::string description;  // "/path/dir" or "org/name@<commit>", recorded in _toyified_from
  nlohmann::json config;
  std::map<std::string, std::filesystem::path> code_files;  // "modeling_x.py" -> readable path
  std::vector<SourceTensor> tensors;
  bool sharded = false;  // had model.safetensors.index.json
};

ModelSource read_local_source(const std::filesystem::path& dir);
// A directory when `from` is one; else ORG/NAME[@REVISION] read from the Hub (hub.hpp).
ModelSource read_model_source(const std::string& from);

// Tensor list of a safetensors header (the JSON after the 8-byte length). `where` names the file.
std::vector<SourceTensor> parse_safetensors_header(const nlohmann::json& header, const std::string& shard,
                                                   const std::string& where);

struct ToyifyOptions {
  std::filesystem::path out;
  uint64_t seed = 1;
  // Target sizes; unset = derived (3 layers, hidden 96, 4 heads (kept a multiple of the GQA
  // ratio), ffn and expert ffn in the source's proportion to hidden, up to 4 experts, vocab 384).
  std::optional<int64_t> layers, hidden, heads, kv_heads, ffn, moe_ffn, experts, vocab;
};

struct ToyifyResult {
  nlohmann::json record;                  // what went into _toyified_from
  std::vector<std::string> warnings;      // e.g. tensors the reference does not know
  size_t tensors = 0, dropped = 0;
};

ToyifyResult toyify(const ModelSource& source, const ToyifyOptions& options);

}  // namespace opensci::harness
