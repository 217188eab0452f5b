// transformers' own distributed path, captured: parallel/python/capture_distributed.py under
// torchrun (`python -m torch.distributed.run --standalone --nproc-per-node W`, gloo on CPU) in an
// isolated environment, as a subprocess with a timeout that kills its process group. Writes the
// capture directory the `cell` command reads (outcome.json, provenance.json, output.safetensors,
// error.json), with the same statuses as harness::run_capture. A version or model without the
// requested path (no tp_plan / no DistributedConfig / no TP or EP plan in the config class) is
// not an outcome: <out>/SKIPPED holds the reason and the cell is Not Run.
#pragma once

#include <chrono>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "opensci/harness/capture.hpp"

namespace opensci::parallel {

struct DistributedCaptureOptions {
  nlohmann::json env_spec;
  std::filesystem::path model, tokens_file, out;
  std::string mode = "tp";  // tp: from_pretrained(tp_plan="auto"); ep: DistributedConfig(enable_expert_parallel=True)
  int world = 2;
  std::string dtype = "float32", device = "cpu";
  std::string variant;  // "<model>/<patch set>", recorded
  std::chrono::seconds timeout{600};
};

harness::CaptureResult run_distributed_capture(const DistributedCaptureOptions& options);

}  // namespace opensci::parallel
