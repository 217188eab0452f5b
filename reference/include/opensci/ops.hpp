// The operations of the OpenSci forward pass, one function each, on plain row-major arrays.
// `Real` is the accumulation type: double for the golden path, float for the fast path.
// These CPU functions are also the oracle the CUDA/HIP kernels are tested against.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace opensci::ops {

// out[r, :] = w * (x[r, :] * rsqrt(mean(x[r, :]^2) + eps))      x, out: [rows, dim]; w: [dim]
// The normalisation happens before the weight multiply, as in transformers' Llama/Qwen3 RMSNorm.
template <typename Real>
void rms_norm(Real* out, const Real* x, const Real* w, int64_t rows, int64_t dim, double eps) {
#pragma omp parallel for schedule(static) if (rows > 16)
  for (int64_t r = 0; r < rows; ++r) {
    const Real* xr = x + r * dim;
    Real* o = out + r * dim;
    Real ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += xr[i] * xr[i];
    const Real inv = Real(1) / std::sqrt(ss / Real(dim) + Real(eps));
    for (int64_t i = 0; i < dim; ++i) o[i] = w[i] * (xr[i] * inv);
  }
}

// out[r, o] = sum_i x[r, i] * w[o, i] (+ b[o])     x: [rows, in]; w: [out, in]; out: [rows, out]
// Reference loop; the fast path replaces it by sgemm (see linear() in forward.cpp).
template <typename Real>
void linear_loops(Real* out, const Real* x, const Real* w, const Real* b, int64_t rows, int64_t in, int64_t outf) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < outf; ++o) {
      const Real* xr = x + r * in;
      const Real* wo = w + o * in;
      Real acc = 0;
      for (int64_t i = 0; i < in; ++i) acc += xr[i] * wo[i];
      out[r * outf + o] = acc + (b ? b[o] : Real(0));
    }
}

// inv_freq[i] = 1 / theta^(2i / head_dim), i in [0, head_dim/2)
inline std::vector<double> rope_inv_freq(int64_t head_dim, double theta) {
  std::vector<double> inv(static_cast<size_t>(head_dim / 2));
  for (int64_t i = 0; i < head_dim / 2; ++i)
    inv[static_cast<size_t>(i)] = 1.0 / std::pow(theta, static_cast<double>(2 * i) / static_cast<double>(head_dim));
  return inv;
}

// Rotate-half RoPE in place on x: [tokens, heads, head_dim]; positions: [tokens].
// x1 = x[:d/2], x2 = x[d/2:]  ->  (x1*cos - x2*sin, x2*cos + x1*sin), angle = pos * inv_freq[i].
// The fast path evaluates angle, cos and sin in fp32 as transformers does (inv_freq is fp32 there).
template <typename Real>
void rope(Real* x, const int64_t* positions, int64_t tokens, int64_t heads, int64_t head_dim,
          const std::vector<double>& inv_freq) {
  const int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) if (tokens > 16)
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t i = 0; i < half; ++i) {
      const Real angle = static_cast<Real>(positions[t]) * static_cast<Real>(inv_freq[static_cast<size_t>(i)]);
      const Real c = std::cos(angle), s = std::sin(angle);
      for (int64_t h = 0; h < heads; ++h) {
        Real* v = x + (t * heads + h) * head_dim;
        const Real x1 = v[i], x2 = v[i + half];
        v[i] = x1 * c - x2 * s;
        v[i + half] = x2 * c + x1 * s;
      }
    }
  }
}

// Causal grouped-query attention with a key padding mask.
// q: [batch, seq, heads, hd]; k, v: [batch, seq, kv_heads, hd]; mask: [batch, seq] (1 = token, 0 = pad)
// out: [batch, seq, heads, hd]. Query head h reads kv head h / (heads / kv_heads).
// A query with no visible key (a left-pad position) gets zeros: its output is undefined in
// transformers too, and comparisons skip pad positions.
template <typename Real>
void causal_attention(Real* out, const Real* q, const Real* k, const Real* v, const int64_t* mask, int64_t batch,
                      int64_t seq, int64_t heads, int64_t kv_heads, int64_t hd) {
  const int64_t group = heads / kv_heads;
  const Real scale = Real(1) / std::sqrt(static_cast<Real>(hd));
#pragma omp parallel
  {
    std::vector<Real> scores(static_cast<size_t>(seq));
#pragma omp for collapse(3) schedule(static)
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < seq; ++i) {
          const int64_t kh = h / group;
          const Real* qi = q + ((b * seq + i) * heads + h) * hd;
          Real* oi = out + ((b * seq + i) * heads + h) * hd;
          Real max_score = -INFINITY;
          for (int64_t j = 0; j <= i; ++j) {
            if (mask[b * seq + j] == 0) continue;
            const Real* kj = k + ((b * seq + j) * kv_heads + kh) * hd;
            Real dot = 0;
            for (int64_t d = 0; d < hd; ++d) dot += qi[d] * kj[d];
            scores[static_cast<size_t>(j)] = dot * scale;
            max_score = std::max(max_score, scores[static_cast<size_t>(j)]);
          }
          for (int64_t d = 0; d < hd; ++d) oi[d] = 0;
          if (max_score == -INFINITY) continue;
          Real denom = 0;
          for (int64_t j = 0; j <= i; ++j) {
            if (mask[b * seq + j] == 0) continue;
            const Real p = std::exp(scores[static_cast<size_t>(j)] - max_score);
            scores[static_cast<size_t>(j)] = p;
            denom += p;
          }
          for (int64_t j = 0; j <= i; ++j) {
            if (mask[b * seq + j] == 0) continue;
            const Real p = scores[static_cast<size_t>(j)] / denom;
            const Real* vj = v + ((b * seq + j) * kv_heads + kh) * hd;
            for (int64_t d = 0; d < hd; ++d) oi[d] += p * vj[d];
          }
        }
  }
}

// gate[i] = silu(gate[i]) * up[i], silu(x) = x / (1 + exp(-x)).       gate, up: [n]
template <typename Real>
void swiglu(Real* gate, const Real* up, int64_t n) {
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) {
    const Real g = gate[i];
    gate[i] = g / (Real(1) + std::exp(-g)) * up[i];
  }
}

// Qwen3-MoE top-k routing of one token (transformers Qwen3MoeTopKRouter), in Real:
//   prob = softmax(router_logits[0..E)); keep the k largest (larger first, ties to the lower
//   expert index: torch.topk's order on CPU); weight = prob, or prob / sum(kept probs) when
//   renormalise (norm_topk_prob).          out: k pairs (expert, weight), best first
template <typename Real>
std::vector<std::pair<int64_t, Real>> topk_routing(const Real* router_logits, int64_t experts, int64_t k,
                                                   bool renormalise) {
  std::vector<Real> prob(static_cast<size_t>(experts));
  const Real mx = *std::max_element(router_logits, router_logits + experts);
  Real sum = 0;
  for (int64_t e = 0; e < experts; ++e) sum += prob[static_cast<size_t>(e)] = std::exp(router_logits[e] - mx);
  for (auto& p : prob) p /= sum;
  std::vector<int64_t> order(static_cast<size_t>(experts));
  for (int64_t e = 0; e < experts; ++e) order[static_cast<size_t>(e)] = e;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return prob[static_cast<size_t>(a)] > prob[static_cast<size_t>(b)]; });
  Real kept = 0;
  for (int64_t i = 0; i < k; ++i) kept += prob[static_cast<size_t>(order[static_cast<size_t>(i)])];
  std::vector<std::pair<int64_t, Real>> out;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t e = order[static_cast<size_t>(i)];
    out.emplace_back(e, renormalise ? prob[static_cast<size_t>(e)] / kept : prob[static_cast<size_t>(e)]);
  }
  return out;
}

// x[i] += y[i]                                                          residual adds
template <typename Real>
void add_inplace(Real* x, const Real* y, int64_t n) {
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

}  // namespace opensci::ops
