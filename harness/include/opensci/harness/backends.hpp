// Reference backends by name: the CPU reference always; "libtorch" (backends/libtorch) and the
// GPU forward (kernels/: "cuda", "hip", or "emulation") when this binary was built with them.
#pragma once

#include <string>
#include <vector>

#include "opensci/forward.hpp"

namespace opensci::harness {

// precision: "fp64" (golden: cpu; libtorch too), "fp32", "bf16" (cpu: fp32 compute with bf16
// storage at torch's rounding points; libtorch and GPU backends).
// defect: a known defect for the mutation tests (ForwardOptions::defect; cpu only), "" in real runs.
ForwardResult run_reference(const std::string& backend, const Checkpoint& checkpoint, const TokenBatch& tokens,
                            const std::string& precision, bool capture_hidden, const std::string& defect = "");

std::vector<std::string> available_backends();

}  // namespace opensci::harness
