// Embedding gather.                                  see ops.hpp: embedding()
#include "kernel_common.hpp"

namespace opensci::gpu {
namespace {

// One block row per token, threads over hidden.       table: [vocab, hidden]; out: [tokens, hidden]
template <typename T>
OPENSCI_GLOBAL void embedding_kernel(T* out, const T* table, const int64_t* ids, int64_t tokens, int64_t hidden,
                                     int64_t vocab) {
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const int64_t id = ids[t];
    const bool valid = id >= 0 && id < vocab;
    for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x)
      out[t * hidden + i] = valid ? table[id * hidden + i] : from_float<T>(NAN);
  }
}

}  // namespace

void embedding(DType dtype, void* out, const void* table, const int64_t* ids, int64_t tokens, int64_t hidden,
               int64_t vocab, Stream stream) {
  if (tokens == 0) return;
  detail::with_storage_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* kernel = &embedding_kernel<T>;
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(tokens, 65535)));
    OPENSCI_LAUNCH(kernel, grid, dim3(detail::kThreads), 0, stream, static_cast<T*>(out), static_cast<const T*>(table),
                   ids, tokens, hidden, vocab);
  });
  OPENSCI_GPU_CHECK_LAUNCH("embedding_kernel");
}

}  // namespace opensci::gpu
