// The OpenSci forward through libtorch (ATen ops from C++), written as transformers' eager
// modules compute it: RMSNorm in fp32 then cast, linear = at::linear (addmm), rotary cos/sin
// in fp32 cast to the model dtype, eager attention (matmul, additive finfo.min mask, softmax
// in fp32 cast back, matmul), SwiGLU, the Qwen3-MoE 4.x loop (fp32 softmax, topk, renorm, cast,
// index_add_ per expert). Same inputs and outputs as opensci::forward; torch stays out of this
// header, so callers need neither torch's headers nor its flags.
#pragma once

#include <string>

#include "opensci/checkpoint.hpp"
#include "opensci/forward.hpp"

namespace opensci::libtorch {

struct TorchForwardOptions {
  std::string dtype = "fp32";  // fp32 | bf16 | fp64 (the model dtype, as model.to(dtype))
  std::string device = "cpu";  // cpu | cuda (when this libtorch was built with CUDA or ROCm)
  bool capture_hidden = false;
};

ForwardResult forward(const Checkpoint& checkpoint, const TokenBatch& tokens, const TorchForwardOptions& options);

std::string torch_version();  // "1.13.0", "2.5.1+cu124", ...
bool cuda_available();

}  // namespace opensci::libtorch
