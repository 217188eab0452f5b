// Test support for the MoE and converter tests: build checkpoint directories from tensors
// (HF single-file or sharded with an index, Megatron rank directories) and read every tensor
// of a directory back as raw bytes, so tests compare bytes, not values.
#pragma once

#include <fmt/format.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "opensci/config.hpp"
#include "opensci/harness/toy.hpp"
#include "opensci/safetensors.hpp"

namespace opensci::test {

struct TensorData {
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  std::vector<std::byte> bytes;
  bool operator==(const TensorData&) const = default;
};
// Names of Megatron tensors carry their rank directory: "mp_rank_01/decoder.layers.0...".
using TensorMap = std::map<std::string, TensorData>;

inline TensorData f32_tensor(std::vector<int64_t> shape, const std::vector<float>& values) {
  TensorData t{DType::F32, std::move(shape), std::vector<std::byte>(values.size() * 4)};
  std::memcpy(t.bytes.data(), values.data(), t.bytes.size());
  return t;
}

inline TensorData bf16_tensor(std::vector<int64_t> shape, const std::vector<float>& values) {
  TensorData t{DType::BF16, std::move(shape), std::vector<std::byte>(values.size() * 2)};
  for (size_t i = 0; i < values.size(); ++i) {
    const uint16_t b = f32_to_bf16(values[i]);
    std::memcpy(t.bytes.data() + 2 * i, &b, 2);
  }
  return t;
}

inline std::vector<float> f32_values(const TensorData& t) {
  std::vector<float> v(t.bytes.size() / 4);
  std::memcpy(v.data(), t.bytes.data(), t.bytes.size());
  return v;
}

// Shard files of one HF-style directory (index order, or the single model.safetensors).
inline std::vector<std::filesystem::path> shard_paths(const std::filesystem::path& dir) {
  const auto index = dir / "model.safetensors.index.json";
  if (!std::filesystem::exists(index)) return {dir / "model.safetensors"};
  std::ifstream in(index);
  const auto j = nlohmann::json::parse(in);
  std::set<std::string> files;
  for (const auto& [name, file] : j["weight_map"].items()) files.insert(file.get<std::string>());
  std::vector<std::filesystem::path> out;
  for (const auto& f : files) out.push_back(dir / f);
  return out;
}

inline TensorMap read_tensors(const std::filesystem::path& dir) {
  TensorMap out;
  std::vector<std::pair<std::string, std::filesystem::path>> parts;
  for (int r = 0; std::filesystem::exists(dir / fmt::format("mp_rank_{:02d}", r)); ++r)
    parts.emplace_back(fmt::format("mp_rank_{:02d}/", r), dir / fmt::format("mp_rank_{:02d}", r));
  if (parts.empty()) parts.emplace_back("", dir);
  for (const auto& [prefix, d] : parts)
    for (const auto& path : shard_paths(d)) {
      const SafetensorsFile f(path);
      for (const auto& info : f.tensors()) {
        const auto b = f.bytes(info);
        out[prefix + info.name] = {info.dtype, info.shape, {b.begin(), b.end()}};
      }
    }
  return out;
}

// Writes config.json and the tensors. shard_of(name) picks the shard (0-based) of a tensor; more
// than one shard writes model-0000k-of-0000n.safetensors + index, per rank directory.
inline void write_checkpoint(const std::filesystem::path& dir, const nlohmann::json& config, const TensorMap& tensors,
                             const std::function<int(const std::string&)>& shard_of = {}) {
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "config.json") << config.dump(2);
  std::map<std::string, std::map<int, SafetensorsWriter>> writers;  // rank dir -> shard -> writer
  for (const auto& [full, t] : tensors) {
    const auto slash = full.find('/');
    const auto sub = slash == std::string::npos ? std::string() : full.substr(0, slash);
    const auto name = slash == std::string::npos ? full : full.substr(slash + 1);
    writers[sub][shard_of ? shard_of(name) : 0].add(name, t.dtype, t.shape, t.bytes);
  }
  for (auto& [sub, shards] : writers) {
    const auto d = sub.empty() ? dir : dir / sub;
    std::filesystem::create_directories(d);
    const int n = shards.rbegin()->first + 1;
    if (n == 1) {
      shards.begin()->second.set_metadata("format", "pt");
      shards.begin()->second.write(d / "model.safetensors");
      continue;
    }
    nlohmann::json index;
    index["metadata"] = nlohmann::json::object();
    for (auto& [k, w] : shards) {
      const auto file = fmt::format("model-{:05d}-of-{:05d}.safetensors", k + 1, n);
      w.set_metadata("format", "pt");
      w.write(d / file);
      const SafetensorsFile written(d / file);
      for (const auto& info : written.tensors()) index["weight_map"][info.name] = file;
    }
    std::ofstream(d / "model.safetensors.index.json") << index.dump(2);
  }
}

// The deterministic toy tensors (per-expert layout) of a config, as the toy builder makes them.
inline TensorMap toy_tensors(const std::filesystem::path& scratch, const nlohmann::json& config, uint64_t seed,
                             DType dtype = DType::F32) {
  const auto cfg = scratch / "toy-config.json";
  std::ofstream(cfg) << config.dump(2);
  harness::ToyOptions o;
  o.config = cfg;
  o.seed = seed;
  o.out = scratch / "toy";
  o.dtype = dtype;
  harness::build_toy(o);
  auto t = read_tensors(o.out);
  std::filesystem::remove_all(o.out);
  return t;
}

inline nlohmann::json load_json(const std::filesystem::path& p) {
  std::ifstream in(p);
  auto j = nlohmann::json::parse(in);
  for (auto it = j.begin(); it != j.end();) it = it.key().starts_with("_") ? j.erase(it) : std::next(it);
  return j;
}

}  // namespace opensci::test
