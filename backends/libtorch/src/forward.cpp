// The OpenSci forward through ATen ops, module by module as transformers' eager code computes it
// (Llama/Qwen3 RMSNorm, rotary embedding, eager attention, SwiGLU MLP, Qwen3-MoE 4.x block).
// Layout and names follow reference/src/forward.cpp so the two read side by side.
#include "opensci/libtorch/forward.hpp"

#include <fmt/format.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <limits>
#include <map>

#include "opensci/error.hpp"
#include "opensci/gpu/resource_groups.hpp"
#include "opensci/ops.hpp"

namespace opensci::libtorch {
namespace {

using torch::Tensor;

torch::Dtype parse_dtype(const std::string& name) {
  if (name == "fp32") return torch::kFloat32;
  if (name == "bf16") return torch::kBFloat16;
  if (name == "fp64") return torch::kFloat64;
  fail("libtorch forward: dtype '{}' is not fp32, bf16 or fp64", name);
}

torch::Device parse_device(const std::string& name) {
  if (name == "cpu") return torch::kCPU;
  if (name == "cuda") {
    if (!torch::cuda::is_available())
      fail("libtorch forward: device 'cuda' requested, but this libtorch ({}) sees no CUDA/ROCm device", TORCH_VERSION);
    // The GPU CTest allocated to this test (RESOURCE_GROUPS gpus:1), else OPENSCI_GPU_DEVICE, else 0.
    const auto gpu = gpu::select_gpu_from_environment(static_cast<int>(torch::cuda::device_count()));
    return {torch::kCUDA, static_cast<c10::DeviceIndex>(gpu.device)};
  }
  fail("libtorch forward: device '{}' is not cpu or cuda", name);
}

std::vector<float> to_host_f32(const Tensor& t) {
  const Tensor c = t.to(torch::kCPU, torch::kFloat32).contiguous();
  return {c.data_ptr<float>(), c.data_ptr<float>() + c.numel()};
}

struct TorchForward {
  const Checkpoint& ck;
  const ModelConfig& c;
  const TokenBatch& tok;
  const TorchForwardOptions& opt;
  ForwardResult& result;
  torch::Dtype dtype;
  torch::Device device;
  // transformers upcasts norms and softmax to fp32; an fp64 model keeps fp64 there instead, so the
  // fp64 run stays a full-precision cross-check of the golden reference.
  torch::Dtype compute_dtype;
  std::map<std::string, Tensor> params;  // HF name -> parameter in the model dtype, on the device

  // model.to(dtype): every parameter converted once (exact for a bf16 checkpoint in bf16).
  void load_parameters() {
    for (const auto& [name, shape] : expected_parameters(c, detect_expert_layouts(ck))) {
      Tensor t;
      if (dtype == torch::kFloat64) {
        auto v = ck.read<double>(name, shape);
        t = torch::from_blob(v.data(), shape, torch::kFloat64).clone();
      } else {
        auto v = ck.read<float>(name, shape);
        t = torch::from_blob(v.data(), shape, torch::kFloat32).clone();
      }
      params.emplace(name, t.to(device, dtype));
    }
  }

  const Tensor& p(const std::string& name) const {
    auto it = params.find(name);
    if (it == params.end()) fail("libtorch forward: parameter '{}' not loaded ({})", name, c.source);
    return it->second;
  }
  Tensor p_if(bool present, const std::string& name) const { return present ? p(name) : Tensor(); }

  void record(std::string name, const Tensor& x) {
    if (opt.capture_hidden) result.hiddens.emplace_back(std::move(name), to_host_f32(x));
  }

  static Tensor linear(const Tensor& x, const Tensor& w, const Tensor& b = {}) {
    return b.defined() ? torch::linear(x, w, b) : torch::linear(x, w);
  }

  // Llama/Qwen3 RMSNorm: variance in fp32, normalised row cast back, then the weight multiply.
  Tensor rms_norm(const Tensor& x, const Tensor& w) const {
    Tensor xf = x.to(compute_dtype);
    const Tensor variance = xf.pow(2).mean(-1, /*keepdim=*/true);
    xf = xf * torch::rsqrt(variance + c.rms_norm_eps);
    return w * xf.to(x.scalar_type());
  }

  static Tensor rotate_half(const Tensor& x) {
    const int64_t half = x.size(-1) / 2;
    return torch::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
  }

  // down(silu(gate(x)) * up(x))
  static Tensor swiglu_mlp(const Tensor& x, const Tensor& gw, const Tensor& uw, const Tensor& dw, const Tensor& gb = {},
                           const Tensor& ub = {}, const Tensor& db = {}) {
    return linear(torch::silu(linear(x, gw, gb)) * linear(x, uw, ub), dw, db);
  }

  // Qwen3MoeSparseMoeBlock (transformers 4.x): fp32 softmax, topk, optional renorm, weights cast to
  // the model dtype, then per expert hit: expert(x) * weight, index_add_ into a zero tensor.
  Tensor moe_mlp(const Tensor& h, const std::string& pre, ExpertLayout layout) const {
    const int64_t H = c.hidden_size, E = c.num_experts, K = c.num_experts_per_tok, I = c.moe_intermediate_size;
    const Tensor hs = h.reshape({-1, H});
    const Tensor router_logits = linear(hs, p(pre + "gate.weight"));
    Tensor routing = torch::softmax(router_logits, 1, compute_dtype);
    auto [weights, selected] = torch::topk(routing, K, -1);
    if (c.norm_topk_prob) weights = weights / weights.sum(-1, /*keepdim=*/true);
    weights = weights.to(hs.scalar_type());
    Tensor out = torch::zeros_like(hs);
    const Tensor expert_mask = torch::one_hot(selected, E).permute({2, 1, 0});  // [E, K, T]
    for (int64_t e = 0; e < E; ++e) {
      const auto where = torch::where(expert_mask[e]);
      const Tensor& slot = where[0];
      const Tensor& top_x = where[1];
      if (top_x.numel() == 0) continue;
      const Tensor x = hs.index_select(0, top_x);
      Tensor y;
      if (layout == ExpertLayout::Fused) {
        const Tensor gate_up = p(pre + "experts.gate_up_proj")[e];  // [2I, H]: gate rows, then up rows
        y = swiglu_mlp(x, gate_up.slice(0, 0, I), gate_up.slice(0, I, 2 * I), p(pre + "experts.down_proj")[e]);
      } else {
        const auto ex = fmt::format("{}experts.{}.", pre, e);
        y = swiglu_mlp(x, p(ex + "gate_proj.weight"), p(ex + "up_proj.weight"), p(ex + "down_proj.weight"));
      }
      y = y * weights.index({top_x, slot}).unsqueeze(-1);
      out.index_add_(0, top_x, y.to(hs.scalar_type()));
    }
    return out.reshape(h.sizes());
  }

  void run() {
    const int64_t B = tok.batch, S = tok.seq, D = c.head_dim, NH = c.num_heads, NKV = c.num_kv_heads;
    const auto i64 = torch::TensorOptions().dtype(torch::kInt64);
    const Tensor ids = torch::from_blob(const_cast<int64_t*>(tok.input_ids.data()), {B, S}, i64).to(device);
    const Tensor mask = torch::from_blob(const_cast<int64_t*>(tok.attention_mask.data()), {B, S}, i64).to(device);
    const Tensor pos = torch::from_blob(const_cast<int64_t*>(tok.position_ids.data()), {B, S}, i64).to(device);
    const auto layouts = detect_expert_layouts(ck);

    // Rotary tables (LlamaRotaryEmbedding): inv_freq in fp32, freqs = inv_freq x positions in fp32,
    // cos/sin in fp32, cast to the model dtype.                       cos, sin: [B, 1, S, D]
    const auto rope_dtype = dtype == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
    const Tensor inv_freq = torch::tensor(ops::rope_inv_freq(D, c.rope_theta)).to(device, rope_dtype);
    const Tensor freqs = pos.to(rope_dtype).unsqueeze(-1) * inv_freq;
    const Tensor emb = torch::cat({freqs, freqs}, -1);
    const Tensor cos = emb.cos().to(dtype).unsqueeze(1), sin = emb.sin().to(dtype).unsqueeze(1);

    // Additive mask as transformers' eager path builds it: 0 where key j <= query i and j is a
    // token, finfo(dtype).min elsewhere.                                         [B, 1, S, S]
    const Tensor causal = torch::ones({S, S}, torch::TensorOptions().dtype(torch::kBool).device(device)).tril();
    const Tensor allowed = causal.unsqueeze(0) & mask.to(torch::kBool).unsqueeze(1);
    const double min_value = dtype == torch::kFloat64   ? std::numeric_limits<double>::lowest()
                             : dtype == torch::kFloat32 ? static_cast<double>(std::numeric_limits<float>::lowest())
                                                        : -3.3895313892515355e38;  // finfo(bfloat16).min
    const Tensor additive_mask = torch::zeros({B, S, S}, torch::TensorOptions().dtype(dtype).device(device))
                                     .masked_fill(~allowed, min_value)
                                     .unsqueeze(1);
    const double scaling = 1.0 / std::sqrt(static_cast<double>(D));

    Tensor x = torch::embedding(p("model.embed_tokens.weight"), ids);  // [B, S, H]
    record("hidden.embed", x);
    for (int64_t l = 0; l < c.num_layers; ++l) {
      const auto pre = fmt::format("model.layers.{}.", l);
      const auto sa = pre + "self_attn.";
      const bool ab = c.attention_bias;
      // --- attention block ---
      const Tensor h = rms_norm(x, p(pre + "input_layernorm.weight"));
      Tensor q = linear(h, p(sa + "q_proj.weight"), p_if(ab, sa + "q_proj.bias")).view({B, S, NH, D});
      Tensor k = linear(h, p(sa + "k_proj.weight"), p_if(ab, sa + "k_proj.bias")).view({B, S, NKV, D});
      Tensor v = linear(h, p(sa + "v_proj.weight"), p_if(ab, sa + "v_proj.bias")).view({B, S, NKV, D});
      if (c.qk_norm) {
        q = rms_norm(q, p(sa + c.q_norm_name() + ".weight"));
        k = rms_norm(k, p(sa + c.k_norm_name() + ".weight"));
      }
      q = q.transpose(1, 2);  // [B, NH, S, D]
      k = k.transpose(1, 2);  // [B, NKV, S, D]
      v = v.transpose(1, 2);
      q = q * cos + rotate_half(q) * sin;
      k = k * cos + rotate_half(k) * sin;
      // repeat_kv: kv head j serves query heads j*group .. (j+1)*group-1
      const int64_t group = NH / NKV;
      k = k.unsqueeze(2).expand({B, NKV, group, S, D}).reshape({B, NH, S, D});
      v = v.unsqueeze(2).expand({B, NKV, group, S, D}).reshape({B, NH, S, D});
      Tensor scores = torch::matmul(q, k.transpose(2, 3)) * scaling + additive_mask;
      const Tensor probs = torch::softmax(scores, -1, compute_dtype).to(dtype);
      const Tensor att = torch::matmul(probs, v).transpose(1, 2).reshape({B, S, NH * D});
      const Tensor block = linear(att, p(sa + "o_proj.weight"), p_if(ab, sa + "o_proj.bias"));
      record(fmt::format("attn.{}", l), block);
      x = x + block;
      // --- MLP block ---
      const Tensor h2 = rms_norm(x, p(pre + "post_attention_layernorm.weight"));
      Tensor mlp;
      if (c.is_sparse_layer(l)) {
        mlp = moe_mlp(h2, pre + "mlp.", layouts[static_cast<size_t>(l)]);
      } else {
        const auto mp = pre + "mlp.";
        const bool mb = c.mlp_bias;
        mlp =
            swiglu_mlp(h2, p(mp + "gate_proj.weight"), p(mp + "up_proj.weight"), p(mp + "down_proj.weight"),
                       p_if(mb, mp + "gate_proj.bias"), p_if(mb, mp + "up_proj.bias"), p_if(mb, mp + "down_proj.bias"));
      }
      record(fmt::format("mlp.{}", l), mlp);
      x = x + mlp;
      record(fmt::format("hidden.layer.{}", l), x);
    }
    const Tensor hf = rms_norm(x, p("model.norm.weight"));
    record("hidden.final_norm", hf);
    const Tensor logits = linear(hf, p(c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight"));
    result.logits = to_host_f32(logits);
  }
};

}  // namespace

ForwardResult forward(const Checkpoint& ck, const TokenBatch& tokens, const TorchForwardOptions& options) {
  const auto& c = ck.config();
  validate_checkpoint(ck);
  tokens.validate(c.vocab_size, ck.dir().string());
  const torch::NoGradGuard no_grad;
  ForwardResult result;
  result.batch = tokens.batch;
  result.seq = tokens.seq;
  result.vocab = c.vocab_size;
  result.hidden = c.hidden_size;
  const auto dtype = parse_dtype(options.dtype);
  TorchForward f{ck,
                 c,
                 tokens,
                 options,
                 result,
                 dtype,
                 parse_device(options.device),
                 dtype == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32,
                 {}};
  f.load_parameters();
  f.run();
  return result;
}

std::string torch_version() { return TORCH_VERSION; }

bool cuda_available() { return torch::cuda::is_available(); }

}  // namespace opensci::libtorch
