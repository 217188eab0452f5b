// What the keys of an OpenSci / Qwen3 / Qwen3-MoE config.json mean to the forward pass.
//
// Lineage rule (both OpenSci lineages use model_type "opensci"):
//   - a config with the key `qk_layernorm` is the open-sci-ref lineage (Llama-derived, the
//     published models): q/k norms only when qk_layernorm is true, named q_layernorm/k_layernorm;
//   - model_type "opensci" without that key is the Qwen3-based lineage: q_norm/k_norm always;
//   - model_type "qwen3" / "qwen3_moe" are the native transformers models: their MLPs never
//     have biases (transformers hard-codes bias=False and ignores an `mlp_bias` key);
//   - model_type "opensci_moe" is the OpenSci-flavoured Qwen3-MoE remote code
//     (fixtures/remote_code/opensci_moe): Qwen3-MoE routing and experts (no expert biases),
//     q_norm/k_norm always, q/k/v/o biases when attention_bias, and `mlp_bias` on the dense
//     (mlp_only_layers / decoder_sparse_step) layers as in the OpenSci-Qwen3 lineage.
// Defaults (used only when a key is absent; each is the value the model was trained with):
//   num_key_value_heads = num_attention_heads (qwen3: 32, qwen3_moe: 4, their config classes' defaults);
//   head_dim = hidden_size / num_attention_heads for open-sci-ref, 128 for the Qwen3 config classes
//   (qwen3, qwen3_moe and the OpenSci-Qwen3 lineage);
//   rms_norm_eps = 1e-6 (Qwen3 family) / 1e-5 (open-sci-ref); rope_theta = 10000;
//   attention_bias = false; mlp_bias = true for "opensci" / "opensci_moe";
//   tie_word_embeddings = true for open-sci-ref and opensci_moe remote code (the 4.x PretrainedConfig default the
//   published models rely on; see hazard H5 — transformers 5.x changed it, so our toy configs
//   always write the key), false for native "qwen3" / "qwen3_moe" and the OpenSci-Qwen3 lineage
//   (Qwen3Config's default in 4.51+ and 5.x).
// MoE keys (Qwen3-MoE semantics; "qwen3_moe" and "opensci_moe"):
//   num_experts (4.x spelling) or num_local_experts (5.x spelling, hazard H13) — both present
//   and different is an error; num_experts_per_tok (top-k), moe_intermediate_size (I of one
//   expert), decoder_sparse_step = 1, mlp_only_layers = [], norm_topk_prob = false;
//   intermediate_size is required only when some layer is dense. use_sliding_window = true is
//   refused (the reference has no sliding-window attention).
// Required: vocab_size, hidden_size, intermediate_size (dense models), num_hidden_layers,
//   num_attention_heads. rope_theta may be top-level (4.x) or in rope_parameters (5.x).
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

namespace opensci {

enum class Lineage {
  OpenSciRef,    // Llama-derived remote code of the published open-sci-ref models
  OpenSciQwen3,  // Qwen3 + mlp_bias (modular OpenSci, LUMI conversion)
  Qwen3,         // native transformers qwen3
  Qwen3Moe,      // native transformers qwen3_moe
  OpenSciMoe,    // OpenSci-flavoured Qwen3-MoE remote code (model_type "opensci_moe")
};

std::string_view lineage_name(Lineage lineage);

struct ModelConfig {
  std::string source;  // file the config came from, for messages
  std::string model_type;
  Lineage lineage = Lineage::OpenSciRef;

  int64_t vocab_size = 0;
  int64_t hidden_size = 0;        // H
  int64_t intermediate_size = 0;  // I of dense MLPs
  int64_t num_layers = 0;
  int64_t num_heads = 0;     // query heads
  int64_t num_kv_heads = 0;  // key/value heads (GQA when < num_heads)
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  bool attention_bias = false;  // q/k/v/o biases
  bool mlp_bias = false;        // gate/up/down biases (dense MLPs; experts never have biases)
  bool qk_norm = false;         // per-head RMSNorm on q and k before RoPE
  bool tie_word_embeddings = true;
  double initializer_range = 0.02;

  // Mixture of experts (Qwen3-MoE semantics); num_experts == 0 for dense models.
  int64_t num_experts = 0;
  int64_t num_experts_per_tok = 0;    // top-k
  int64_t moe_intermediate_size = 0;  // I of one expert
  int64_t decoder_sparse_step = 1;
  std::vector<int64_t> mlp_only_layers;
  bool norm_topk_prob = false;

  bool is_moe() const { return num_experts > 0; }
  // transformers' rule: sparse unless listed in mlp_only_layers, and (layer+1) % step == 0.
  bool is_sparse_layer(int64_t layer) const;
  // Parameter names of the per-head norms: "q_layernorm" (open-sci-ref) or "q_norm".
  std::string q_norm_name() const;
  std::string k_norm_name() const;
};

ModelConfig parse_config(const nlohmann::json& json, const std::string& source);
ModelConfig load_config(const std::filesystem::path& config_json);

}  // namespace opensci
