// The host-thread device of OPENSCI_GPU_EMULATION builds (see emulation.hpp).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "opensci/gpu/portability.hpp"

namespace opensci::gpu::emu {
namespace {

std::atomic<Error> g_last_error{Error::Success};

// A reusable barrier whose party count shrinks when a thread leaves the kernel early (a thread
// that returned no longer takes part in __syncthreads, as on the GPU).
class Barrier {
 public:
  void reset(int parties) {
    std::lock_guard lock(m_);
    expected_ = parties;
    arrived_ = 0;
  }
  void arrive_and_wait() {
    std::unique_lock lock(m_);
    const uint64_t gen = generation_;
    if (++arrived_ >= expected_) {
      release();
    } else {
      cv_.wait(lock, [&] { return generation_ != gen; });
    }
  }
  void depart() {
    std::lock_guard lock(m_);
    --expected_;
    if (arrived_ > 0 && arrived_ >= expected_) release();
  }

 private:
  void release() {
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
  }
  std::mutex m_;
  std::condition_variable cv_;
  int expected_ = 0;
  int arrived_ = 0;
  uint64_t generation_ = 0;
};

struct Block {
  int threads = 0;
  int warps = 0;
  std::vector<unsigned char> shared;
  Barrier block_barrier;
  std::vector<std::unique_ptr<Barrier>> warp_barriers;
  std::vector<float> warp_scratch;  // [warps * warp size]
};

struct ThreadContext {
  Block* block = nullptr;
  int linear = 0;  // thread index in the block
};
thread_local ThreadContext t_ctx;

constexpr int kWarp = OPENSCI_GPU_EMU_WARP_SIZE;
constexpr size_t kMaxShared = 48 * 1024;  // CUDA's default dynamic shared memory limit per block

}  // namespace

struct EventRecord {
  std::chrono::steady_clock::time_point when{};
};

Error get_device_count(int* n) {
  *n = 1;
  return Error::Success;
}
Error malloc(void** p, size_t bytes) {
  const size_t rounded = (bytes + 255) / 256 * 256;
  *p = std::aligned_alloc(256, rounded == 0 ? 256 : rounded);
  if (*p == nullptr) return Error::MemoryAllocation;
  std::memset(*p, 0xA5, rounded == 0 ? 256 : rounded);  // cudaMalloc memory is not zeroed either
  return Error::Success;
}
Error free(void* p) {
  std::free(p);
  return Error::Success;
}
Error memcpy(void* dst, const void* src, size_t bytes) {
  if (bytes) std::memcpy(dst, src, bytes);
  return Error::Success;
}
Error memset(void* p, int value, size_t bytes) {
  if (bytes) std::memset(p, value, bytes);
  return Error::Success;
}
Error get_last_error() { return g_last_error.exchange(Error::Success); }
const char* error_name(Error e) {
  switch (e) {
    case Error::Success:
      return "emuSuccess";
    case Error::InvalidConfiguration:
      return "emuErrorInvalidConfiguration";
    case Error::MemoryAllocation:
      return "emuErrorMemoryAllocation";
    case Error::InvalidValue:
      return "emuErrorInvalidValue";
    case Error::NoDevice:
      return "emuErrorNoDevice";
  }
  return "emuErrorUnknown";
}
Error event_create(Event* e) {
  *e = new EventRecord;
  return Error::Success;
}
Error event_record(Event e) {
  e->when = std::chrono::steady_clock::now();
  return Error::Success;
}
Error event_elapsed_ms(float* ms, Event a, Event b) {
  *ms = std::chrono::duration<float, std::milli>(b->when - a->when).count();
  return Error::Success;
}
Error event_destroy(Event e) {
  delete e;
  return Error::Success;
}

unsigned char* dynamic_shared() { return t_ctx.block->shared.data(); }

void sync_block() { t_ctx.block->block_barrier.arrive_and_wait(); }

float shfl_xor(float v, int lane_mask, int width) {
  Block& b = *t_ctx.block;
  const int warp = t_ctx.linear / kWarp, lane = t_ctx.linear % kWarp;
  const int warp_lanes = std::min(kWarp, b.threads - warp * kWarp);
  float* scratch = b.warp_scratch.data() + warp * kWarp;
  Barrier& barrier = *b.warp_barriers[static_cast<size_t>(warp)];
  scratch[lane] = v;
  barrier.arrive_and_wait();
  int src = lane ^ lane_mask;
  if (src / width != lane / width || src >= warp_lanes) src = lane;  // outside the segment: own value
  const float r = scratch[src];
  barrier.arrive_and_wait();
  return r;
}

void run_grid(dim3 grid, dim3 block_dim, size_t shared_bytes, void (*body)(void*), void* closure) {
  const long threads = static_cast<long>(block_dim.x) * block_dim.y * block_dim.z;
  const long blocks = static_cast<long>(grid.x) * grid.y * grid.z;
  if (threads <= 0 || threads > 1024 || blocks <= 0 || shared_bytes > kMaxShared || grid.y > 65535 || grid.z > 65535) {
    g_last_error = Error::InvalidConfiguration;
    return;
  }
  Block block;
  block.threads = static_cast<int>(threads);
  block.warps = (block.threads + kWarp - 1) / kWarp;
  block.shared.resize(shared_bytes == 0 ? 16 : shared_bytes);
  block.warp_scratch.resize(static_cast<size_t>(block.warps * kWarp));
  for (int w = 0; w < block.warps; ++w) block.warp_barriers.push_back(std::make_unique<Barrier>());
  Barrier block_done, block_ready;  // fixed party count, never departed from
  block_done.reset(block.threads);
  block_ready.reset(block.threads);
  auto prepare_block = [&] {  // between blocks, while every thread waits at block_ready
    std::memset(block.shared.data(), 0xFF, block.shared.size());  // NaN in every float / bf16
    block.block_barrier.reset(block.threads);
    for (int w = 0; w < block.warps; ++w)
      block.warp_barriers[static_cast<size_t>(w)]->reset(std::min(kWarp, block.threads - w * kWarp));
  };
  prepare_block();

  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads));
  for (int t = 0; t < block.threads; ++t) {
    pool.emplace_back([&, t] {
      t_ctx = {&block, t};
      threadIdx = dim3(static_cast<unsigned>(t) % block_dim.x, static_cast<unsigned>(t) / block_dim.x % block_dim.y,
                       static_cast<unsigned>(t) / (block_dim.x * block_dim.y));
      blockDim = block_dim;
      gridDim = grid;
      for (long b = 0; b < blocks; ++b) {
        blockIdx = dim3(static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                        static_cast<unsigned>(b / (static_cast<long>(grid.x) * grid.y)));
        body(closure);
        // This thread left the kernel: it no longer counts for barriers of this block.
        block.block_barrier.depart();
        block.warp_barriers[static_cast<size_t>(t / kWarp)]->depart();
        // Block end: everyone arrives, thread 0 prepares the next block, everyone goes on.
        block_done.arrive_and_wait();
        if (t == 0) prepare_block();
        block_ready.arrive_and_wait();
      }
      t_ctx = {};
    });
  }
  for (auto& th : pool) th.join();
}

}  // namespace opensci::gpu::emu
