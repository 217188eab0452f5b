// Runs harness/python/capture.py inside an isolated environment as a subprocess and records
// what happened in <out>/outcome.json, whatever happened:
//   ok          output.safetensors present, parseable, logits [batch, seq, vocab] for our batch
//   error       the script raised (error.json: stage, type, message) or exited non-zero
//   crash       killed by a signal
//   timeout     ran past the limit; the whole process group was killed
//   no-output   exited 0 without writing output.safetensors
//   bad-output  output.safetensors unreadable, or not the logits of the requested batch
// A live capture runs in the environment's capture worker (capture_worker.hpp: a fork server that
// imported torch and transformers once) unless CaptureOptions::worker is false (`capture
// --no-worker`) or OPENSCI_CAPTURE_WORKER=0; when no worker can be had it runs cold and says why.
// outcome.json "runner" records which ({"mode": "worker", "worker_pid", ...} or {"mode": "cold",
// "why"}); a worker that dies mid-capture is a crash, a worker state that is not pristine an error.
// The environment being unavailable on this machine is not an outcome: <out>/SKIPPED holds
// the reason and the caller reports Not Run.
//
// A spec {"provider": "golden", "dir": "fixtures/golden/4.57.6"} replays a committed capture
// (<dir>/<model>/<patch set>/: output.safetensors, provenance.json, outcome.json[, state_dict])
// made where that version could be installed; it is checked like a live one.
#pragma once
#include <optional>
#include <map>
#include <functional>

#include <chrono>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "opensci/harness/capture_worker.hpp"

namespace opensci::harness {

struct CaptureOptions {
  nlohmann::json env_spec;
  std::filesystem::path model, tokens_file, out;
  std::filesystem::path script_dir;  // harness/python
  std::string variant;               // "<model>/<patch set>": recorded, and the key of golden captures
  std::string dtype = "float32", device = "cpu", attn_impl = "default";
  bool hidden_states = true, dump_state_dict = true;
  std::vector<std::string> shims;
  int threads = 0;  // 0 = all cores
  std::chrono::seconds timeout{600};
  bool worker = true;  // false: a cold interpreter (`--no-worker`)
  WorkerSettings worker_settings;
};

enum class CaptureStatus { Ok, Error, Crash, Timeout, NoOutput, BadOutput, Unavailable };

struct CaptureResult {
  CaptureStatus status = CaptureStatus::Error;
  std::string detail;
  nlohmann::json outcome;  // what was written to outcome.json
};

std::string_view capture_status_name(CaptureStatus status);

CaptureResult run_capture(const CaptureOptions& options);

// The "environment" record of a capture's outcome.json: id, provider, python, torch (and where
// that torch came from), transformers. Shared by every capture path (capture.cpp, parallel/).
nlohmann::json environment_record(const Environment& env);

// The environment variables a capture on `device` ("cuda", "cuda:N", "cpu") gets so that it runs
// on the GPU CTest allocated to its test (RESOURCE_GROUPS gpus:1 -> CTEST_RESOURCE_GROUP_<n>_GPUS)
// or OPENSCI_GPU_DEVICE names: CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES = that id, so the
// capture's "cuda" is that device. Empty for CPU captures and without an allocation (the capture
// then sees every GPU and uses device 0, as torch does). `why` receives the selection's source.
// Throws opensci::Error on a malformed allocation (never a silent device 0).
using EnvLookup = std::function<std::optional<std::string>(const std::string& name)>;
std::map<std::string, std::string> capture_gpu_env(const std::string& device, const EnvLookup& env, std::string* why = nullptr);

// Checks a capture's output file against the batch it was asked to run. Returns "" when it
// is usable, else what is wrong (used for the bad-output status, and by tests).
std::string check_capture_output(const std::filesystem::path& output, const std::filesystem::path& tokens_file);

}  // namespace opensci::harness
