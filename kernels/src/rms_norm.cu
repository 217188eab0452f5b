// RMSNorm over rows (also the per-head q/k norm: rows = tokens * heads).   see ops.hpp: rms_norm()
#include "kernel_common.hpp"

namespace opensci::gpu {
namespace {

// One block per row. x and out may alias: each thread rewrites only the elements it read.
template <typename T>
OPENSCI_GLOBAL void rms_norm_kernel(T* out, const T* x, const T* w, int64_t rows, int64_t dim, float eps) {
  OPENSCI_DYNAMIC_SHARED(shared);
  float* scratch = reinterpret_cast<float*>(shared);  // [kMaxWarpsPerBlock]
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * dim;
    T* o = out + r * dim;
    float ss = 0.0f;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
      const float v = to_float(xr[i]);
      ss += v * v;
    }
    ss = detail::block_sum(ss, scratch);  // ends with a barrier: all reads of the row are done
    const float inv = rsqrt(ss / static_cast<float>(dim) + eps);
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
      const float normalised = round_to<T>(to_float(xr[i]) * inv);  // PP: hidden_states.to(input_dtype)
      o[i] = from_float<T>(to_float(w[i]) * normalised);
    }
  }
}

}  // namespace

void rms_norm(DType dtype, void* out, const void* x, const void* w, int64_t rows, int64_t dim, float eps,
              Stream stream) {
  if (rows == 0) return;
  // Short rows (per-head norms, head_dim 64..128) get 64 threads; model rows 256.
  const int threads = dim <= 128 ? 64 : detail::kThreads;
  const size_t shared = sizeof(float) * kMaxWarpsPerBlock;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(rows, 65535 * 4)));
  detail::with_storage_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* kernel = &rms_norm_kernel<T>;
    OPENSCI_LAUNCH(kernel, grid, dim3(static_cast<unsigned>(threads)), shared, stream, static_cast<T*>(out),
                   static_cast<const T*>(x), static_cast<const T*>(w), rows, dim, eps);
  });
  OPENSCI_GPU_CHECK_LAUNCH("rms_norm_kernel");
}

}  // namespace opensci::gpu
