// The OpenSci forward pass on the GPU, op for op the structure of reference/src/forward.cpp
// (Forward::run), with every op a launcher from ops.hpp and every linear a GEMM (gemm.hpp).
#include "opensci/gpu/forward.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <map>

#include "opensci/error.hpp"
#include "opensci/gpu/device.hpp"
#include "opensci/ops.hpp"

namespace opensci::gpu {
namespace {

struct ExpertWeights {
  const std::byte* gate = nullptr;  // [I, H]
  const std::byte* up = nullptr;    // [I, H]
  const std::byte* down = nullptr;  // [H, I]
};

// Activations of one forward, sized for `tokens` (grown, never shrunk).
struct Workspace {
  int64_t tokens = 0;
  DeviceBuffer ids, positions, mask;                // int64 [T]
  DeviceBuffer x, h, block;                         // [T, H]
  DeviceBuffer q, att, k, v;                        // [T, NH*D], [T, NKV*D]
  DeviceBuffer gate, up;                            // [T, max(I, I_moe)]
  DeviceBuffer logits;                              // [T, V]
  DeviceBuffer router, topk_expert, topk_weight;    // [T, E], [T, K] int32, [T, K] fp32
  DeviceBuffer offsets, token_of, slot_of, xin, y;  // [E+1], [T*K], [T*K], [T, H], [T, H]
};

bool is_norm_weight(const std::string& name) {
  return name.ends_with("norm.weight") || name.ends_with("layernorm.weight");
}

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char ch : s) h = (h ^ ch) * 0x100000001b3ULL;
  return h;
}

}  // namespace

struct GpuModel::Impl {
  ModelConfig config;
  GpuForwardOptions options;
  std::unique_ptr<Gemm> gemm;
  std::map<std::string, DeviceBuffer> params;       // HF name -> [shape] in the storage dtype
  std::vector<std::vector<ExpertWeights>> experts;  // [layer][expert]; empty for dense layers
  DeviceBuffer inv_freq;                            // [head_dim / 2] fp32
  size_t parameter_bytes = 0;
  Stream stream{};
  mutable Workspace ws;

  Impl(const ModelConfig& c, const GpuForwardOptions& o) : config(c), options(o) {
    const DeviceProbe probe = probe_device();
    if (!probe.available) fail("gpu forward: {}", probe.reason);
    if (o.device >= 0) OPENSCI_GPU_CHECK(rt::set_device(o.device));  // else the probe selected it
    gemm = std::make_unique<Gemm>(o.gemm);
    std::vector<float> inv;
    for (double f : ops::rope_inv_freq(c.head_dim, c.rope_theta)) inv.push_back(static_cast<float>(f));
    inv_freq = DeviceBuffer::from_host(inv);
  }

  DType dt() const { return options.dtype; }
  size_t esize() const { return dtype_size(options.dtype); }

  const std::byte* param(const std::string& name) const {
    auto it = params.find(name);
    if (it == params.end()) fail("gpu forward: parameter '{}' was not uploaded ({})", name, config.source);
    return static_cast<const std::byte*>(it->second.data());
  }
  const std::byte* param_if(bool present, const std::string& name) const { return present ? param(name) : nullptr; }

  void index_experts(const std::vector<ExpertLayout>& layouts) {
    const int64_t H = config.hidden_size, E = config.num_experts, I = config.moe_intermediate_size;
    experts.assign(static_cast<size_t>(config.num_layers), {});
    for (int64_t l = 0; l < config.num_layers; ++l) {
      if (!config.is_sparse_layer(l)) continue;
      const auto pre = fmt::format("model.layers.{}.mlp.experts.", l);
      auto& table = experts[static_cast<size_t>(l)];
      for (int64_t e = 0; e < E; ++e) {
        ExpertWeights w;
        if (layouts[static_cast<size_t>(l)] == ExpertLayout::Fused) {  // gate rows, then up rows, per expert
          w.gate = param(pre + "gate_up_proj") + static_cast<size_t>(e * 2 * I * H) * esize();
          w.up = w.gate + static_cast<size_t>(I * H) * esize();
          w.down = param(pre + "down_proj") + static_cast<size_t>(e * H * I) * esize();
        } else {
          const auto ex = fmt::format("{}{}.", pre, e);
          w.gate = param(ex + "gate_proj.weight");
          w.up = param(ex + "up_proj.weight");
          w.down = param(ex + "down_proj.weight");
        }
        table.push_back(w);
      }
    }
  }

  void ensure_workspace(int64_t T) {
    if (T <= ws.tokens) return;
    const auto& c = config;
    const auto n = [&](int64_t elements) { return static_cast<size_t>(elements) * esize(); };
    const int64_t I = std::max(c.intermediate_size, c.moe_intermediate_size);
    const int64_t E = c.num_experts, K = c.num_experts_per_tok;
    ws = Workspace{};
    ws.tokens = T;
    ws.ids = DeviceBuffer(sizeof(int64_t) * static_cast<size_t>(T));
    ws.positions = DeviceBuffer(sizeof(int64_t) * static_cast<size_t>(T));
    ws.mask = DeviceBuffer(sizeof(int64_t) * static_cast<size_t>(T));
    ws.x = DeviceBuffer(n(T * c.hidden_size));
    ws.h = DeviceBuffer(n(T * c.hidden_size));
    ws.block = DeviceBuffer(n(T * c.hidden_size));
    ws.q = DeviceBuffer(n(T * c.num_heads * c.head_dim));
    ws.att = DeviceBuffer(n(T * c.num_heads * c.head_dim));
    ws.k = DeviceBuffer(n(T * c.num_kv_heads * c.head_dim));
    ws.v = DeviceBuffer(n(T * c.num_kv_heads * c.head_dim));
    ws.gate = DeviceBuffer(n(T * I));
    ws.up = DeviceBuffer(n(T * I));
    ws.logits = DeviceBuffer(n(T * c.vocab_size));
    if (c.is_moe()) {
      ws.router = DeviceBuffer(n(T * E));
      ws.topk_expert = DeviceBuffer(sizeof(int32_t) * static_cast<size_t>(T * K));
      ws.topk_weight = DeviceBuffer(sizeof(float) * static_cast<size_t>(T * K));
      ws.offsets = DeviceBuffer(sizeof(int32_t) * static_cast<size_t>(E + 1));
      ws.token_of = DeviceBuffer(sizeof(int32_t) * static_cast<size_t>(T * K));
      ws.slot_of = DeviceBuffer(sizeof(int32_t) * static_cast<size_t>(T * K));
      ws.xin = DeviceBuffer(n(T * c.hidden_size));
      ws.y = DeviceBuffer(n(T * c.hidden_size));
    }
  }

  // out[rows, outf] = x . w^T (+ b): the bias pre-fills out and enters the GEMM with beta = 1,
  // so acc + bias rounds once, as torch's addmm.
  void linear(void* out, const void* x, const void* w, const void* b, int64_t rows, int64_t in, int64_t outf) const {
    if (b != nullptr) broadcast_rows(dt(), out, b, rows, outf, stream);
    gemm->linear(dt(), out, x, w, rows, in, outf, b != nullptr ? 1.0f : 0.0f, stream);
  }

  // SwiGLU MLP: down(silu(gate(h)) * up(h)), biases optional.          h, out: [rows, H]
  void swiglu_mlp(void* out, const void* h, int64_t rows, int64_t I, const void* gate_w, const void* up_w,
                  const void* down_w, const void* gate_b = nullptr, const void* up_b = nullptr,
                  const void* down_b = nullptr) const {
    const int64_t H = config.hidden_size;
    linear(ws.gate.data(), h, gate_w, gate_b, rows, H, I);
    linear(ws.up.data(), h, up_w, up_b, rows, H, I);
    swiglu(dt(), ws.gate.data(), ws.up.data(), rows * I, stream);
    linear(out, ws.gate.data(), down_w, down_b, rows, I, H);
  }

  // Qwen3-MoE block: router logits in the storage dtype, route (fp32 softmax, top-k, renorm),
  // bucket by expert, then per expert in increasing index: gather, SwiGLU, weighted scatter-add.
  void moe_mlp(void* out, const void* h, int64_t T, int64_t layer, const std::string& pre) const {
    const auto& c = config;
    const int64_t H = c.hidden_size, E = c.num_experts, K = c.num_experts_per_tok, I = c.moe_intermediate_size;
    linear(ws.router.data(), h, param(pre + "gate.weight"), nullptr, T, H, E);
    moe_route(dt(), ws.router.data(), ws.topk_expert.as<int32_t>(), ws.topk_weight.as<float>(), T, E, K,
              c.norm_topk_prob, stream);
    moe_bucket(ws.topk_expert.as<int32_t>(), T, K, E, ws.offsets.as<int32_t>(), ws.token_of.as<int32_t>(),
               ws.slot_of.as<int32_t>(), stream);
    OPENSCI_GPU_CHECK(rt::stream_synchronize(stream));
    const auto offsets = ws.offsets.to_host<int32_t>(static_cast<size_t>(E + 1));  // bucket sizes size the GEMMs
    OPENSCI_GPU_CHECK(rt::memset(out, 0, static_cast<size_t>(T * H) * esize(), stream));
    for (int64_t e = 0; e < E; ++e) {
      const int32_t begin = offsets[static_cast<size_t>(e)], count = offsets[static_cast<size_t>(e + 1)] - begin;
      if (count == 0) continue;
      const auto& w = experts[static_cast<size_t>(layer)][static_cast<size_t>(e)];
      gather_rows(dt(), ws.xin.data(), h, ws.token_of.as<int32_t>() + begin, count, H, stream);
      swiglu_mlp(ws.y.data(), ws.xin.data(), count, I, w.gate, w.up, w.down);
      scatter_add_weighted(dt(), out, ws.y.data(), ws.token_of.as<int32_t>() + begin, ws.slot_of.as<int32_t>() + begin,
                           ws.topk_weight.as<float>(), K, count, H, stream);
    }
  }

  std::vector<float> download(const DeviceBuffer& b, int64_t elements) const {
    OPENSCI_GPU_CHECK(rt::stream_synchronize(stream));
    const auto bytes = b.to_host<std::byte>(static_cast<size_t>(elements) * esize());
    return from_storage(dt(), bytes.data(), static_cast<size_t>(elements));
  }

  ForwardResult run(const TokenBatch& tok, const GpuRunOptions& run_options) {
    const auto& c = config;
    tok.validate(c.vocab_size, c.source);
    const int64_t T = tok.batch * tok.seq;
    const int64_t H = c.hidden_size, D = c.head_dim, NH = c.num_heads, NKV = c.num_kv_heads, V = c.vocab_size;
    const float eps = static_cast<float>(c.rms_norm_eps);
    ForwardResult result;
    result.batch = tok.batch;
    result.seq = tok.seq;
    result.vocab = V;
    result.hidden = H;
    const auto record = [&](std::string name, const DeviceBuffer& b) {
      if (run_options.capture_hidden) result.hiddens.emplace_back(std::move(name), download(b, T * H));
    };

    ensure_workspace(T);
    ws.ids.upload(tok.input_ids.data(), sizeof(int64_t) * static_cast<size_t>(T));
    ws.positions.upload(tok.position_ids.data(), sizeof(int64_t) * static_cast<size_t>(T));
    ws.mask.upload(tok.attention_mask.data(), sizeof(int64_t) * static_cast<size_t>(T));

    embedding(dt(), ws.x.data(), param("model.embed_tokens.weight"), ws.ids.as<int64_t>(), T, H, V, stream);
    record("hidden.embed", ws.x);

    for (int64_t l = 0; l < c.num_layers; ++l) {
      const auto pre = fmt::format("model.layers.{}.", l);
      const auto sa = pre + "self_attn.";
      const bool ab = c.attention_bias;
      // --- attention block ---
      rms_norm(dt(), ws.h.data(), ws.x.data(), param(pre + "input_layernorm.weight"), T, H, eps, stream);
      linear(ws.q.data(), ws.h.data(), param(sa + "q_proj.weight"), param_if(ab, sa + "q_proj.bias"), T, H, NH * D);
      linear(ws.k.data(), ws.h.data(), param(sa + "k_proj.weight"), param_if(ab, sa + "k_proj.bias"), T, H, NKV * D);
      linear(ws.v.data(), ws.h.data(), param(sa + "v_proj.weight"), param_if(ab, sa + "v_proj.bias"), T, H, NKV * D);
      if (c.qk_norm) {  // per-head RMSNorm over head_dim, before RoPE
        head_rms_norm(dt(), ws.q.data(), param(sa + c.q_norm_name() + ".weight"), T, NH, D, eps, stream);
        head_rms_norm(dt(), ws.k.data(), param(sa + c.k_norm_name() + ".weight"), T, NKV, D, eps, stream);
      }
      rope(dt(), ws.q.data(), ws.positions.as<int64_t>(), inv_freq.as<float>(), T, NH, D, stream);
      rope(dt(), ws.k.data(), ws.positions.as<int64_t>(), inv_freq.as<float>(), T, NKV, D, stream);
      causal_attention(dt(), ws.att.data(), ws.q.data(), ws.k.data(), ws.v.data(), ws.mask.as<int64_t>(), tok.batch,
                       tok.seq, NH, NKV, D, stream);
      linear(ws.block.data(), ws.att.data(), param(sa + "o_proj.weight"), param_if(ab, sa + "o_proj.bias"), T, NH * D,
             H);
      record(fmt::format("attn.{}", l), ws.block);
      add_inplace(dt(), ws.x.data(), ws.block.data(), T * H, stream);
      // --- MLP block ---
      rms_norm(dt(), ws.h.data(), ws.x.data(), param(pre + "post_attention_layernorm.weight"), T, H, eps, stream);
      if (c.is_sparse_layer(l)) {
        moe_mlp(ws.block.data(), ws.h.data(), T, l, pre + "mlp.");
      } else {
        const auto mp = pre + "mlp.";
        const bool mb = c.mlp_bias;
        swiglu_mlp(ws.block.data(), ws.h.data(), T, c.intermediate_size, param(mp + "gate_proj.weight"),
                   param(mp + "up_proj.weight"), param(mp + "down_proj.weight"), param_if(mb, mp + "gate_proj.bias"),
                   param_if(mb, mp + "up_proj.bias"), param_if(mb, mp + "down_proj.bias"));
      }
      record(fmt::format("mlp.{}", l), ws.block);
      add_inplace(dt(), ws.x.data(), ws.block.data(), T * H, stream);
      record(fmt::format("hidden.layer.{}", l), ws.x);
    }
    rms_norm(dt(), ws.h.data(), ws.x.data(), param("model.norm.weight"), T, H, eps, stream);
    record("hidden.final_norm", ws.h);

    // LM head: tied to the embedding matrix unless the config unties it.     logits: [T, V]
    const auto* head = param(c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight");
    linear(ws.logits.data(), ws.h.data(), head, nullptr, T, H, V);
    if (run_options.download_logits) result.logits = download(ws.logits, T * V);
    OPENSCI_GPU_CHECK(rt::stream_synchronize(stream));
    return result;
  }
};

GpuModel::GpuModel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GpuModel::GpuModel(GpuModel&&) noexcept = default;
GpuModel& GpuModel::operator=(GpuModel&&) noexcept = default;
GpuModel::~GpuModel() = default;

GpuModel::GpuModel(const Checkpoint& ck, const GpuForwardOptions& options)
    : impl_(std::make_unique<Impl>(ck.config(), options)) {
  validate_checkpoint(ck);
  const auto layouts = detect_expert_layouts(ck);
  for (const auto& [name, shape] : expected_parameters(ck.config(), layouts)) {
    // model.to(dtype): every parameter in the storage dtype (exact for a bf16 checkpoint in bf16).
    const auto bytes = to_storage(options.dtype, ck.read<float>(name, shape));
    DeviceBuffer b(bytes.size());
    b.upload(bytes.data(), bytes.size());
    impl_->parameter_bytes += bytes.size();
    impl_->params.emplace(name, std::move(b));
  }
  impl_->index_experts(layouts);
}

GpuModel GpuModel::random(const ModelConfig& config, uint64_t seed, const GpuForwardOptions& options) {
  auto impl = std::make_unique<Impl>(config, options);
  for (const auto& [name, shape] : expected_parameters(config)) {
    const int64_t count = element_count(shape);
    DeviceBuffer b(static_cast<size_t>(count) * dtype_size(options.dtype));
    const bool norm = is_norm_weight(name);
    fill_random(options.dtype, b.data(), count, seed ^ fnv1a(name), norm ? 1.0f : 0.0f,
                norm ? 0.1f : static_cast<float>(config.initializer_range), impl->stream);
    impl->parameter_bytes += b.bytes();
    impl->params.emplace(name, std::move(b));
  }
  impl->index_experts(std::vector<ExpertLayout>(static_cast<size_t>(config.num_layers), ExpertLayout::PerExpert));
  OPENSCI_GPU_CHECK(rt::stream_synchronize(impl->stream));
  return GpuModel(std::move(impl));
}

ForwardResult GpuModel::forward(const TokenBatch& tokens, const GpuRunOptions& run) const {
  return impl_->run(tokens, run);
}
void GpuModel::synchronize() const { OPENSCI_GPU_CHECK(rt::stream_synchronize(impl_->stream)); }
const ModelConfig& GpuModel::config() const { return impl_->config; }
DType GpuModel::dtype() const { return impl_->options.dtype; }
const char* GpuModel::gemm_name() const { return impl_->gemm->name(); }
size_t GpuModel::parameter_bytes() const { return impl_->parameter_bytes; }

ForwardResult forward(const Checkpoint& checkpoint, const TokenBatch& tokens, const GpuForwardOptions& options,
                      bool capture_hidden) {
  const GpuModel model(checkpoint, options);
  GpuRunOptions run;
  run.capture_hidden = capture_hidden;
  return model.forward(tokens, run);
}

}  // namespace opensci::gpu
