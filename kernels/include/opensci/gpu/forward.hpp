// The OpenSci forward pass on a GPU (CUDA or HIP, or the host-thread emulation): the same
// inputs and outputs as opensci::forward (reference/include/opensci/forward.hpp) — Checkpoint +
// TokenBatch -> ForwardResult with the same hidden-state names — in fp32 or bf16 storage with
// fp32 accumulation and torch's precision points (kernels/include/opensci/gpu/ops.hpp).
//
// A GpuModel uploads every parameter once (converted to the storage dtype, as model.to(dtype)
// does) and then runs any number of batches; activations live in a workspace that grows to the
// largest batch seen. Not thread-safe: one GpuModel per host thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "opensci/checkpoint.hpp"
#include "opensci/forward.hpp"
#include "opensci/gpu/gemm.hpp"
#include "opensci/gpu/ops.hpp"

namespace opensci::gpu {

struct GpuForwardOptions {
  DType dtype = DType::F32;
  GemmBackend gemm = GemmBackend::Auto;
  int device = -1;  // < 0: the device probe_device() selects (CTest's allocation, else 0)
};

struct GpuRunOptions {
  bool capture_hidden = false;  // per-layer tensors, names as opensci::ForwardOptions
  bool download_logits = true;  // false: logits stay on the device (benchmarks)
};

class GpuModel {
 public:
  // Validates the checkpoint against its config (validate_checkpoint) and uploads it.
  GpuModel(const Checkpoint& checkpoint, const GpuForwardOptions& options);
  // Every parameter the config implies, drawn on the device: linear weights, biases and embeddings
  // ~ N(0, initializer_range), norm weights 1 + N(0, 0.1) (the toy builder's rule) — for
  // benchmarks at shapes no one wants to write to disk.
  static GpuModel random(const ModelConfig& config, uint64_t seed, const GpuForwardOptions& options);

  GpuModel(GpuModel&&) noexcept;
  GpuModel& operator=(GpuModel&&) noexcept;
  ~GpuModel();

  ForwardResult forward(const TokenBatch& tokens, const GpuRunOptions& run = {}) const;
  void synchronize() const;

  const ModelConfig& config() const;
  DType dtype() const;
  const char* gemm_name() const;
  size_t parameter_bytes() const;

 private:
  struct Impl;
  explicit GpuModel(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// One-shot convenience: upload, run, download.
ForwardResult forward(const Checkpoint& checkpoint, const TokenBatch& tokens, const GpuForwardOptions& options,
                      bool capture_hidden);

}  // namespace opensci::gpu
