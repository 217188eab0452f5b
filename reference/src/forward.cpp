#include "opensci/forward.hpp"

#include <cblas.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>

#include "opensci/error.hpp"
#include "opensci/ops.hpp"

namespace opensci {
namespace {

// A parameter as Real: a zero-copy view into the mapped file when the checkpoint already
// stores it in Real (F32 on the fast path), an owned converted copy otherwise.
template <typename Real>
struct Param {
  std::vector<Real> owned;
  const Real* ptr = nullptr;
  const Real* data() const { return ptr; }
};

template <typename Real>
Param<Real> load(const Checkpoint& ck, const std::string& name, const std::vector<int64_t>& shape) {
  Param<Real> p;
  if constexpr (std::is_same_v<Real, float>) {
    const auto& file = ck.file_of(name);
    if (file.at(name).dtype == DType::F32) {
      file.check_shape(name, shape);
      p.ptr = file.view_f32(name).data();
      return p;
    }
  }
  p.owned = ck.read<Real>(name, shape);
  p.ptr = p.owned.data();
  return p;
}

template <typename Real>
Param<Real> load_optional(const Checkpoint& ck, bool present, const std::string& name,
                          const std::vector<int64_t>& shape) {
  return present ? load<Real>(ck, name, shape) : Param<Real>{};
}

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

template <typename Real>
struct Forward {
  const Checkpoint& ck;
  const ModelConfig& c;
  const TokenBatch& tok;
  const ForwardOptions& opt;
  ForwardResult& result;
  int64_t T;  // tokens = batch * seq

  void record(std::string name, const std::vector<Real>& x) {
    if (!opt.capture_hidden) return;
    result.hiddens.emplace_back(std::move(name), std::vector<float>(x.begin(), x.end()));
  }

  // SwiGLU MLP: down(silu(gate(h)) * up(h)), biases when mlp_bias.    h, out: [rows, H]
  void dense_mlp(Real* out, const Real* h, int64_t rows, const std::string& pre, int64_t I, bool bias) {
    const int64_t H = c.hidden_size;
    swiglu_mlp(out, h, rows, I, load<Real>(ck, pre + "gate_proj.weight", {I, H}),
               load<Real>(ck, pre + "up_proj.weight", {I, H}), load<Real>(ck, pre + "down_proj.weight", {H, I}),
               load_optional<Real>(ck, bias, pre + "gate_proj.bias", {I}),
               load_optional<Real>(ck, bias, pre + "up_proj.bias", {I}),
               load_optional<Real>(ck, bias, pre + "down_proj.bias", {H}));
  }

  // gate, up: [I, H]; down: [H, I]; biases optional.                  h, out: [rows, H]
  void swiglu_mlp(Real* out, const Real* h, int64_t rows, int64_t I, const Param<Real>& gate_w,
                  const Param<Real>& up_w, const Param<Real>& down_w, const Param<Real>& gate_b = {},
                  const Param<Real>& up_b = {}, const Param<Real>& down_b = {}) {
    const int64_t H = c.hidden_size;
    std::vector<Real> gate(static_cast<size_t>(rows * I)), up(static_cast<size_t>(rows * I));
    linear(gate.data(), h, gate_w, gate_b, rows, H, I);
    linear(up.data(), h, up_w, up_b, rows, H, I);
    ops::swiglu(gate.data(), up.data(), rows * I);
    linear(out, gate.data(), down_w, down_b, rows, I, H);
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
    linear(router.data(), h, load<Real>(ck, pre + "gate.weight", {E, H}), Param<Real>{}, T, H, E);
    const auto routing = route(router);
    Param<Real> gate_up, down;  // whole fused tensors, kept alive while their slices are in use
    if (layout == ExpertLayout::Fused) {
      gate_up = load<Real>(ck, pre + "experts.gate_up_proj", {E, 2 * I, H});
      down = load<Real>(ck, pre + "experts.down_proj", {E, H, I});
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
        swiglu_mlp(y.data(), xin.data(), n, I, load<Real>(ck, ex + "gate_proj.weight", {I, H}),
                   load<Real>(ck, ex + "up_proj.weight", {I, H}), load<Real>(ck, ex + "down_proj.weight", {H, I}));
      }
      for (int64_t i = 0; i < n; ++i)
        for (int64_t d = 0; d < H; ++d)
          out[rows[static_cast<size_t>(i)] * H + d] += weights[static_cast<size_t>(i)] * y[i * H + d];
    }
  }

  void run() {
    const int64_t H = c.hidden_size, D = c.head_dim, NH = c.num_heads, NKV = c.num_kv_heads;
    const int64_t V = c.vocab_size;
    const auto inv_freq = ops::rope_inv_freq(D, c.rope_theta);
    const auto layouts = detect_expert_layouts(ck);

    // Embedding gather                                                    x: [T, H]
    std::vector<Real> x(static_cast<size_t>(T * H));
    {
      const auto emb = load<Real>(ck, "model.embed_tokens.weight", {V, H});
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
      ops::rms_norm(h.data(), x.data(), load<Real>(ck, pre + "input_layernorm.weight", {H}).data(), T, H,
                    c.rms_norm_eps);
      const bool ab = c.attention_bias;
      linear(q.data(), h.data(), load<Real>(ck, sa + "q_proj.weight", {NH * D, H}),
             load_optional<Real>(ck, ab, sa + "q_proj.bias", {NH * D}), T, H, NH * D);
      linear(k.data(), h.data(), load<Real>(ck, sa + "k_proj.weight", {NKV * D, H}),
             load_optional<Real>(ck, ab, sa + "k_proj.bias", {NKV * D}), T, H, NKV * D);
      linear(v.data(), h.data(), load<Real>(ck, sa + "v_proj.weight", {NKV * D, H}),
             load_optional<Real>(ck, ab, sa + "v_proj.bias", {NKV * D}), T, H, NKV * D);
      if (c.qk_norm) {  // per-head RMSNorm over head_dim, before RoPE
        ops::rms_norm(q.data(), q.data(), load<Real>(ck, sa + c.q_norm_name() + ".weight", {D}).data(), T * NH, D,
                      c.rms_norm_eps);
        ops::rms_norm(k.data(), k.data(), load<Real>(ck, sa + c.k_norm_name() + ".weight", {D}).data(), T * NKV, D,
                      c.rms_norm_eps);
      }
      ops::rope(q.data(), tok.position_ids.data(), T, NH, D, inv_freq);
      ops::rope(k.data(), tok.position_ids.data(), T, NKV, D, inv_freq);
      ops::causal_attention(att.data(), q.data(), k.data(), v.data(), tok.attention_mask.data(), tok.batch, tok.seq, NH,
                            NKV, D);
      linear(block.data(), att.data(), load<Real>(ck, sa + "o_proj.weight", {H, NH * D}),
             load_optional<Real>(ck, ab, sa + "o_proj.bias", {H}), T, NH * D, H);
      record(fmt::format("attn.{}", l), block);
      ops::add_inplace(x.data(), block.data(), T * H);
      // --- MLP block ---
      ops::rms_norm(h.data(), x.data(), load<Real>(ck, pre + "post_attention_layernorm.weight", {H}).data(), T, H,
                    c.rms_norm_eps);
      if (c.is_sparse_layer(l))
        moe_mlp(block.data(), h.data(), pre + "mlp.", layouts[static_cast<size_t>(l)]);
      else
        dense_mlp(block.data(), h.data(), T, pre + "mlp.", c.intermediate_size, c.mlp_bias);
      record(fmt::format("mlp.{}", l), block);
      ops::add_inplace(x.data(), block.data(), T * H);
      record(fmt::format("hidden.layer.{}", l), x);
    }
    ops::rms_norm(h.data(), x.data(), load<Real>(ck, "model.norm.weight", {H}).data(), T, H, c.rms_norm_eps);
    record("hidden.final_norm", h);

    // LM head: tied to the embedding matrix unless the config unties it.     logits: [T, V]
    std::vector<Real> logits(static_cast<size_t>(T * V));
    const auto head_name = c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
    linear(logits.data(), h.data(), load<Real>(ck, head_name, {V, H}), Param<Real>{}, T, H, V);
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
    Forward<float>{ck, c, tokens, options, result, T}.run();
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
