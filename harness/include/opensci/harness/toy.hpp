// Deterministic toy checkpoints: every parameter the config implies, drawn from a seeded
// integer generator, so the same (config, seed) gives the same bytes on any IEEE-754 machine.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "opensci/config.hpp"
#include "opensci/safetensors.hpp"

namespace opensci::harness {

// splitmix64 stream; normal() is Irwin-Hall of 12 uniforms (mean 0, std 1, range [-6, 6])
// computed in integers and exact doubles, so no libm call enters the bytes.
class DeterministicRng {
 public:
  explicit DeterministicRng(uint64_t seed) : state_(seed) {}
  uint64_t next();
  double normal();

 private:
  uint64_t state_;
};

// FNV-1a 64 of a tensor name: each tensor has its own stream, so adding one never changes another.
uint64_t name_hash(const std::string& name);

struct ToyOptions {
  std::filesystem::path config;       // HF config.json (keys starting with '_' are notes, stripped)
  uint64_t seed = 0;
  std::filesystem::path out;          // writes out/config.json, out/model.safetensors
  std::filesystem::path remote_code;  // optional: *.py copied next to the config
  DType dtype = DType::F32;           // F32 or BF16 checkpoint
};

// Values of one parameter: linear weights, biases and embeddings ~ N(0, initializer_range);
// norm weights 1 + N(0, 0.1) so a dropped or misapplied norm weight shows.
std::vector<float> toy_values(const std::string& name, int64_t count, const ModelConfig& config, uint64_t seed);

void build_toy(const ToyOptions& options);

}  // namespace opensci::harness
