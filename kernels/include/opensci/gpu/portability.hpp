// One kernel source, three ways to run it. Kernels and host code name the runtime, bf16
// storage, warps and launches only through this header:
//   OPENSCI_GPU_CUDA       nvcc, CUDA runtime                       (kernels/CMakeLists.txt)
//   OPENSCI_GPU_HIP        hipcc, HIP runtime on AMD (wave64 on CDNA, wave32 on RDNA)
//   OPENSCI_GPU_EMULATION  g++, a host-thread "device" (emulation.hpp): every block runs with
//                          real threads and real barriers, so kernel logic can be tested on a
//                          machine without a GPU. Not a performance path.
// Exactly one is defined, by CMake, on every target that includes this header.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#if (defined(OPENSCI_GPU_CUDA) + defined(OPENSCI_GPU_HIP) + defined(OPENSCI_GPU_EMULATION)) != 1
#error "define exactly one of OPENSCI_GPU_CUDA / OPENSCI_GPU_HIP / OPENSCI_GPU_EMULATION (kernels/CMakeLists.txt does)"
#endif

#if defined(OPENSCI_GPU_CUDA)
#if defined(__CUDACC__)
#include <cuda_runtime.h>
#else
#include <cuda_runtime_api.h>
#endif
#elif defined(OPENSCI_GPU_HIP)
#if defined(__HIPCC__)
#include <hip/hip_runtime.h>
#else
#include <hip/hip_runtime_api.h>
#endif
#else
#include "opensci/gpu/emulation.hpp"
#endif

// ---------------------------------------------------------------------------------------------
// Function qualifiers, launches, shared memory
// ---------------------------------------------------------------------------------------------
// OPENSCI_GPU_DEVICE_CODE: this translation unit holds kernels (nvcc, hipcc, or the emulation's
// g++). Host-only files of a CUDA/HIP build (runtime.cpp, forward.cpp, tests) are compiled by the
// host compiler and see only the host half of this header.
#if defined(OPENSCI_GPU_EMULATION)
#define OPENSCI_GPU_DEVICE_CODE 1
#define OPENSCI_GLOBAL
#define OPENSCI_DEVICE inline
#define OPENSCI_HOST_DEVICE inline
#define OPENSCI_LAUNCH_BOUNDS(threads)
// All shared memory is dynamic (sized by the launcher): one rule on all three platforms.
#define OPENSCI_DYNAMIC_SHARED(name) unsigned char* name = ::opensci::gpu::emu::dynamic_shared()
#define OPENSCI_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  (static_cast<void>(stream), ::opensci::gpu::emu::launch((grid), (block), (shared_bytes), (kernel), __VA_ARGS__))
#elif defined(__CUDACC__) || defined(__HIPCC__)
#define OPENSCI_GPU_DEVICE_CODE 1
#define OPENSCI_GLOBAL __global__
#define OPENSCI_DEVICE __device__ __forceinline__
#define OPENSCI_HOST_DEVICE __host__ __device__ __forceinline__
#define OPENSCI_LAUNCH_BOUNDS(threads) __launch_bounds__(threads)
#define OPENSCI_DYNAMIC_SHARED(name) extern __shared__ __attribute__((aligned(16))) unsigned char name[]
// `kernel` is a function pointer (template instantiations carry commas a macro would split).
#define OPENSCI_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  (kernel)<<<(grid), (block), (shared_bytes), (stream)>>>(__VA_ARGS__)
#else
#define OPENSCI_HOST_DEVICE inline
#endif

namespace opensci::gpu {

#if defined(OPENSCI_GPU_DEVICE_CODE)
// ---------------------------------------------------------------------------------------------
// Warp size: 32 on NVIDIA and RDNA, 64 on CDNA (MI250X, MI300). A device-side constant: with
// several HIP architectures in one build it differs per architecture, so host code never uses it.
// ---------------------------------------------------------------------------------------------
#if defined(OPENSCI_GPU_CUDA)
#define OPENSCI_WARP_SIZE 32
#elif defined(OPENSCI_GPU_HIP)
#if defined(__AMDGCN_WAVEFRONT_SIZE)
#define OPENSCI_WARP_SIZE __AMDGCN_WAVEFRONT_SIZE
#else
#define OPENSCI_WARP_SIZE 64  // host pass of hipcc: not used there
#endif
#else
#define OPENSCI_WARP_SIZE OPENSCI_GPU_EMU_WARP_SIZE
#endif
inline constexpr int kMaxWarpsPerBlock = 1024 / 32;  // sizes reduction scratch for any warp size

// Butterfly exchange inside groups of `width` lanes (a power of two <= warp size); all lanes of
// the warp must call it.
OPENSCI_DEVICE float shfl_xor(float v, int lane_mask, int width) {
#if defined(OPENSCI_GPU_CUDA)
  return __shfl_xor_sync(0xffffffffu, v, lane_mask, width);
#elif defined(OPENSCI_GPU_HIP)
  return __shfl_xor(v, lane_mask, width);
#else
  return emu::shfl_xor(v, lane_mask, width);
#endif
}

OPENSCI_DEVICE void sync_block() {
#if defined(OPENSCI_GPU_EMULATION)
  emu::sync_block();
#else
  __syncthreads();
#endif
}

// fp32 reciprocal square root as torch's CUDA/HIP kernels use it (rsqrtf, <= 2 ulp on NVIDIA).
OPENSCI_DEVICE float rsqrt(float x) {
#if defined(OPENSCI_GPU_EMULATION)
  return 1.0f / std::sqrt(x);
#else
  return rsqrtf(x);
#endif
}

#endif  // OPENSCI_GPU_DEVICE_CODE

// ---------------------------------------------------------------------------------------------
// bf16 storage. One 16-bit struct on all platforms: layout-compatible with __nv_bfloat16,
// hip_bfloat16 / __hip_bfloat16 and rocblas_bfloat16, so buffers go straight to the vendor
// BLAS, while kernels never depend on a vendor's operator set (which differs between CUDA 11/12/13
// and ROCm 5/6). Conversion is round-to-nearest-even, bit-identical to opensci::f32_to_bf16.
// ---------------------------------------------------------------------------------------------
struct bf16 {
  uint16_t bits;
};
static_assert(sizeof(bf16) == 2, "bf16 storage must be 16 bits");

OPENSCI_HOST_DEVICE uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}
OPENSCI_HOST_DEVICE float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}
OPENSCI_HOST_DEVICE float to_float(float v) { return v; }
OPENSCI_HOST_DEVICE float to_float(bf16 v) { return bits_float(static_cast<uint32_t>(v.bits) << 16); }
OPENSCI_HOST_DEVICE bf16 bf16_from_float(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}

// Storing an fp32 value into T rounds once; round_to<T> is that rounding kept in fp32. Kernels use
// it where torch materialises an intermediate tensor in the storage dtype (a precision point).
template <typename T>
OPENSCI_HOST_DEVICE T from_float(float f);
template <>
OPENSCI_HOST_DEVICE float from_float<float>(float f) {
  return f;
}
template <>
OPENSCI_HOST_DEVICE bf16 from_float<bf16>(float f) {
  return bf16_from_float(f);
}
template <typename T>
OPENSCI_HOST_DEVICE float round_to(float f) {
  return to_float(from_float<T>(f));
}

// ---------------------------------------------------------------------------------------------
// Runtime API: the calls the host code makes, one name for all platforms.
// ---------------------------------------------------------------------------------------------
namespace rt {
#if defined(OPENSCI_GPU_CUDA)
using Error = cudaError_t;
using Stream = cudaStream_t;
using Event = cudaEvent_t;
inline constexpr Error kSuccess = cudaSuccess;
inline constexpr const char* kPlatform = "CUDA";
inline Error get_device_count(int* n) { return cudaGetDeviceCount(n); }
inline Error set_device(int d) { return cudaSetDevice(d); }
inline Error malloc(void** p, size_t bytes) { return cudaMalloc(p, bytes); }
inline Error free(void* p) { return cudaFree(p); }
inline Error memcpy_h2d(void* dst, const void* src, size_t bytes) {
  return cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice);
}
inline Error memcpy_d2h(void* dst, const void* src, size_t bytes) {
  return cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost);
}
inline Error memcpy_d2d(void* dst, const void* src, size_t bytes, Stream s) {
  return cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, s);
}
inline Error memset(void* p, int value, size_t bytes, Stream s) { return cudaMemsetAsync(p, value, bytes, s); }
inline Error stream_synchronize(Stream s) { return cudaStreamSynchronize(s); }
inline Error device_synchronize() { return cudaDeviceSynchronize(); }
inline Error get_last_error() { return cudaGetLastError(); }
inline const char* error_name(Error e) { return cudaGetErrorName(e); }
inline const char* error_string(Error e) { return cudaGetErrorString(e); }
inline Error event_create(Event* e) { return cudaEventCreate(e); }
inline Error event_record(Event e, Stream s) { return cudaEventRecord(e, s); }
inline Error event_synchronize(Event e) { return cudaEventSynchronize(e); }
inline Error event_elapsed_ms(float* ms, Event a, Event b) { return cudaEventElapsedTime(ms, a, b); }
inline Error event_destroy(Event e) { return cudaEventDestroy(e); }
inline Error device_name(int d, std::string* name) {
  cudaDeviceProp p{};
  const Error e = cudaGetDeviceProperties(&p, d);
  if (e == kSuccess) *name = p.name;
  return e;
}
#elif defined(OPENSCI_GPU_HIP)
using Error = hipError_t;
using Stream = hipStream_t;
using Event = hipEvent_t;
inline constexpr Error kSuccess = hipSuccess;
inline constexpr const char* kPlatform = "HIP";
inline Error get_device_count(int* n) { return hipGetDeviceCount(n); }
inline Error set_device(int d) { return hipSetDevice(d); }
inline Error malloc(void** p, size_t bytes) { return hipMalloc(p, bytes); }
inline Error free(void* p) { return hipFree(p); }
inline Error memcpy_h2d(void* dst, const void* src, size_t bytes) {
  return hipMemcpy(dst, src, bytes, hipMemcpyHostToDevice);
}
inline Error memcpy_d2h(void* dst, const void* src, size_t bytes) {
  return hipMemcpy(dst, src, bytes, hipMemcpyDeviceToHost);
}
inline Error memcpy_d2d(void* dst, const void* src, size_t bytes, Stream s) {
  return hipMemcpyAsync(dst, src, bytes, hipMemcpyDeviceToDevice, s);
}
inline Error memset(void* p, int value, size_t bytes, Stream s) { return hipMemsetAsync(p, value, bytes, s); }
inline Error stream_synchronize(Stream s) { return hipStreamSynchronize(s); }
inline Error device_synchronize() { return hipDeviceSynchronize(); }
inline Error get_last_error() { return hipGetLastError(); }
inline const char* error_name(Error e) { return hipGetErrorName(e); }
inline const char* error_string(Error e) { return hipGetErrorString(e); }
inline Error event_create(Event* e) { return hipEventCreate(e); }
inline Error event_record(Event e, Stream s) { return hipEventRecord(e, s); }
inline Error event_synchronize(Event e) { return hipEventSynchronize(e); }
inline Error event_elapsed_ms(float* ms, Event a, Event b) { return hipEventElapsedTime(ms, a, b); }
inline Error event_destroy(Event e) { return hipEventDestroy(e); }
inline Error device_name(int d, std::string* name) {
  hipDeviceProp_t p{};
  const Error e = hipGetDeviceProperties(&p, d);
  if (e == kSuccess) *name = p.name;
  return e;
}
#else
using Error = emu::Error;
using Stream = emu::Stream;
using Event = emu::Event;
inline constexpr Error kSuccess = emu::Error::Success;
inline constexpr const char* kPlatform = "emulation";
inline Error get_device_count(int* n) { return emu::get_device_count(n); }
inline Error set_device(int) { return kSuccess; }
inline Error malloc(void** p, size_t bytes) { return emu::malloc(p, bytes); }
inline Error free(void* p) { return emu::free(p); }
inline Error memcpy_h2d(void* dst, const void* src, size_t bytes) { return emu::memcpy(dst, src, bytes); }
inline Error memcpy_d2h(void* dst, const void* src, size_t bytes) { return emu::memcpy(dst, src, bytes); }
inline Error memcpy_d2d(void* dst, const void* src, size_t bytes, Stream) { return emu::memcpy(dst, src, bytes); }
inline Error memset(void* p, int value, size_t bytes, Stream) { return emu::memset(p, value, bytes); }
inline Error stream_synchronize(Stream) { return kSuccess; }
inline Error device_synchronize() { return kSuccess; }
inline Error get_last_error() { return emu::get_last_error(); }
inline const char* error_name(Error e) { return emu::error_name(e); }
inline const char* error_string(Error e) { return emu::error_name(e); }
inline Error event_create(Event* e) { return emu::event_create(e); }
inline Error event_record(Event e, Stream) { return emu::event_record(e); }
inline Error event_synchronize(Event) { return kSuccess; }
inline Error event_elapsed_ms(float* ms, Event a, Event b) { return emu::event_elapsed_ms(ms, a, b); }
inline Error event_destroy(Event e) { return emu::event_destroy(e); }
inline Error device_name(int, std::string* name) {
  *name = "host-thread emulation";
  return kSuccess;
}
#endif
}  // namespace rt

using Stream = rt::Stream;

// Throws opensci::Error: "<platform> call `<call>` failed at file:line: <name> (<code>): <text>".
[[noreturn]] void fail_runtime_call(const char* call, int code, const char* name, const char* text, const char* file,
                                    int line);
[[noreturn]] void fail_gpu(const std::string& message);

inline void check(rt::Error e, const char* call, const char* file, int line) {
  if (e != rt::kSuccess)
    fail_runtime_call(call, static_cast<int>(e), rt::error_name(e), rt::error_string(e), file, line);
}

}  // namespace opensci::gpu

#define OPENSCI_GPU_CHECK(call) ::opensci::gpu::check((call), #call, __FILE__, __LINE__)
// After a launch: configuration errors surface here, execution errors at the next synchronisation.
#define OPENSCI_GPU_CHECK_LAUNCH(kernel_name) \
  ::opensci::gpu::check(::opensci::gpu::rt::get_last_error(), "launch " kernel_name, __FILE__, __LINE__)
