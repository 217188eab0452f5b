#include "opensci/checkpoint.hpp"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "opensci/error.hpp"

namespace opensci {
namespace fs = std::filesystem;

Checkpoint::Checkpoint(const fs::path& model_dir) : dir_(model_dir) {
  const auto config_path = model_dir / "config.json";
  if (!fs::exists(config_path)) fail("{}: model directory has no config.json", model_dir.string());
  config_ = load_config(config_path);

  const auto index_path = model_dir / "model.safetensors.index.json";
  std::vector<std::string> shard_names;
  std::map<std::string, std::string> declared;  // tensor -> shard file, from the index
  if (fs::exists(index_path)) {
    std::ifstream in(index_path);
    nlohmann::json index;
    try {
      index = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
      fail("{}: index is not valid JSON: {}", index_path.string(), e.what());
    }
    if (!index.contains("weight_map") || !index["weight_map"].is_object())
      fail("{}: index has no 'weight_map' object", index_path.string());
    std::set<std::string> unique;
    for (const auto& [tensor, file] : index["weight_map"].items()) {
      if (!file.is_string()) fail("{}: weight_map['{}'] is not a file name", index_path.string(), tensor);
      declared[tensor] = file.get<std::string>();
      unique.insert(file.get<std::string>());
    }
    shard_names.assign(unique.begin(), unique.end());
  } else if (fs::exists(model_dir / "model.safetensors")) {
    shard_names.push_back("model.safetensors");
  } else {
    fail("{}: no model.safetensors or model.safetensors.index.json", model_dir.string());
  }
  for (const auto& name : shard_names) {
    shards_.emplace_back(model_dir / name);
    for (const auto& t : shards_.back().tensors()) {
      auto [it, inserted] = where_.emplace(t.name, shards_.size() - 1);
      if (!inserted)
        fail("{}: tensor '{}' appears in two shards ({} and {})", model_dir.string(), t.name,
             shards_[it->second].path().filename().string(), name);
    }
  }
  for (const auto& [tensor, file] : declared) {
    auto it = where_.find(tensor);
    if (it == where_.end())
      fail("{}: index lists tensor '{}' in {}, but that shard does not contain it", index_path.string(), tensor, file);
    if (shards_[it->second].path().filename() != file)
      fail("{}: index places tensor '{}' in {}, found in {}", index_path.string(), tensor, file,
           shards_[it->second].path().filename().string());
  }
}

const SafetensorsFile& Checkpoint::file_of(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) fail("{}: checkpoint has no tensor '{}'", dir_.string(), name);
  return shards_[it->second];
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  for (const auto& [name, _] : where_) out.push_back(name);
  return out;
}

std::string_view expert_layout_name(ExpertLayout layout) {
  return layout == ExpertLayout::Fused ? "fused" : "per-expert";
}

std::map<std::string, std::vector<int64_t>> expected_parameters(const ModelConfig& c, ExpertLayout layout) {
  return expected_parameters(c, std::vector<ExpertLayout>(static_cast<size_t>(c.num_layers), layout));
}

std::map<std::string, std::vector<int64_t>> expected_parameters(const ModelConfig& c,
                                                                const std::vector<ExpertLayout>& layouts) {
  if (static_cast<int64_t>(layouts.size()) != c.num_layers)
    fail("{}: expected_parameters needs one expert layout per layer ({}), got {}", c.source, c.num_layers,
         layouts.size());
  std::map<std::string, std::vector<int64_t>> p;
  const int64_t H = c.hidden_size, D = c.head_dim, QD = c.num_heads * D, KVD = c.num_kv_heads * D;
  p["model.embed_tokens.weight"] = {c.vocab_size, H};
  p["model.norm.weight"] = {H};
  if (!c.tie_word_embeddings) p["lm_head.weight"] = {c.vocab_size, H};
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const auto pre = fmt::format("model.layers.{}.", l);
    p[pre + "input_layernorm.weight"] = {H};
    p[pre + "post_attention_layernorm.weight"] = {H};
    const std::pair<const char*, std::vector<int64_t>> projections[] = {
        {"q_proj", {QD, H}}, {"k_proj", {KVD, H}}, {"v_proj", {KVD, H}}, {"o_proj", {H, QD}}};
    for (const auto& [proj, shape] : projections) {
      p[pre + "self_attn." + proj + ".weight"] = shape;
      if (c.attention_bias) p[pre + "self_attn." + proj + ".bias"] = {shape[0]};
    }
    if (c.qk_norm) {
      p[pre + "self_attn." + c.q_norm_name() + ".weight"] = {D};
      p[pre + "self_attn." + c.k_norm_name() + ".weight"] = {D};
    }
    if (c.is_sparse_layer(l)) {
      const int64_t E = c.num_experts, I = c.moe_intermediate_size;
      p[pre + "mlp.gate.weight"] = {E, H};
      if (layouts[static_cast<size_t>(l)] == ExpertLayout::Fused) {
        p[pre + "mlp.experts.gate_up_proj"] = {E, 2 * I, H};
        p[pre + "mlp.experts.down_proj"] = {E, H, I};
      } else {
        for (int64_t e = 0; e < E; ++e) {
          const auto ex = fmt::format("{}mlp.experts.{}.", pre, e);
          p[ex + "gate_proj.weight"] = {I, H};
          p[ex + "up_proj.weight"] = {I, H};
          p[ex + "down_proj.weight"] = {H, I};
        }
      }
    } else {
      const int64_t I = c.intermediate_size;
      for (const char* proj : {"gate_proj", "up_proj"}) {
        p[pre + "mlp." + proj + ".weight"] = {I, H};
        if (c.mlp_bias) p[pre + "mlp." + proj + ".bias"] = {I};
      }
      p[pre + "mlp.down_proj.weight"] = {H, I};
      if (c.mlp_bias) p[pre + "mlp.down_proj.bias"] = {H};
    }
  }
  return p;
}

std::vector<ExpertLayout> detect_expert_layouts(const Checkpoint& ck) {
  const auto& c = ck.config();
  std::vector<ExpertLayout> layouts(static_cast<size_t>(c.num_layers), ExpertLayout::PerExpert);
  const auto names = ck.names();  // sorted
  for (int64_t l = 0; l < c.num_layers; ++l) {
    if (!c.is_sparse_layer(l)) continue;
    const auto prefix = fmt::format("model.layers.{}.mlp.experts.", l);
    std::string per_expert, fused;
    for (auto it = std::lower_bound(names.begin(), names.end(), prefix); it != names.end() && it->starts_with(prefix);
         ++it) {
      const char next = (*it)[prefix.size()];
      if (next >= '0' && next <= '9') {
        if (per_expert.empty()) per_expert = *it;
      } else if (*it == prefix + "gate_up_proj" || *it == prefix + "down_proj") {
        if (fused.empty()) fused = *it;
      }
    }
    if (!per_expert.empty() && !fused.empty())
      fail("{}: layer {} mixes expert layouts: per-expert tensor '{}' and fused tensor '{}'; a layer must hold either "
           "mlp.experts.{{j}}.{{gate,up,down}}_proj.weight for every expert or mlp.experts.gate_up_proj + "
           "mlp.experts.down_proj",
           ck.dir().string(), l, per_expert, fused);
    if (!fused.empty()) layouts[static_cast<size_t>(l)] = ExpertLayout::Fused;
  }
  return layouts;
}

void validate_checkpoint(const Checkpoint& ck) {
  const auto& c = ck.config();
  const auto layouts = detect_expert_layouts(ck);
  const auto expected = expected_parameters(c, layouts);
  for (const auto& [name, shape] : expected) {
    if (!ck.contains(name)) {
      const bool expert = name.find(".mlp.experts.") != std::string::npos;
      fail("{}: checkpoint is missing tensor '{}' (expected shape {} for a {} config){}", ck.dir().string(), name,
           shape_str(shape), lineage_name(c.lineage),
           expert ? fmt::format("; a sparse layer holds either all {} experts as mlp.experts.{{j}}.{{gate,up,down}}_proj"
                                ".weight or the fused mlp.experts.gate_up_proj [E, 2I, H] + mlp.experts.down_proj "
                                "[E, H, I]",
                                c.num_experts)
                  : std::string());
    }
    const auto& found = ck.info(name).shape;
    // The transposed fused layout some exporters write ([E, H, 2I] / [E, I, H]) needs converting first.
    if (found != shape && shape.size() == 3 && found.size() == 3 && found[0] == shape[0] && found[1] == shape[2] &&
        found[2] == shape[1] && name.find(".mlp.experts.") != std::string::npos)
      fail("{}: tensor '{}' in {} has shape {}, expected {} (fused v5 layout); it looks transposed — convert it with "
           "`opensci-compat convert --to hf-fused`",
           ck.dir().string(), name, ck.file_of(name).path().filename().string(), shape_str(found), shape_str(shape));
    ck.file_of(name).check_shape(name, shape);
  }
  for (const auto& name : ck.names()) {
    if (expected.count(name)) continue;
    if (name.ends_with("rotary_emb.inv_freq")) continue;            // old checkpoints persist the buffer
    if (name == "lm_head.weight" && c.tie_word_embeddings) continue;  // tied: transformers ignores it
    fail("{}: unexpected tensor '{}' {} in {}: a {} config has no such parameter", ck.dir().string(), name,
         shape_str(ck.info(name).shape), ck.file_of(name).path().filename().string(), lineage_name(c.lineage));
  }
}

}  // namespace opensci
