#include "opensci/harness/toy.hpp"

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "opensci/checkpoint.hpp"
#include "opensci/error.hpp"

namespace opensci::harness {
namespace fs = std::filesystem;

uint64_t DeterministicRng::next() {
  uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

double DeterministicRng::normal() {
  int64_t sum = 0;
  for (int i = 0; i < 12; ++i) sum += static_cast<int64_t>(next() >> 40);  // 24-bit uniforms
  const int64_t centred = sum - 6 * (int64_t{1} << 24);
  return static_cast<double>(centred) * 0x1p-24;  // exact
}

uint64_t name_hash(const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char ch : name) {
    h ^= ch;
    h *= 0x100000001b3ULL;
  }
  return h;
}

std::vector<float> toy_values(const std::string& name, int64_t count, const ModelConfig& config, uint64_t seed) {
  DeterministicRng rng(seed ^ name_hash(name));
  const bool is_norm = name.ends_with("norm.weight") || name.ends_with("layernorm.weight");
  std::vector<float> values(static_cast<size_t>(count));
  for (auto& v : values)
    v = is_norm ? static_cast<float>(1.0 + 0.1 * rng.normal())
                : static_cast<float>(config.initializer_range * rng.normal());
  return values;
}

void build_toy(const ToyOptions& o) {
  std::ifstream in(o.config);
  if (!in) fail("{}: cannot open toy config", o.config.string());
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: toy config is not valid JSON: {}", o.config.string(), e.what());
  }
  for (auto it = j.begin(); it != j.end();) it = it.key().starts_with("_") ? j.erase(it) : std::next(it);
  const auto config = parse_config(j, o.config.string());
  if (o.dtype != DType::F32 && o.dtype != DType::BF16) fail("toy checkpoints are F32 or BF16");

  fs::create_directories(o.out);
  SafetensorsWriter writer;
  for (const auto& [name, shape] : expected_parameters(config)) {
    const auto values = toy_values(name, element_count(shape), config, o.seed);
    if (o.dtype == DType::F32) {
      writer.add_f32(name, shape, values);
    } else {
      std::vector<std::byte> payload(values.size() * 2);
      for (size_t i = 0; i < values.size(); ++i) {
        const uint16_t b = f32_to_bf16(values[i]);
        std::memcpy(payload.data() + 2 * i, &b, 2);
      }
      writer.add(name, DType::BF16, shape, std::move(payload));
    }
  }
  writer.set_metadata("format", "pt");
  writer.set_metadata("opensci_toy_seed", std::to_string(o.seed));
  writer.write(o.out / "model.safetensors");
  {
    std::ofstream cfg(o.out / "config.json.tmp");
    cfg << j.dump(2) << "\n";
  }
  fs::rename(o.out / "config.json.tmp", o.out / "config.json");
  if (!o.remote_code.empty()) {
    if (!fs::is_directory(o.remote_code)) fail("{}: remote-code directory does not exist", o.remote_code.string());
    for (const auto& entry : fs::directory_iterator(o.remote_code))
      if (entry.path().extension() == ".py")
        fs::copy_file(entry.path(), o.out / entry.path().filename(), fs::copy_options::overwrite_existing);
  }
}

}  // namespace opensci::harness
