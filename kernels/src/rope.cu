// Rotate-half rotary position embedding, in place.     see ops.hpp: rope()
#include "kernel_common.hpp"

namespace opensci::gpu {
namespace {

// One thread per (token, head, i < head_dim/2): rotates the pair (x[i], x[i + half]).
template <typename T>
OPENSCI_GLOBAL void rope_kernel(T* x, const int64_t* positions, const float* inv_freq, int64_t tokens, int64_t heads,
                                int64_t head_dim) {
  const int64_t half = head_dim / 2;
  const int64_t n = tokens * heads * half;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx % half;
    const int64_t th = idx / half;  // token * heads + head
    const int64_t t = th / heads;
    // transformers: freqs = inv_freq (fp32) x position_ids.float(); cos/sin in fp32, then .to(dtype).
    const float angle = static_cast<float>(positions[t]) * inv_freq[i];
    const float c = round_to<T>(cosf(angle));
    const float s = round_to<T>(sinf(angle));
    T* v = x + th * head_dim;
    const float x1 = to_float(v[i]), x2 = to_float(v[i + half]);
    // q * cos + rotate_half(q) * sin, rotate_half(q) = cat(-x2, x1): each product is a tensor (PP).
    v[i] = from_float<T>(round_to<T>(x1 * c) - round_to<T>(x2 * s));
    v[i + half] = from_float<T>(round_to<T>(x2 * c) + round_to<T>(x1 * s));
  }
}

}  // namespace

void rope(DType dtype, void* x, const int64_t* positions, const float* inv_freq, int64_t tokens, int64_t heads,
          int64_t head_dim, Stream stream) {
  detail::require(head_dim % 2 == 0, "rope", "head_dim must be even, got " + std::to_string(head_dim));
  const int64_t n = tokens * heads * (head_dim / 2);
  if (n == 0) return;
  detail::with_storage_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* kernel = &rope_kernel<T>;
    OPENSCI_LAUNCH(kernel, detail::grid_for(n), dim3(detail::kThreads), 0, stream, static_cast<T*>(x), positions,
                   inv_freq, tokens, heads, head_dim);
  });
  OPENSCI_GPU_CHECK_LAUNCH("rope_kernel");
}

}  // namespace opensci::gpu
