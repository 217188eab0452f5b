// SwiGLU activation: gate = silu(gate) * up, in place on gate.     see ops.hpp: swiglu()
#include "kernel_common.hpp"

namespace opensci::gpu {
namespace {

template <typename T>
OPENSCI_GLOBAL void swiglu_kernel(T* gate, const T* up, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = to_float(gate[i]);
    // torch's silu: x / (1 + exp(-x)) in fp32, result a tensor in the storage dtype (PP).
    const float activated = round_to<T>(g / (1.0f + expf(-g)));
    gate[i] = from_float<T>(activated * to_float(up[i]));
  }
}

}  // namespace

void swiglu(DType dtype, void* gate, const void* up, int64_t n, Stream stream) {
  if (n == 0) return;
  detail::with_storage_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* kernel = &swiglu_kernel<T>;
    OPENSCI_LAUNCH(kernel, detail::grid_for(n), dim3(detail::kThreads), 0, stream, static_cast<T*>(gate),
                   static_cast<const T*>(up), n);
  });
  OPENSCI_GPU_CHECK_LAUNCH("swiglu_kernel");
}

}  // namespace opensci::gpu
