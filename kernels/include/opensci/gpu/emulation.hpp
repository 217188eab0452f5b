// A host-thread "device" for OPENSCI_GPU_EMULATION builds (included by portability.hpp only).
//
// A launch runs its blocks one after another; each block runs with blockDim real std::threads,
// sync_block() is a real barrier and warp shuffles exchange through per-warp barriers. So a
// missing barrier, a wrong index, a warp-size assumption (build with OPENSCI_GPU_EMU_WARP_SIZE=64
// to play an AMD CDNA wavefront) or an out-of-bounds write shows up here as it would on a GPU,
// on a machine that has none. Shared memory is refilled with NaN bytes before every block, so
// reading shared memory nobody wrote shows as NaN. Device memory is host memory. It says
// nothing about speed, memory coalescing or the GPU memory model's weaker orderings.
#pragma once

#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

#ifndef OPENSCI_GPU_EMU_WARP_SIZE
#define OPENSCI_GPU_EMU_WARP_SIZE 32
#endif

// The CUDA built-ins the kernels read, as thread-local variables set by the launcher.
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace opensci::gpu::emu {

enum class Error { Success = 0, InvalidConfiguration = 9, MemoryAllocation = 2, InvalidValue = 1, NoDevice = 100 };
using Stream = void*;
struct EventRecord;
using Event = EventRecord*;

Error get_device_count(int* n);
Error malloc(void** p, size_t bytes);
Error free(void* p);
Error memcpy(void* dst, const void* src, size_t bytes);
Error memset(void* p, int value, size_t bytes);
Error get_last_error();
const char* error_name(Error e);
Error event_create(Event* e);
Error event_record(Event e);
Error event_elapsed_ms(float* ms, Event a, Event b);
Error event_destroy(Event e);

// Per-thread view of the running block (set by run_grid).
unsigned char* dynamic_shared();
void sync_block();
float shfl_xor(float v, int lane_mask, int width);

// Runs body() once per (block, thread) of the grid; records InvalidConfiguration instead of
// running when the launch would fail on a GPU (no threads, > 1024 threads, > 48 KiB shared).
void run_grid(dim3 grid, dim3 block, size_t shared_bytes, void (*body)(void*), void* closure);

template <typename... P, typename... A>
void launch(dim3 grid, dim3 block, size_t shared_bytes, void (*kernel)(P...), A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel argument count");
  struct Closure {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> params;
  } closure{kernel, std::tuple<std::decay_t<P>...>(static_cast<std::decay_t<P>>(args)...)};
  run_grid(
      grid, block, shared_bytes,
      [](void* c) {
        auto* cl = static_cast<Closure*>(c);
        std::apply(cl->kernel, cl->params);
      },
      &closure);
}

}  // namespace opensci::gpu::emu
