// A model directory: config.json plus one safetensors file or shards listed in
// model.safetensors.index.json. Tensors are looked up by their HF name across shards.
#pragma once

#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "opensci/config.hpp"
#include "opensci/safetensors.hpp"

namespace opensci {

class Checkpoint {
 public:
  explicit Checkpoint(const std::filesystem::path& model_dir);

  const std::filesystem::path& dir() const { return dir_; }
  const ModelConfig& config() const { return config_; }

  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const SafetensorsFile& file_of(const std::string& name) const;  // throws naming the directory
  const TensorInfo& info(const std::string& name) const { return file_of(name).at(name); }
  std::vector<std::string> names() const;

  // Reads a tensor as Real after checking its shape: "file: tensor 'x' has shape [..], expected [..]".
  template <typename Real>
  std::vector<Real> read(const std::string& name, const std::vector<int64_t>& shape) const {
    if constexpr (std::is_same_v<Real, double>)
      return file_of(name).read_f64(name, shape);
    else
      return file_of(name).read_f32(name, shape);
  }

 private:
  std::filesystem::path dir_;
  ModelConfig config_;
  std::vector<SafetensorsFile> shards_;
  std::map<std::string, size_t> where_;  // tensor name -> shard index
};

// Every parameter name and shape the config implies, in HF naming (dense and MoE, the
// per-expert layout). lm_head.weight only when the embeddings are untied.
std::map<std::string, std::vector<int64_t>> expected_parameters(const ModelConfig& config);

// Checks names and shapes of a checkpoint against its config: a missing tensor, a shape that
// does not match, or a tensor the lineage does not have is an error naming file and tensor.
void validate_checkpoint(const Checkpoint& checkpoint);

}  // namespace opensci
