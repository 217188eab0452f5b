// HF and Megatron-core layouts as maps onto the canonical (HF per-expert) tensors.
#include "layout.hpp"

#include <fmt/format.h>

#include "opensci/error.hpp"

namespace opensci::convert {
namespace {

int64_t numel(const std::vector<int64_t>& shape) { return element_count(shape); }

// The whole canonical tensor.
Segment whole(const std::string& canonical, const std::vector<int64_t>& shape) { return {canonical, 0, numel(shape)}; }

// Rows [r0, r1) of a canonical [rows, cols] matrix (cols = 1 for a vector).
Segment rows(const std::string& canonical, int64_t cols, int64_t r0, int64_t r1) {
  return {canonical, r0 * cols, (r1 - r0) * cols};
}

// Columns [c0, c0 + width) of every row of a canonical [nrows, cols] matrix: one segment per row.
void append_columns(std::vector<Segment>& out, const std::string& canonical, int64_t nrows, int64_t cols, int64_t c0,
                    int64_t width) {
  for (int64_t r = 0; r < nrows; ++r) out.push_back({canonical, r * cols + c0, width});
}

void require_divisible(const ModelConfig& c, const char* what, int64_t value, int tp) {
  if (value % tp != 0)
    fail("{}: {} = {} does not split over tensor-parallel size {} (Megatron needs it divisible)", c.source, what,
         value, tp);
}

}  // namespace

std::vector<TensorSpec> hf_layout(const ModelConfig& c, const std::vector<ExpertLayout>& layouts) {
  std::vector<TensorSpec> specs;
  const int64_t H = c.hidden_size, I = c.moe_intermediate_size, E = c.num_experts;
  for (const auto& [name, shape] : expected_parameters(c, layouts)) {
    TensorSpec s{0, name, {}, shape, false, {}};
    const auto experts_at = name.find(".mlp.experts.");
    if (experts_at != std::string::npos && (name.ends_with("experts.gate_up_proj") || name.ends_with("experts.down_proj"))) {
      const auto pre = name.substr(0, experts_at) + ".mlp.experts.";
      const bool gate_up = name.ends_with("gate_up_proj");
      for (int64_t j = 0; j < E; ++j) {
        if (gate_up) {
          s.segments.push_back({fmt::format("{}{}.gate_proj.weight", pre, j), 0, I * H});
          s.segments.push_back({fmt::format("{}{}.up_proj.weight", pre, j), 0, I * H});
        } else {
          s.segments.push_back({fmt::format("{}{}.down_proj.weight", pre, j), 0, H * I});
        }
      }
    } else {
      s.segments.push_back(whole(name, shape));
    }
    specs.push_back(std::move(s));
  }
  return specs;
}

std::vector<TensorSpec> megatron_layout(const ModelConfig& c, int tp, MegatronExperts experts) {
  if (tp < 1) fail("tensor-parallel size must be >= 1, got {}", tp);
  const int64_t V = c.vocab_size, H = c.hidden_size, D = c.head_dim, NH = c.num_heads, NKV = c.num_kv_heads;
  const int64_t QPG = NH / NKV;  // query heads per group
  require_divisible(c, "vocab_size", V, tp);
  require_divisible(c, "num_key_value_heads (query groups)", NKV, tp);
  bool any_dense = false, any_sparse = false;
  for (int64_t l = 0; l < c.num_layers; ++l) (c.is_sparse_layer(l) ? any_sparse : any_dense) = true;
  if (any_dense) require_divisible(c, "intermediate_size", c.intermediate_size, tp);
  if (any_sparse) require_divisible(c, "moe_intermediate_size", c.moe_intermediate_size, tp);

  const int64_t Vr = V / tp, Gr = NKV / tp, QDr = NH * D / tp;
  std::vector<TensorSpec> specs;
  for (int r = 0; r < tp; ++r) {
    const bool replica = r > 0;
    auto add = [&](std::string name, std::vector<int64_t> shape, std::vector<Segment> segments, bool replicated,
                   std::vector<std::string> aliases = {}) {
      specs.push_back({r, std::move(name), std::move(aliases), std::move(shape), replicated && replica,
                       std::move(segments)});
    };
    auto replicated = [&](std::string name, const std::string& hf, std::vector<int64_t> shape,
                          std::vector<std::string> aliases = {}) {
      add(std::move(name), shape, {whole(hf, shape)}, true, std::move(aliases));
    };
    add("embedding.word_embeddings.weight", {Vr, H}, {rows("model.embed_tokens.weight", H, r * Vr, (r + 1) * Vr)},
        false);
    if (!c.tie_word_embeddings)
      add("output_layer.weight", {Vr, H}, {rows("lm_head.weight", H, r * Vr, (r + 1) * Vr)}, false);
    replicated("decoder.final_layernorm.weight", "model.norm.weight", {H});

    for (int64_t l = 0; l < c.num_layers; ++l) {
      const auto hf = fmt::format("model.layers.{}.", l);
      const auto mg = fmt::format("decoder.layers.{}.", l);
      // --- attention: linear_qkv per query group: [q heads of the group; k head; v head] ---
      for (const bool bias : {false, true}) {
        if (bias && !c.attention_bias) continue;
        const char* suffix = bias ? "bias" : "weight";
        const int64_t cols = bias ? 1 : H;
        std::vector<Segment> segs;
        for (int64_t lg = 0; lg < Gr; ++lg) {
          const int64_t g = r * Gr + lg;
          segs.push_back(rows(hf + "self_attn.q_proj." + suffix, cols, g * QPG * D, (g + 1) * QPG * D));
          segs.push_back(rows(hf + "self_attn.k_proj." + suffix, cols, g * D, (g + 1) * D));
          segs.push_back(rows(hf + "self_attn.v_proj." + suffix, cols, g * D, (g + 1) * D));
        }
        std::vector<int64_t> shape = {Gr * (QPG + 2) * D};
        if (!bias) shape.push_back(H);
        add(mg + "self_attention.linear_qkv." + suffix, shape, std::move(segs), false);
      }
      replicated(mg + "self_attention.linear_qkv.layer_norm_weight", hf + "input_layernorm.weight", {H},
                 {mg + "input_layernorm.weight"});
      {
        std::vector<Segment> segs;
        append_columns(segs, hf + "self_attn.o_proj.weight", H, NH * D, r * QDr, QDr);
        add(mg + "self_attention.linear_proj.weight", {H, QDr}, std::move(segs), false);
      }
      if (c.attention_bias) replicated(mg + "self_attention.linear_proj.bias", hf + "self_attn.o_proj.bias", {H});
      if (c.qk_norm) {
        replicated(mg + "self_attention.q_layernorm.weight", hf + "self_attn." + c.q_norm_name() + ".weight", {D});
        replicated(mg + "self_attention.k_layernorm.weight", hf + "self_attn." + c.k_norm_name() + ".weight", {D});
      }
      // --- MLP: linear_fc1 = [gate slice; up slice] of this rank, linear_fc2 splits columns ---
      // `fc1`/`fc2` are the Megatron weight names; biases (dense layers only) sit beside them.
      auto swiglu = [&](const std::string& fc1, const std::string& fc2, const std::string& hf_mlp, int64_t I,
                        bool bias) {
        const int64_t Ir = I / tp;
        add(fc1, {2 * Ir, H},
            {rows(hf_mlp + "gate_proj.weight", H, r * Ir, (r + 1) * Ir),
             rows(hf_mlp + "up_proj.weight", H, r * Ir, (r + 1) * Ir)},
            false);
        if (bias)
          add(fc1.substr(0, fc1.size() - 6) + "bias", {2 * Ir},
              {rows(hf_mlp + "gate_proj.bias", 1, r * Ir, (r + 1) * Ir),
               rows(hf_mlp + "up_proj.bias", 1, r * Ir, (r + 1) * Ir)},
              false);
        std::vector<Segment> segs;
        append_columns(segs, hf_mlp + "down_proj.weight", H, I, r * Ir, Ir);
        add(fc2, {H, Ir}, std::move(segs), false);
        if (bias) replicated(fc2.substr(0, fc2.size() - 6) + "bias", hf_mlp + "down_proj.bias", {H});
      };
      if (!c.is_sparse_layer(l)) {
        replicated(mg + "mlp.linear_fc1.layer_norm_weight", hf + "post_attention_layernorm.weight", {H},
                   {mg + "pre_mlp_layernorm.weight"});
        swiglu(mg + "mlp.linear_fc1.weight", mg + "mlp.linear_fc2.weight", hf + "mlp.", c.intermediate_size,
               c.mlp_bias);
      } else {
        const int64_t E = c.num_experts;
        replicated(mg + "pre_mlp_layernorm.weight", hf + "post_attention_layernorm.weight", {H});
        replicated(mg + "mlp.router.weight", hf + "mlp.gate.weight", {E, H});
        for (int64_t j = 0; j < E; ++j) {
          const bool seq = experts == MegatronExperts::Sequential;
          const auto fc1 = seq ? fmt::format("{}mlp.experts.local_experts.{}.linear_fc1.weight", mg, j)
                               : fmt::format("{}mlp.experts.linear_fc1.weight{}", mg, j);
          const auto fc2 = seq ? fmt::format("{}mlp.experts.local_experts.{}.linear_fc2.weight", mg, j)
                               : fmt::format("{}mlp.experts.linear_fc2.weight{}", mg, j);
          swiglu(fc1, fc2, fmt::format("{}mlp.experts.{}.", hf, j), c.moe_intermediate_size, false);
        }
      }
    }
  }
  return specs;
}

}  // namespace opensci::convert
