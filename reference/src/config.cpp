#include "opensci/config.hpp"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "opensci/error.hpp"

namespace opensci {
namespace {

using nlohmann::json;

int64_t required_int(const json& j, const char* key, const std::string& source) {
  if (!j.contains(key) || j[key].is_null()) fail("{}: config is missing required key '{}'", source, key);
  if (!j[key].is_number_integer() || j[key].get<int64_t>() <= 0)
    fail("{}: config key '{}' must be a positive integer, found {}", source, key, j[key].dump());
  return j[key].get<int64_t>();
}

int64_t optional_int(const json& j, const char* key, int64_t fallback, const std::string& source) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  if (!j[key].is_number_integer() || j[key].get<int64_t>() < 0)
    fail("{}: config key '{}' must be a non-negative integer, found {}", source, key, j[key].dump());
  return j[key].get<int64_t>();
}

bool optional_bool(const json& j, const char* key, bool fallback, const std::string& source) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  if (!j[key].is_boolean()) fail("{}: config key '{}' must be true or false, found {}", source, key, j[key].dump());
  return j[key].get<bool>();
}

double optional_number(const json& j, const char* key, double fallback, const std::string& source) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  if (!j[key].is_number()) fail("{}: config key '{}' must be a number, found {}", source, key, j[key].dump());
  return j[key].get<double>();
}

// rope_theta lives top-level in 4.x configs and inside rope_parameters in 5.x configs.
double parse_rope_theta(const json& j, const std::string& source) {
  std::optional<double> top, nested;
  if (j.contains("rope_theta") && !j["rope_theta"].is_null()) top = optional_number(j, "rope_theta", 0, source);
  for (const char* key : {"rope_parameters", "rope_scaling"}) {
    if (!j.contains(key) || j[key].is_null()) continue;
    const auto& rp = j[key];
    if (!rp.is_object()) fail("{}: config key '{}' must be an object or null", source, key);
    const auto type = rp.value("rope_type", rp.value("type", std::string("default")));
    if (type != "default")
      fail("{}: {}.rope_type '{}' is not supported by the reference (only 'default' RoPE)", source, key, type);
    if (rp.contains("rope_theta")) nested = optional_number(rp, "rope_theta", 0, source);
  }
  if (top && nested && *top != *nested)
    fail("{}: rope_theta {} disagrees with rope_parameters.rope_theta {}", source, *top, *nested);
  const double theta = top ? *top : nested ? *nested : 10000.0;
  if (!(theta > 1.0)) fail("{}: rope_theta must be > 1, found {}", source, theta);
  return theta;
}

}  // namespace

std::string_view lineage_name(Lineage lineage) {
  switch (lineage) {
    case Lineage::OpenSciRef: return "opensci-ref";
    case Lineage::OpenSciQwen3: return "opensci-qwen3";
    case Lineage::Qwen3: return "qwen3";
    case Lineage::Qwen3Moe: return "qwen3-moe";
    case Lineage::OpenSciMoe: return "opensci-moe";
  }
  return "?";
}

bool ModelConfig::is_sparse_layer(int64_t layer) const {
  if (!is_moe()) return false;
  if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end()) return false;
  return (layer + 1) % decoder_sparse_step == 0;
}

std::string ModelConfig::q_norm_name() const { return lineage == Lineage::OpenSciRef ? "q_layernorm" : "q_norm"; }
std::string ModelConfig::k_norm_name() const { return lineage == Lineage::OpenSciRef ? "k_layernorm" : "k_norm"; }

ModelConfig parse_config(const json& j, const std::string& source) {
  if (!j.is_object()) fail("{}: config must be a JSON object", source);
  ModelConfig c;
  c.source = source;
  if (!j.contains("model_type") || !j["model_type"].is_string())
    fail("{}: config is missing required key 'model_type'", source);
  c.model_type = j["model_type"].get<std::string>();
  if (c.model_type == "opensci") {
    c.lineage = j.contains("qk_layernorm") ? Lineage::OpenSciRef : Lineage::OpenSciQwen3;
  } else if (c.model_type == "qwen3") {
    c.lineage = Lineage::Qwen3;
  } else if (c.model_type == "qwen3_moe") {
    c.lineage = Lineage::Qwen3Moe;
  } else if (c.model_type == "opensci_moe") {
    c.lineage = Lineage::OpenSciMoe;
  } else {
    fail("{}: model_type '{}' is not an OpenSci model (expected opensci, qwen3, qwen3_moe or opensci_moe)", source,
         c.model_type);
  }
  const auto act = j.value("hidden_act", std::string("silu"));
  if (act != "silu") fail("{}: hidden_act '{}' is not supported (OpenSci MLPs are SwiGLU: 'silu')", source, act);

  c.vocab_size = required_int(j, "vocab_size", source);
  c.hidden_size = required_int(j, "hidden_size", source);
  c.num_layers = required_int(j, "num_hidden_layers", source);
  c.num_heads = required_int(j, "num_attention_heads", source);
  const bool moe = c.lineage == Lineage::Qwen3Moe || c.lineage == Lineage::OpenSciMoe;
  // Qwen3MoeConfig defaults an absent key to 4 (an explicit null means "same as heads").
  // Qwen3Config defaults an absent key to 32, Qwen3MoeConfig to 4 (an explicit null means "same as heads").
  const bool kv_absent = !j.contains("num_key_value_heads");
  const int64_t kv_default = kv_absent && c.lineage == Lineage::Qwen3Moe ? 4
                             : kv_absent && c.lineage == Lineage::Qwen3  ? 32
                                                                         : c.num_heads;
  c.num_kv_heads = optional_int(j, "num_key_value_heads", kv_default, source);
  if (c.num_kv_heads == 0 || c.num_heads % c.num_kv_heads != 0)
    fail("{}: num_attention_heads {} is not a multiple of num_key_value_heads {}", source, c.num_heads, c.num_kv_heads);
  if (j.contains("head_dim") && !j["head_dim"].is_null()) {
    c.head_dim = required_int(j, "head_dim", source);
  } else {
    if (c.hidden_size % c.num_heads != 0)
      fail("{}: no head_dim and hidden_size {} is not divisible by num_attention_heads {}", source, c.hidden_size,
           c.num_heads);
    // The Qwen3 config classes (and the OpenSci-Qwen3 one built on them) default head_dim to 128;
    // open-sci-ref (Llama-derived) uses hidden / heads.
    const bool qwen3_class = c.lineage == Lineage::Qwen3 || c.lineage == Lineage::OpenSciQwen3 || c.lineage == Lineage::Qwen3Moe;
    c.head_dim = qwen3_class ? 128 : c.hidden_size / c.num_heads;
  }
  if (c.head_dim % 2 != 0) fail("{}: head_dim {} must be even for rotate-half RoPE", source, c.head_dim);
  c.max_position_embeddings = optional_int(j, "max_position_embeddings", 4096, source);
  const bool qwen_family = c.lineage != Lineage::OpenSciRef;
  c.rms_norm_eps = optional_number(j, "rms_norm_eps", qwen_family ? 1e-6 : 1e-5, source);
  c.rope_theta = parse_rope_theta(j, source);
  c.attention_bias = optional_bool(j, "attention_bias", false, source);
  const bool opensci = c.model_type == "opensci" || c.model_type == "opensci_moe";
  // Native Qwen3 / Qwen3-MoE MLPs are bias-free whatever the config says (bias=False in transformers).
  c.mlp_bias = opensci ? optional_bool(j, "mlp_bias", true, source) : false;
  c.qk_norm = c.lineage == Lineage::OpenSciRef ? optional_bool(j, "qk_layernorm", false, source) : true;
  // OpenSci-Qwen3's config class inherits Qwen3Config's tie_word_embeddings=False.
  c.tie_word_embeddings = optional_bool(j, "tie_word_embeddings", opensci && c.lineage != Lineage::OpenSciQwen3, source);
  c.initializer_range = optional_number(j, "initializer_range", 0.02, source);

  if (moe) {
    if (optional_bool(j, "use_sliding_window", false, source))
      fail("{}: use_sliding_window is true; the reference implements full causal attention only", source);
    // transformers 5.x writes num_local_experts, 4.x num_experts (hazard H13): accept both.
    const int64_t n4 = optional_int(j, "num_experts", 0, source), n5 = optional_int(j, "num_local_experts", 0, source);
    if (n4 != 0 && n5 != 0 && n4 != n5)
      fail("{}: num_experts {} disagrees with num_local_experts {} (the 4.x and 5.x spellings of one key)", source, n4,
           n5);
    c.num_experts = n4 != 0 ? n4 : n5;
    if (c.num_experts == 0)
      fail("{}: MoE config is missing required key 'num_experts' (or its 5.x spelling 'num_local_experts')", source);
    c.num_experts_per_tok = required_int(j, "num_experts_per_tok", source);
    if (c.num_experts_per_tok > c.num_experts)
      fail("{}: num_experts_per_tok {} exceeds num_experts {}", source, c.num_experts_per_tok, c.num_experts);
    c.moe_intermediate_size = required_int(j, "moe_intermediate_size", source);
    c.decoder_sparse_step = optional_int(j, "decoder_sparse_step", 1, source);
    if (c.decoder_sparse_step == 0) fail("{}: decoder_sparse_step must be >= 1", source);
    if (j.contains("mlp_only_layers") && !j["mlp_only_layers"].is_null()) {
      if (!j["mlp_only_layers"].is_array()) fail("{}: mlp_only_layers must be a list of layer indices", source);
      for (const auto& v : j["mlp_only_layers"]) {
        if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= c.num_layers)
          fail("{}: mlp_only_layers entry {} is not a layer index in [0, {})", source, v.dump(), c.num_layers);
        c.mlp_only_layers.push_back(v.get<int64_t>());
      }
    }
    c.norm_topk_prob = optional_bool(j, "norm_topk_prob", false, source);
    bool any_dense = false;
    for (int64_t l = 0; l < c.num_layers; ++l) any_dense |= !c.is_sparse_layer(l);
    c.intermediate_size = any_dense ? required_int(j, "intermediate_size", source)
                                    : optional_int(j, "intermediate_size", 0, source);
  } else {
    c.intermediate_size = required_int(j, "intermediate_size", source);
  }
  return c;
}

ModelConfig load_config(const std::filesystem::path& config_json) {
  std::ifstream in(config_json);
  if (!in) fail("{}: cannot open config", config_json.string());
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    fail("{}: config is not valid JSON: {}", config_json.string(), e.what());
  }
  return parse_config(j, config_json.string());
}

}  // namespace opensci
