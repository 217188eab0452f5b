#include "opensci/forward.hpp"

#include <cblas.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>

#include "opensci/error.hpp"
#include "opensci/ops.hpp"
#include "opensci/param.hpp"

namespace opensci {
namespace {

// out[rows, outf] = x[rows, in] . w[outf, in]^T + b
template <typename Real>
void linear(Real* out, const Real* x, const Param<Real>& w, const Param<Real>& b, int64_t rows, int64_t in,
            int64_t outf) {
  if constexpr (std::is_same_v<Real, float>) {
    if (b.data()) {
      for (int64_t r = 0; r < rows; ++r) std::memcpy(out + r * outf, b.data(), sizeof(float) * outf);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows), static_cast<int>(outf),
                static_cast<int>(in), 1.0f, x, static_cast<int>(in), w.data(), static_cast<int>(in),
                b.data() ? 1.0f : 0.0f, out, static_cast<int>(outf));
  } else {
    ops::linear_loops(out, x, w.data(), b.data(), rows, in, outf);
  }
}

// fp32 -> nearest bf16 (ties to even) -> fp32. NaN stays NaN.
inline float round_bf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu)) return v;
  bits += 0x7fffu + ((bits >> 16) & 1u);
  bits &= 0xffff0000u;
  std::memcpy(&v, &bits, 4);
  return v;
}

template <typename Real>
struct Forward {
  const Checkpoint& ck;
  const ModelConfig& c;
  const TokenBatch& tok;
  const ForwardOptions& opt;
  ForwardResult& result;
  int64_t T;  // tokens = batch * seq
  bool bf16 = false;  // Precision::BF16: round at torch's bf16 points (Real = float)

  void record(std::string name, const std::vector<Real>& x) {
    if (!opt.capture_hidden) return;
    result.hiddens.emplace_back(std::move(name), std::vector<float>(x.begin(), x.end()));
  }

  // bf16 storage: the value an op leaves behind (no-op in fp32/fp64).
  void rnd(Real* p, int64_t n) const {
    if constexpr (std::is_same_v<Real, float>) {
      if (bf16)
        for (int64_t i = 0; i < n; ++i) p[i] = round_bf16(p[i]);
    }
  }
  void rnd(std::vector<Real>& v) const { rnd(v.data(), static_cast<int64_t>(v.size())); }

  // A parameter in the forward's precision (bf16: rounded once), or zeros for a bias the
  // mutation tests drop.
  Param<Real> P(const std::string& name, const std::vector<int64_t>& shape) const {
    if (!opt.defect.empty() && opt.defect == "drop-bias:" + name) {
      Param<Real> p;
      p.owned.assign(static_cast<size_t>(element_count(shape)), Real(0));
      ck.file_of(name).check_shape(name, shape);
      p.ptr = p.owned.data();
      return p;
    }
    auto p = load_param<Real>(ck, name, shape);
    if (bf16) {
      if (p.owned.empty()) p.owned.assign(p.ptr, p.ptr + element_count(shape));
      rnd(p.owned);
      p.ptr = p.owned.data();
    }
    return p;
  }
  Param<Real> P_optional(bool present, const std::string& name, const std::vector<int64_t>& shape) const {
    return present ? P(name, shape) : Param<Real>{};
  }

  void lin(Real* out, const Real* x, const Param<Real>& w, const Param<Real>& b, int64_t rows, int64_t in,
           int64_t outf) const {
    linear(out, x, w, b, rows, in, outf);
    rnd(out, rows * outf);
  }

  // RMSNorm; bf16: torch rounds the normalised value to the model dtype, then multiplies by the
  // weight in bf16 (one more rounding).
  void norm(Real* out, const Real* x, const Real* w, int64_t rows, int64_t dim) const {
    if constexpr (std::is_same_v<Real, float>) {
      if (bf16) {
        for (int64_t r = 0; r < rows; ++r) {
          const float* xr = x + r * dim;
          float* o = out + r * dim;
          float ss = 0;
          for (int64_t i = 0; i < dim; ++i) ss += xr[i] * xr[i];
          const float inv = 1.0f / std::sqrt(ss / static_cast<float>(dim) + static_cast<float>(c.rms_norm_eps));
          for (int64_t i = 0; i < dim; ++i) o[i] = round_bf16(w[i] * round_bf16(xr[i] * inv));
        }
        return;
      }
    }
    ops::rms_norm(out, x, w, rows, dim, c.rms_norm_eps);
  }

  // Rotate-half RoPE; bf16: cos/sin rounded to bf16, each product and the sum rounded.
  void rope(Real* x, int64_t heads, int64_t D, const std::vector<double>& inv_freq) const {
    if constexpr (std::is_same_v<Real, float>) {
      if (bf16) {
        const int64_t half = D / 2;
        for (int64_t t = 0; t < T; ++t)
          for (int64_t i = 0; i < half; ++i) {
            const float angle = static_cast<float>(tok.position_ids[t]) * static_cast<float>(inv_freq[static_cast<size_t>(i)]);
            const float cs = round_bf16(std::cos(angle)), sn = round_bf16(std::sin(angle));
            for (int64_t h = 0; h < heads; ++h) {
              float* v = x + (t * heads + h) * D;
              const float x1 = v[i], x2 = v[i + half];
              v[i] = round_bf16(round_bf16(x1 * cs) + round_bf16(-x2 * sn));
              v[i + half] = round_bf16(round_bf16(x2 * cs) + round_bf16(x1 * sn));
            }
          }
        return;
      }
    }
    ops::rope(x, tok.position_ids.data(), T, heads, D, inv_freq);
  }

  void residual(Real* x, const Real* y, int64_t n) const {
    ops::add_inplace(x, y, n);
    rnd(x, n);
  }

  // SwiGLU MLP: down(silu(gate(h)) * up(h)), biases when mlp_bias.    h, out: [rows, H]
  void dense_mlp(Real* out, const Real* h, int64_t rows, const std::string& pre, int64_t I, bool bias) {
    const int64_t H = c.hidden_size;
    swiglu_mlp(out, h, rows, I, P(pre + "gate_proj.weight", {I, H}), P(pre + "up_proj.weight", {I, H}),
               P(pre + "down_proj.weight", {H, I}), P_optional(bias, pre + "gate_proj.bias", {I}),
               P_optional(bias, pre + "up_proj.bias", {I}), P_optional(bias, pre + "down_proj.bias", {H}));
  }

  // gate, up: [I, H]; down: [H, I]; biases optional.                  h, out: [rows, H]
  void swiglu_mlp(Real* out, const Real* h, int64_t rows, int64_t I, const Param<Real>& gate_w,
                  const Param<Real>& up_w, const Param<Real>& down_w, const Param<Real>& gate_b = {},
                  const Param<Real>& up_b = {}, const Param<Real>& down_b = {}) {
    const int64_t H = c.hidden_size;
    std::vector<Real> gate(static_cast<size_t>(rows * I)), up(static_cast<size_t>(rows * I));
    lin(gate.data(), h, gate_w, gate_b, rows, H, I);
    lin(up.data(), h, up_w, up_b, rows, H, I);
    bool done = false;
    if constexpr (std::is_same_v<Real, float>) {
      if (bf16) {  // act_fn(gate) and the product are two bf16 ops in torch
        for (int64_t i = 0; i < rows * I; ++i) {
          const float g = gate[static_cast<size_t>(i)];
          gate[static_cast<size_t>(i)] = round_bf16(round_bf16(g / (1.0f + std::exp(-g))) * up[static_cast<size_t>(i)]);
        }
        done = true;
      }
    }
    if (!done) ops::swiglu(gate.data(), up.data(), rows * I);
    lin(out, gate.data(), down_w, down_b, rows, I, H);
  }

  // Routing of every token (ops::topk_routing): router logits in the model dtype, softmax in
  // fp32 (double on the golden path), top-k, renormalised when norm_topk_prob.
  //   router_logits: [T, E]  ->  routing[t] = k pairs (expert, weight), best first
  std::vector<std::vector<std::pair<int64_t, Real>>> route(const std::vector<Real>& router_logits) const {
    std::vector<std::vector<std::pair<int64_t, Real>>> routing(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t)
      routing[static_cast<size_t>(t)] = ops::topk_routing(router_logits.data() + t * c.num_experts, c.num_experts,
                                                          c.num_experts_per_tok, c.norm_topk_prob);
    return routing;
  }

  // Qwen3-MoE block: route, run each expert's SwiGLU (no biases) on the tokens routed to it, and
  // add weight * expert output, experts in increasing index like transformers' loop.
  // Experts come per expert or from the fused v5 tensors (gate_up_proj [E, 2I, H]: gate rows
  // then up rows per expert; down_proj [E, H, I]).                        h, out: [T, H]
  void moe_mlp(Real* out, const Real* h, const std::string& pre, ExpertLayout layout) {
    const int64_t H = c.hidden_size, E = c.num_experts, I = c.moe_intermediate_size;
    std::vector<Real> router(static_cast<size_t>(T * E));
    lin(router.data(), h, P(pre + "gate.weight", {E, H}), Param<Real>{}, T, H, E);
    const auto routing = route(router);
    Param<Real> gate_up, down;  // whole fused tensors, kept alive while their slices are in use
    if (layout == ExpertLayout::Fused) {
      gate_up = P(pre + "experts.gate_up_proj", {E, 2 * I, H});
      down = P(pre + "experts.down_proj", {E, H, I});
    }
    std::fill(out, out + T * H, Real(0));
    for (int64_t e = 0; e < E; ++e) {
      std::vector<int64_t> rows;
      std::vector<Real> weights;
      for (int64_t t = 0; t < T; ++t)
        for (const auto& [expert, w] : routing[static_cast<size_t>(t)])
          if (expert == e) {
            rows.push_back(t);
            weights.push_back(w);
          }
      if (rows.empty()) continue;
      const auto n = static_cast<int64_t>(rows.size());
      std::vector<Real> xin(static_cast<size_t>(n * H)), y(static_cast<size_t>(n * H));
      for (int64_t i = 0; i < n; ++i) std::copy_n(h + rows[static_cast<size_t>(i)] * H, H, xin.data() + i * H);
      if (layout == ExpertLayout::Fused) {
        const Real* gu = gate_up.data() + e * 2 * I * H;
        swiglu_mlp(y.data(), xin.data(), n, I, Param<Real>{{}, gu}, Param<Real>{{}, gu + I * H},
                   Param<Real>{{}, down.data() + e * H * I});
      } else {
        const auto ex = fmt::format("{}experts.{}.", pre, e);
        swiglu_mlp(y.data(), xin.data(), n, I, P(ex + "gate_proj.weight", {I, H}), P(ex + "up_proj.weight", {I, H}),
                   P(ex + "down_proj.weight", {H, I}));
      }
      for (int64_t i = 0; i < n; ++i)
        for (int64_t d = 0; d < H; ++d)
          out[rows[static_cast<size_t>(i)] * H + d] += weights[static_cast<size_t>(i)] * y[i * H + d];
    }
    rnd(out, T * H);
  }

  void run() {
    const int64_t H = c.hidden_size, D = c.head_dim, NH = c.num_heads, NKV = c.num_kv_heads;
    const int64_t V = c.vocab_size;
    static const std::vector<std::string> kDefects = {"theta-x2", "skip-qk-norm", "swap-rope-halves"};
    if (!opt.defect.empty() && !opt.defect.starts_with("drop-bias:") &&
        std::find(kDefects.begin(), kDefects.end(), opt.defect) == kDefects.end())
      fail("unknown reference defect '{}' (known: drop-bias:<tensor>, theta-x2, skip-qk-norm, swap-rope-halves)", opt.defect);
    if (opt.defect.starts_with("drop-bias:") && !ck.contains(opt.defect.substr(10)))
      fail("defect {}: the checkpoint has no tensor '{}'", opt.defect, opt.defect.substr(10));
    auto inv_freq = ops::rope_inv_freq(D, opt.defect == "theta-x2" ? 2 * c.rope_theta : c.rope_theta);
    if (opt.defect == "swap-rope-halves")  // (x2, -x1) instead of (-x2, x1): the rotation by -angle
      for (auto& f : inv_freq) f = -f;
    const auto layouts = detect_expert_layouts(ck);

    // Embedding gather                                                    x: [T, H]
    std::vector<Real> x(static_cast<size_t>(T * H));
    {
      const auto emb = P("model.embed_tokens.weight", {V, H});
      for (int64_t t = 0; t < T; ++t) std::copy_n(emb.data() + tok.input_ids[t] * H, H, x.data() + t * H);
    }
    record("hidden.embed", x);

    std::vector<Real> h(static_cast<size_t>(T * H)), q(static_cast<size_t>(T * NH * D)),
        k(static_cast<size_t>(T * NKV * D)), v(static_cast<size_t>(T * NKV * D)), att(static_cast<size_t>(T * NH * D)),
        block(static_cast<size_t>(T * H));
    for (int64_t l = 0; l < c.num_layers; ++l) {
      const auto pre = fmt::format("model.layers.{}.", l);
      const auto sa = pre + "self_attn.";
      // --- attention block ---
      norm(h.data(), x.data(), P(pre + "input_layernorm.weight", {H}).data(), T, H);
      const bool ab = c.attention_bias;
      lin(q.data(), h.data(), P(sa + "q_proj.weight", {NH * D, H}), P_optional(ab, sa + "q_proj.bias", {NH * D}), T, H,
          NH * D);
      lin(k.data(), h.data(), P(sa + "k_proj.weight", {NKV * D, H}), P_optional(ab, sa + "k_proj.bias", {NKV * D}), T,
          H, NKV * D);
      lin(v.data(), h.data(), P(sa + "v_proj.weight", {NKV * D, H}), P_optional(ab, sa + "v_proj.bias", {NKV * D}), T,
          H, NKV * D);
      if (c.qk_norm && opt.defect != "skip-qk-norm") {  // per-head RMSNorm over head_dim, before RoPE
        norm(q.data(), q.data(), P(sa + c.q_norm_name() + ".weight", {D}).data(), T * NH, D);
        norm(k.data(), k.data(), P(sa + c.k_norm_name() + ".weight", {D}).data(), T * NKV, D);
      }
      rope(q.data(), NH, D, inv_freq);
      rope(k.data(), NKV, D, inv_freq);
      ops::causal_attention(att.data(), q.data(), k.data(), v.data(), tok.attention_mask.data(), tok.batch, tok.seq, NH,
                            NKV, D);
      rnd(att);
      lin(block.data(), att.data(), P(sa + "o_proj.weight", {H, NH * D}), P_optional(ab, sa + "o_proj.bias", {H}), T,
          NH * D, H);
      record(fmt::format("attn.{}", l), block);
      residual(x.data(), block.data(), T * H);
      // --- MLP block ---
      norm(h.data(), x.data(), P(pre + "post_attention_layernorm.weight", {H}).data(), T, H);
      if (c.is_sparse_layer(l))
        moe_mlp(block.data(), h.data(), pre + "mlp.", layouts[static_cast<size_t>(l)]);
      else
        dense_mlp(block.data(), h.data(), T, pre + "mlp.", c.intermediate_size, c.mlp_bias);
      record(fmt::format("mlp.{}", l), block);
      residual(x.data(), block.data(), T * H);
      record(fmt::format("hidden.layer.{}", l), x);
    }
    norm(h.data(), x.data(), P("model.norm.weight", {H}).data(), T, H);
    record("hidden.final_norm", h);

    // LM head: tied to the embedding matrix unless the config unties it.     logits: [T, V]
    std::vector<Real> logits(static_cast<size_t>(T * V));
    const auto head_name = c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
    lin(logits.data(), h.data(), P(head_name, {V, H}), Param<Real>{}, T, H, V);
    result.logits.assign(logits.begin(), logits.end());
  }
};

}  // namespace

TokenBatch TokenBatch::from_list(const std::vector<int64_t>& ids) {
  TokenBatch t;
  t.batch = 1;
  t.seq = static_cast<int64_t>(ids.size());
  t.input_ids = ids;
  t.attention_mask.assign(ids.size(), 1);
  t.position_ids.resize(ids.size());
  std::iota(t.position_ids.begin(), t.position_ids.end(), 0);
  return t;
}

TokenBatch TokenBatch::from_json_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) fail("{}: cannot open tokens file", path.string());
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: tokens file is not valid JSON: {}", path.string(), e.what());
  }
  auto matrix = [&](const char* key, bool required) -> std::vector<std::vector<int64_t>> {
    if (!j.contains(key)) {
      if (required) fail("{}: tokens file has no '{}'", path.string(), key);
      return {};
    }
    const auto& m = j[key];
    if (!m.is_array() || m.empty()) fail("{}: '{}' must be a non-empty list of rows", path.string(), key);
    std::vector<std::vector<int64_t>> rows;
    for (const auto& row : m) {
      if (!row.is_array()) fail("{}: '{}' must be a list of lists of integers", path.string(), key);
      auto& out = rows.emplace_back();
      for (const auto& v : row) {
        if (!v.is_number_integer()) fail("{}: '{}' holds a non-integer {}", path.string(), key, v.dump());
        out.push_back(v.get<int64_t>());
      }
      if (out.size() != rows.front().size())
        fail("{}: '{}' rows have different lengths ({} and {}); pad them", path.string(), key, rows.front().size(),
             out.size());
    }
    return rows;
  };
  const auto ids = matrix("input_ids", true);
  auto mask = matrix("attention_mask", false);
  auto pos = matrix("position_ids", false);
  TokenBatch t;
  t.batch = static_cast<int64_t>(ids.size());
  t.seq = static_cast<int64_t>(ids.front().size());
  if (t.seq == 0) fail("{}: input_ids rows are empty", path.string());
  for (const auto* m : {&mask, &pos})
    if (!m->empty() && (m->size() != ids.size() || m->front().size() != ids.front().size()))
      fail("{}: attention_mask/position_ids shape [{}, {}] differs from input_ids [{}, {}]", path.string(), m->size(),
           m->front().size(), t.batch, t.seq);
  for (int64_t b = 0; b < t.batch; ++b) {
    int64_t running = 0;
    for (int64_t s = 0; s < t.seq; ++s) {
      t.input_ids.push_back(ids[b][s]);
      const int64_t m = mask.empty() ? 1 : mask[b][s];
      t.attention_mask.push_back(m);
      if (!pos.empty()) {
        t.position_ids.push_back(pos[b][s]);
      } else {
        t.position_ids.push_back(m ? running : 0);  // cumsum(mask) - 1, pads at 0
        running += m ? 1 : 0;
      }
    }
  }
  t.validate(-1, path.string());
  return t;
}

void TokenBatch::validate(int64_t vocab_size, const std::string& where) const {
  const auto n = static_cast<size_t>(batch * seq);
  if (batch <= 0 || seq <= 0 || input_ids.size() != n || attention_mask.size() != n || position_ids.size() != n)
    fail("{}: token batch is not [batch, seq] = [{}, {}] throughout", where, batch, seq);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t s = 0; s < seq; ++s) {
      const auto i = static_cast<size_t>(b * seq + s);
      if (vocab_size > 0 && (input_ids[i] < 0 || input_ids[i] >= vocab_size))
        fail("{}: token id {} at [{}, {}] is out of range [0, {}) (vocab_size)", where, input_ids[i], b, s, vocab_size);
      if (attention_mask[i] != 0 && attention_mask[i] != 1)
        fail("{}: attention_mask[{}, {}] is {}, expected 0 or 1", where, b, s, attention_mask[i]);
      if (position_ids[i] < 0) fail("{}: position_ids[{}, {}] is negative", where, b, s);
    }
}

ForwardResult forward(const Checkpoint& ck, const TokenBatch& tokens, const ForwardOptions& options) {
  const auto& c = ck.config();
  validate_checkpoint(ck);
  tokens.validate(c.vocab_size, ck.dir().string());
  ForwardResult result;
  result.batch = tokens.batch;
  result.seq = tokens.seq;
  result.vocab = c.vocab_size;
  result.hidden = c.hidden_size;
  const int64_t T = tokens.batch * tokens.seq;
  if (options.precision == Precision::Golden)
    Forward<double>{ck, c, tokens, options, result, T}.run();
  else
    Forward<float>{ck, c, tokens, options, result, T, options.precision == Precision::BF16}.run();
  return result;
}

void write_forward_result(const ForwardResult& r, const TokenBatch& tokens, const std::filesystem::path& out,
                          const std::map<std::string, std::string>& metadata) {
  SafetensorsWriter w;
  w.add_f32("logits", {r.batch, r.seq, r.vocab}, r.logits);
  w.add_i64("attention_mask", {r.batch, r.seq}, tokens.attention_mask);
  w.add_i64("position_ids", {r.batch, r.seq}, tokens.position_ids);
  w.add_i64("input_ids", {r.batch, r.seq}, tokens.input_ids);
  for (const auto& [name, values] : r.hiddens) w.add_f32(name, {r.batch, r.seq, r.hidden}, values);
  for (const auto& [k, v] : metadata) w.set_metadata(k, v);
  w.write(out);
}

}  // namespace opensci
