// The ops of the OpenSci forward pass on the GPU, one launcher per op, one kernel source per op
// (kernels/src/<op>.cu). The oracle of each is the CPU op of the same name in
// reference/include/opensci/ops.hpp (golden, double); tests/gpu/ holds one test per op.
//
// Conventions: all pointers are device pointers; tensors are row-major, shapes in comments;
// `dtype` is the storage type of every activation and weight argument (fp32 or bf16), and all
// arithmetic is fp32. Where torch materialises an intermediate tensor in the storage dtype, the
// kernel rounds to bf16 at the same point ("precision point", marked PP below), so a bf16 run is
// comparable with transformers in bf16. In fp32 every PP is the identity.
// Launchers are asynchronous on `stream` and throw opensci::Error on a bad launch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "opensci/gpu/portability.hpp"

namespace opensci::gpu {

enum class DType { F32, BF16 };
size_t dtype_size(DType dtype);
std::string_view dtype_name(DType dtype);  // "fp32", "bf16"

// out[t, :] = table[ids[t], :]                    ids: [tokens] int64; table: [vocab, hidden]; out: [tokens, hidden]
// Ids are validated on the host (TokenBatch::validate); an id outside [0, vocab) writes NaN.
void embedding(DType dtype, void* out, const void* table, const int64_t* ids, int64_t tokens, int64_t hidden,
               int64_t vocab, Stream stream);

// out[r, :] = w * PP(x[r, :] * rsqrt(mean(x[r, :]^2) + eps))           x, out: [rows, dim]; w: [dim]
// transformers' RMSNorm: statistics in fp32, the normalised row cast to the input dtype (PP), then
// the weight multiply in the storage dtype. out may alias x.
void rms_norm(DType dtype, void* out, const void* x, const void* w, int64_t rows, int64_t dim, float eps,
              Stream stream);

// Per-head q/k norm: RMSNorm over head_dim of every head, in place.   x: [tokens, heads, head_dim]; w: [head_dim]
inline void head_rms_norm(DType dtype, void* x, const void* w, int64_t tokens, int64_t heads, int64_t head_dim,
                          float eps, Stream stream) {
  rms_norm(dtype, x, x, w, tokens * heads, head_dim, eps, stream);
}

// Rotate-half RoPE in place.  x: [tokens, heads, head_dim]; positions: [tokens] int64; inv_freq: [head_dim/2] fp32
// angle = float(pos) * inv_freq (fp32), cos/sin in fp32 then PP (cast to the storage dtype as
// transformers' rotary embedding returns them); x*cos and rotate_half(x)*sin are PPs, then their sum.
void rope(DType dtype, void* x, const int64_t* positions, const float* inv_freq, int64_t tokens, int64_t heads,
          int64_t head_dim, Stream stream);

// Causal grouped-query attention with a key padding mask, flash-style (online softmax over key
// tiles, fp32 scores and statistics, P rounded to the storage dtype before P.V as flash-attention
// does: PP). A query with no visible key gets zeros (as the CPU reference).
// q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]; mask: [batch, seq] int64 (1 token, 0 pad)
// out: [batch, seq, heads, head_dim]. head_dim <= 128.
void causal_attention(DType dtype, void* out, const void* q, const void* k, const void* v, const int64_t* mask,
                      int64_t batch, int64_t seq, int64_t heads, int64_t kv_heads, int64_t head_dim, Stream stream);
inline constexpr int64_t kMaxAttentionHeadDim = 128;

// gate[i] = PP(silu(gate[i])) * up[i]  (the product rounds once more on store)      gate, up: [n]
void swiglu(DType dtype, void* gate, const void* up, int64_t n, Stream stream);

// x[r, c] += bias[c]                              x: [rows, cols]; bias: [cols]
void add_bias(DType dtype, void* x, const void* bias, int64_t rows, int64_t cols, Stream stream);
// out[r, :] = row                                 out: [rows, cols]; row: [cols]  (bias as the GEMM's C input)
void broadcast_rows(DType dtype, void* out, const void* row, int64_t rows, int64_t cols, Stream stream);
// x[i] += y[i]                                    residual adds; x, y: [n]
void add_inplace(DType dtype, void* x, const void* y, int64_t n, Stream stream);

// --- Mixture of experts (Qwen3-MoE semantics, transformers 4.x loop order) -------------------
// Routing per token: softmax of the router logits in fp32, top-k (larger first, ties to the
// lower expert index), optional renormalisation of the k weights (norm_topk_prob).
// logits: [tokens, experts] (storage dtype); topk_expert: [tokens, k] int32; topk_weight: [tokens, k] fp32
void moe_route(DType dtype, const void* logits, int32_t* topk_expert, float* topk_weight, int64_t tokens,
               int64_t experts, int64_t k, bool renormalize, Stream stream);
// Buckets the routed (token, slot) pairs by expert, tokens ascending inside a bucket.
// offsets: [experts + 1]; token_of, slot_of: [tokens * k]; bucket e is [offsets[e], offsets[e+1]).
void moe_bucket(const int32_t* topk_expert, int64_t tokens, int64_t k, int64_t experts, int32_t* offsets,
                int32_t* token_of, int32_t* slot_of, Stream stream);
// out[i, :] = x[rows[i], :]                        expert dispatch (gather); x: [*, cols]; out: [n, cols]
void gather_rows(DType dtype, void* out, const void* x, const int32_t* rows, int64_t n, int64_t cols, Stream stream);
// out[token_of[i], :] = PP(out[token_of[i], :] + PP(y[i, :] * PP(topk_weight[token_of[i], slot_of[i]])))
// expert combine (scatter): transformers multiplies the expert output by the bf16-cast routing
// weight and index_add_s it into a bf16 accumulator, one expert after another. Rows of one
// bucket are distinct tokens, so there are no write conflicts.  y: [n, cols]; out: [tokens, cols]
void scatter_add_weighted(DType dtype, void* out, const void* y, const int32_t* token_of, const int32_t* slot_of,
                          const float* topk_weight, int64_t k, int64_t n, int64_t cols, Stream stream);

// out[i] ~ mean + std * N(0, 1), from a counter-based hash of (seed, i): benchmark weights without
// a multi-GiB host upload.                        out: [n]
void fill_random(DType dtype, void* out, int64_t n, uint64_t seed, float mean, float std, Stream stream);

}  // namespace opensci::gpu
