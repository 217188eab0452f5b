// Shared by the kernel sources (private to kernels/src): dtype dispatch, launch geometry and
// the block reduction. Nothing here is vendor-specific; portability.hpp is.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "opensci/gpu/ops.hpp"
#include "opensci/gpu/portability.hpp"

namespace opensci::gpu::detail {

// Calls f(T{}) with T = float or bf16 for the storage dtype.
template <typename F>
void with_storage_type(DType dtype, F&& f) {
  if (dtype == DType::F32)
    f(float{});
  else
    f(bf16{});
}

// Block sizes are multiples of 64, so every warp is full on wave32 and wave64 hardware alike.
inline constexpr int kThreads = 256;

// A 1-D grid for a grid-stride loop over n elements.
inline dim3 grid_for(int64_t n, int threads = kThreads) {
  const int64_t blocks = std::clamp<int64_t>((n + threads - 1) / threads, 1, 65535 * 4);
  return dim3(static_cast<unsigned>(blocks));
}

inline void require(bool ok, const char* op, const std::string& what) {
  if (!ok) fail_gpu(std::string(op) + ": " + what);
}

// Sum over the block, the same value in every thread, in a fixed order (deterministic).
// scratch: kMaxWarpsPerBlock floats of shared memory; blockDim.x a multiple of the warp size.
OPENSCI_DEVICE float block_sum(float v, float* scratch) {
  const int lane = static_cast<int>(threadIdx.x) % OPENSCI_WARP_SIZE;
  const int warp = static_cast<int>(threadIdx.x) / OPENSCI_WARP_SIZE;
  const int warps = static_cast<int>(blockDim.x) / OPENSCI_WARP_SIZE;
  for (int offset = OPENSCI_WARP_SIZE / 2; offset > 0; offset /= 2) v += shfl_xor(v, offset, OPENSCI_WARP_SIZE);
  if (lane == 0) scratch[warp] = v;
  sync_block();
  float total = 0.0f;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  sync_block();  // scratch may be reused right after
  return total;
}

}  // namespace opensci::gpu::detail
