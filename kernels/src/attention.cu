// Causal grouped-query attention with a key padding mask: one fused flash-style kernel.
// see ops.hpp: causal_attention()
//
// Block = 32 query rows of one (batch, head); 8 threads per query row (256 threads). The block
// walks the key tiles up to its last query (causal), keeping per row the running max m, the
// running sum l and the unnormalised output in fp32 (online softmax), so memory is O(tile)
// whatever the sequence length. Per tile: each thread scores BK/8 keys, the row's 8 threads agree
// on the tile max and sum by shuffles (groups of 8 lanes: the same on 32- and 64-wide warps),
// then each thread updates its head_dim/8 output columns from P (shared) and the V tile.
#include "kernel_common.hpp"

namespace opensci::gpu {
namespace {

constexpr int kQueryRows = 32;  // query rows per block
constexpr int kRowThreads = 8;  // threads per query row
constexpr int kAttentionThreads = kQueryRows * kRowThreads;

// Shared floats: Q [32][hd+1], K [BK][hd+1] (padded rows: no bank conflicts on the dot
// products), V [BK][hd], P [32][BK].
inline size_t attention_shared_bytes(int head_dim, int key_tile) {
  const size_t floats = static_cast<size_t>(kQueryRows) * (head_dim + 1) +
                        static_cast<size_t>(key_tile) * (head_dim + 1) + static_cast<size_t>(key_tile) * head_dim +
                        static_cast<size_t>(kQueryRows) * key_tile;
  return floats * sizeof(float);
}

template <typename T, int kHeadDimMax, int kKeyTile>
OPENSCI_GLOBAL void OPENSCI_LAUNCH_BOUNDS(kAttentionThreads)
    flash_attention_kernel(T* out, const T* q, const T* k, const T* v, const int64_t* mask, int64_t seq, int64_t heads,
                           int64_t kv_heads, int64_t head_dim, float scale) {
  constexpr int kKeysPerThread = kKeyTile / kRowThreads;
  constexpr int kColsPerThread = kHeadDimMax / kRowThreads;
  OPENSCI_DYNAMIC_SHARED(shared);
  const int hd = static_cast<int>(head_dim);
  const int ld = hd + 1;
  float* qs = reinterpret_cast<float*>(shared);  // [kQueryRows][ld]
  float* ks = qs + kQueryRows * ld;              // [kKeyTile][ld]
  float* vs = ks + kKeyTile * ld;                // [kKeyTile][hd]
  float* ps = vs + kKeyTile * hd;                // [kQueryRows][kKeyTile]

  const int tid = static_cast<int>(threadIdx.x);
  const int row = tid / kRowThreads, sub = tid % kRowThreads;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kQueryRows;
  const int64_t kv_head = h / (heads / kv_heads);
  const int64_t qi = q0 + row;  // this thread's query position

  for (int idx = tid; idx < kQueryRows * hd; idx += kAttentionThreads) {
    const int r = idx / hd, d = idx % hd;
    const int64_t pos = q0 + r;
    qs[r * ld + d] = pos < seq ? to_float(q[((b * seq + pos) * heads + h) * head_dim + d]) : 0.0f;
  }

  float m = -INFINITY, l = 0.0f;
  float acc[kColsPerThread];
  for (int c = 0; c < kColsPerThread; ++c) acc[c] = 0.0f;

  const int64_t key_end = q0 + kQueryRows < seq ? q0 + kQueryRows : seq;  // causal: no key after the last query
  for (int64_t k0 = 0; k0 < key_end; k0 += kKeyTile) {
    for (int idx = tid; idx < kKeyTile * hd; idx += kAttentionThreads) {
      const int j = idx / hd, d = idx % hd;
      const int64_t pos = k0 + j;
      const bool inside = pos < seq;
      const int64_t at = ((b * seq + pos) * kv_heads + kv_head) * head_dim + d;
      ks[j * ld + d] = inside ? to_float(k[at]) : 0.0f;
      vs[j * hd + d] = inside ? to_float(v[at]) : 0.0f;  // finite: P = 0 times it must stay 0
    }
    sync_block();  // Q (first tile), K and V loaded

    float s[kKeysPerThread];
    float tile_max = -INFINITY;
    for (int n = 0; n < kKeysPerThread; ++n) {
      const int j = sub + kRowThreads * n;
      const int64_t pos = k0 + j;
      const bool visible = qi < seq && pos <= qi && pos < seq && mask[b * seq + pos] != 0;
      s[n] = -INFINITY;
      if (visible) {
        float dot = 0.0f;
        for (int d = 0; d < hd; ++d) dot += qs[row * ld + d] * ks[j * ld + d];
        s[n] = dot * scale;
      }
      tile_max = fmaxf(tile_max, s[n]);
    }
    for (int o = kRowThreads / 2; o > 0; o /= 2) tile_max = fmaxf(tile_max, shfl_xor(tile_max, o, kRowThreads));

    const float m_new = fmaxf(m, tile_max);
    float alpha = 1.0f, p_sum = 0.0f;
    if (m_new == -INFINITY) {  // nothing visible to this row yet
      for (int n = 0; n < kKeysPerThread; ++n) ps[row * kKeyTile + sub + kRowThreads * n] = 0.0f;
    } else {
      alpha = expf(m - m_new);  // 0 when m was -inf
      for (int n = 0; n < kKeysPerThread; ++n) {
        const float p = expf(s[n] - m_new);  // exp(-inf) = 0 for hidden keys
        p_sum += p;
        ps[row * kKeyTile + sub + kRowThreads * n] = round_to<T>(p);  // PP: P cast for the P.V matmul
      }
    }
    for (int o = kRowThreads / 2; o > 0; o /= 2) p_sum += shfl_xor(p_sum, o, kRowThreads);
    l = l * alpha + p_sum;
    m = m_new;
    sync_block();  // P visible

    for (int c = 0; c < kColsPerThread; ++c) {
      const int d = sub + kRowThreads * c;
      if (d < hd) {
        float a = acc[c] * alpha;
        for (int j = 0; j < kKeyTile; ++j) a += ps[row * kKeyTile + j] * vs[j * hd + d];
        acc[c] = a;
      }
    }
    sync_block();  // the next tile overwrites K, V and P
  }

  if (qi < seq) {
    T* o = out + ((b * seq + qi) * heads + h) * head_dim;
    for (int c = 0; c < kColsPerThread; ++c) {
      const int d = sub + kRowThreads * c;
      if (d < hd) o[d] = from_float<T>(l > 0.0f ? acc[c] / l : 0.0f);
    }
  }
}

template <typename T, int kHeadDimMax, int kKeyTile>
void launch_attention(T* out, const T* q, const T* k, const T* v, const int64_t* mask, int64_t batch, int64_t seq,
                      int64_t heads, int64_t kv_heads, int64_t head_dim, Stream stream) {
  auto* kernel = &flash_attention_kernel<T, kHeadDimMax, kKeyTile>;
  const dim3 grid(static_cast<unsigned>((seq + kQueryRows - 1) / kQueryRows), static_cast<unsigned>(heads),
                  static_cast<unsigned>(batch));
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  OPENSCI_LAUNCH(kernel, grid, dim3(kAttentionThreads), attention_shared_bytes(static_cast<int>(head_dim), kKeyTile),
                 stream, out, q, k, v, mask, seq, heads, kv_heads, head_dim, scale);
}

}  // namespace

void causal_attention(DType dtype, void* out, const void* q, const void* k, const void* v, const int64_t* mask,
                      int64_t batch, int64_t seq, int64_t heads, int64_t kv_heads, int64_t head_dim, Stream stream) {
  detail::require(
      kv_heads > 0 && heads % kv_heads == 0, "causal_attention",
      "heads (" + std::to_string(heads) + ") must be a multiple of kv_heads (" + std::to_string(kv_heads) + ")");
  detail::require(head_dim > 0 && head_dim <= kMaxAttentionHeadDim, "causal_attention",
                  "head_dim " + std::to_string(head_dim) + " is outside the flash kernel's range [1, " +
                      std::to_string(kMaxAttentionHeadDim) + "]");
  detail::require(heads <= 65535 && batch <= 65535, "causal_attention", "heads and batch must be <= 65535");
  if (batch * seq == 0) return;
  detail::with_storage_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* o = static_cast<T*>(out);
    const auto *qq = static_cast<const T*>(q), *kk = static_cast<const T*>(k), *vv = static_cast<const T*>(v);
    // Key tiles sized so the shared memory stays under 48 KiB (no opt-in attribute needed).
    if (head_dim <= 32)
      launch_attention<T, 32, 32>(o, qq, kk, vv, mask, batch, seq, heads, kv_heads, head_dim, stream);
    else if (head_dim <= 64)
      launch_attention<T, 64, 32>(o, qq, kk, vv, mask, batch, seq, heads, kv_heads, head_dim, stream);
    else
      launch_attention<T, 128, 16>(o, qq, kk, vv, mask, batch, seq, heads, kv_heads, head_dim, stream);
  });
  OPENSCI_GPU_CHECK_LAUNCH("flash_attention_kernel");
}

}  // namespace opensci::gpu
