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

// How the experts of one sparse layer are stored (HF names, E experts, I = moe_intermediate_size):
//   PerExpert  mlp.experts.{j}.{gate,up}_proj.weight [I, H], mlp.experts.{j}.down_proj.weight [H, I]
//              (transformers <= 4.57 and what published checkpoints hold);
//   Fused      mlp.experts.gate_up_proj [E, 2I, H] (per expert: gate rows, then up rows) and
//              mlp.experts.down_proj [E, H, I] (transformers 5.x modules, hazard H9).
enum class ExpertLayout { PerExpert, Fused };
std::string_view expert_layout_name(ExpertLayout layout);  // "per-expert" / "fused"

// Every parameter name and shape the config implies, in HF naming. Sparse layers use `layout`
// (or layouts[layer] in the second form, one entry per layer). lm_head.weight only when the
// embeddings are untied.
std::map<std::string, std::vector<int64_t>> expected_parameters(const ModelConfig& config,
                                                                ExpertLayout layout = ExpertLayout::PerExpert);
std::map<std::string, std::vector<int64_t>> expected_parameters(const ModelConfig& config,
                                                                const std::vector<ExpertLayout>& layouts);

// The expert layout of each layer of a checkpoint (PerExpert for dense layers). Either layout is
// accepted per layer; a layer holding tensors of both is an error naming the layer and one
// tensor of each kind.
std::vector<ExpertLayout> detect_expert_layouts(const Checkpoint& checkpoint);

// Checks names and shapes of a checkpoint against its config: a missing tensor, a shape that
// does not match, or a tensor the lineage does not have is an error naming file and tensor.
// MoE layers may be stored per expert or fused (see ExpertLayout), independently per layer.
void validate_checkpoint(const Checkpoint& checkpoint);

}  // namespace opensci
