// Reference backends by name: the CPU reference always; libtorch, CUDA and HIP when built in.
#pragma once

#include <string>
#include <vector>

#include "opensci/forward.hpp"

namespace opensci::harness {

// precision: "fp64" (golden, CPU only), "fp32", "bf16" (GPU backends).
ForwardResult run_reference(const std::string& backend, const Checkpoint& checkpoint, const TokenBatch& tokens,
                            const std::string& precision, bool capture_hidden);

std::vector<std::string> available_backends();

}  // namespace opensci::harness
