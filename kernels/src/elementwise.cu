// Bias adds, bias broadcast, residual adds and random fills.    see ops.hpp
#include "kernel_common.hpp"

namespace opensci::gpu {
namespace {

#define OPENSCI_GRID_STRIDE(i, n)                                                        \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

template <typename T>
OPENSCI_GLOBAL void add_bias_kernel(T* x, const T* bias, int64_t rows, int64_t cols) {
  OPENSCI_GRID_STRIDE(i, rows * cols) { x[i] = from_float<T>(to_float(x[i]) + to_float(bias[i % cols])); }
}

template <typename T>
OPENSCI_GLOBAL void broadcast_rows_kernel(T* out, const T* row, int64_t rows, int64_t cols) {
  OPENSCI_GRID_STRIDE(i, rows * cols) { out[i] = row[i % cols]; }
}

template <typename T>
OPENSCI_GLOBAL void add_inplace_kernel(T* x, const T* y, int64_t n) {
  OPENSCI_GRID_STRIDE(i, n) { x[i] = from_float<T>(to_float(x[i]) + to_float(y[i])); }
}

// splitmix64 of (seed, i) -> two uniforms -> Box-Muller.
OPENSCI_DEVICE uint64_t mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

template <typename T>
OPENSCI_GLOBAL void fill_random_kernel(T* out, int64_t n, uint64_t seed, float mean, float std) {
  OPENSCI_GRID_STRIDE(i, n) {
    const uint64_t r = mix64(seed ^ mix64(static_cast<uint64_t>(i)));
    const float u1 = (static_cast<float>(r >> 40) + 1.0f) * 0x1p-24f;  // (0, 1]
    const float u2 = static_cast<float>((r >> 16) & 0xffffffULL) * 0x1p-24f;
    const float normal = sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);
    out[i] = from_float<T>(mean + std * normal);
  }
}

#undef OPENSCI_GRID_STRIDE

}  // namespace

void add_bias(DType dtype, void* x, const void* bias, int64_t rows, int64_t cols, Stream stream) {
  if (rows * cols == 0) return;
  detail::with_storage_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* kernel = &add_bias_kernel<T>;
    OPENSCI_LAUNCH(kernel, detail::grid_for(rows * cols), dim3(detail::kThreads), 0, stream, static_cast<T*>(x),
                   static_cast<const T*>(bias), rows, cols);
  });
  OPENSCI_GPU_CHECK_LAUNCH("add_bias_kernel");
}

void broadcast_rows(DType dtype, void* out, const void* row, int64_t rows, int64_t cols, Stream stream) {
  if (rows * cols == 0) return;
  detail::with_storage_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* kernel = &broadcast_rows_kernel<T>;
    OPENSCI_LAUNCH(kernel, detail::grid_for(rows * cols), dim3(detail::kThreads), 0, stream, static_cast<T*>(out),
                   static_cast<const T*>(row), rows, cols);
  });
  OPENSCI_GPU_CHECK_LAUNCH("broadcast_rows_kernel");
}

void add_inplace(DType dtype, void* x, const void* y, int64_t n, Stream stream) {
  if (n == 0) return;
  detail::with_storage_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* kernel = &add_inplace_kernel<T>;
    OPENSCI_LAUNCH(kernel, detail::grid_for(n), dim3(detail::kThreads), 0, stream, static_cast<T*>(x),
                   static_cast<const T*>(y), n);
  });
  OPENSCI_GPU_CHECK_LAUNCH("add_inplace_kernel");
}

void fill_random(DType dtype, void* out, int64_t n, uint64_t seed, float mean, float std, Stream stream) {
  if (n == 0) return;
  detail::with_storage_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* kernel = &fill_random_kernel<T>;
    OPENSCI_LAUNCH(kernel, detail::grid_for(n), dim3(detail::kThreads), 0, stream, static_cast<T*>(out), n, seed, mean,
                   std);
  });
  OPENSCI_GPU_CHECK_LAUNCH("fill_random_kernel");
}

}  // namespace opensci::gpu
