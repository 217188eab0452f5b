#include "opensci/harness/capture.hpp"

#include <fmt/format.h>

#include <cmath>
#include <csignal>
#include <cstring>
#include <fstream>
#include <thread>

#include "opensci/error.hpp"
#include "opensci/forward.hpp"
#include "opensci/harness/environment.hpp"
#include "opensci/safetensors.hpp"

namespace opensci::harness {
namespace fs = std::filesystem;
using nlohmann::json;

std::string_view capture_status_name(CaptureStatus s) {
  switch (s) {
    case CaptureStatus::Ok: return "ok";
    case CaptureStatus::Error: return "error";
    case CaptureStatus::Crash: return "crash";
    case CaptureStatus::Timeout: return "timeout";
    case CaptureStatus::NoOutput: return "no-output";
    case CaptureStatus::BadOutput: return "bad-output";
    case CaptureStatus::Unavailable: return "unavailable";
  }
  return "?";
}

std::string check_capture_output(const fs::path& output, const fs::path& tokens_file) {
  try {
    const SafetensorsFile f(output);
    const auto batch = TokenBatch::from_json_file(tokens_file);
    const auto& logits = f.at("logits");
    if (logits.dtype != DType::F32) return fmt::format("'logits' is {}, expected F32", dtype_name(logits.dtype));
    if (logits.shape.size() != 3 || logits.shape[0] != batch.batch || logits.shape[1] != batch.seq)
      return fmt::format("'logits' has shape {}, expected [{}, {}, vocab] for {}", shape_str(logits.shape), batch.batch,
                         batch.seq, tokens_file.string());
    for (const char* name : {"input_ids", "attention_mask", "position_ids"}) {
      const auto& t = f.at(name);
      if (t.dtype != DType::I64 || element_count(t.shape) != batch.batch * batch.seq)
        return fmt::format("'{}' is {} {}, expected I64 [{}, {}]", name, dtype_name(t.dtype), shape_str(t.shape),
                           batch.batch, batch.seq);
    }
    if (f.read_i64("input_ids") != batch.input_ids) return fmt::format("'input_ids' differ from {}", tokens_file.string());
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

namespace {

CaptureResult replay_golden(const CaptureOptions& o) {
  CaptureResult r;
  const auto slash = o.variant.find('/');
  if (slash == std::string::npos) fail("golden capture needs --variant <model>/<patch set>, got '{}'", o.variant);
  fs::path dir = o.env_spec.value("dir", std::string());
  if (dir.is_relative()) dir = fs::path(OPENSCI_SOURCE_DIR) / dir;
  const auto src = dir / o.variant.substr(0, slash) / o.variant.substr(slash + 1);
  if (!fs::exists(src / "outcome.json"))
    fail("golden capture {} has no outcome.json: the matrix names a golden cell that was never recorded", src.string());
  for (const char* name : {"outcome.json", "provenance.json", "output.safetensors", "state_dict.safetensors", "error.json"})
    if (fs::exists(src / name)) fs::copy_file(src / name, o.out / name, fs::copy_options::overwrite_existing);
  std::ifstream in(o.out / "outcome.json");
  r.outcome = json::parse(in);
  r.outcome["golden"] = src.string();
  const auto recorded = r.outcome.value("status", std::string());
  if (recorded == "ok") {
    // The committed output must be for the batch this cell asks for.
    if (auto problem = check_capture_output(o.out / "output.safetensors", o.tokens_file); !problem.empty()) {
      r.outcome["status"] = "bad-output";
      r.outcome["detail"] = "golden capture " + src.string() + ": " + problem;
    }
  }
  r.status = CaptureStatus::Ok;
  for (auto s : {CaptureStatus::Ok, CaptureStatus::Error, CaptureStatus::Crash, CaptureStatus::Timeout,
                 CaptureStatus::NoOutput, CaptureStatus::BadOutput})
    if (capture_status_name(s) == r.outcome.value("status", std::string())) r.status = s;
  r.detail = "replayed " + src.string() + ": " + r.outcome.value("detail", std::string());
  std::ofstream(o.out / "outcome.json") << r.outcome.dump(2) << "\n";
  return r;
}

}  // namespace

CaptureResult run_capture(const CaptureOptions& o) {
  CaptureResult r;
  fs::create_directories(o.out);
  for (const char* stale : {"SKIPPED", "outcome.json", "output.safetensors", "provenance.json", "error.json",
                            "state_dict.safetensors", "stdout.log", "stderr.log"})
    fs::remove(o.out / stale);
  fs::remove_all(o.out / "run");

  if (o.env_spec.value("provider", std::string()) == "golden") return replay_golden(o);
  auto provider = make_provider(o.env_spec);
  const auto availability = provider->probe();
  if (!availability) {
    r.status = CaptureStatus::Unavailable;
    r.detail = fmt::format("environment {} ({}) is unavailable here: {}", provider->id(), provider->kind(), availability.reason);
    std::ofstream(o.out / "SKIPPED") << r.detail << "\n";
    return r;
  }
  Progress progress("env " + provider->id());
  const Environment env = provider->realise(progress);

  const auto run_dir = o.out / "run";
  const int threads = o.threads > 0 ? o.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  auto extra = private_run_env(run_dir);
  extra["OMP_NUM_THREADS"] = std::to_string(threads);
  std::vector<std::string> args = {"--model", fs::absolute(o.model).string(), "--tokens-file",
                                   fs::absolute(o.tokens_file).string(), "--dtype", o.dtype, "--device", o.device,
                                   "--attn-impl", o.attn_impl, "--out-dir", fs::absolute(o.out).string(),
                                   "--threads", std::to_string(threads)};
  if (o.hidden_states) args.push_back("--hidden-states");
  if (o.dump_state_dict) args.push_back("--dump-state-dict");
  for (const auto& s : o.shims) args.insert(args.end(), {"--shim", s});
  auto spec = env.python(fs::absolute(o.script_dir) / "capture.py", args,
                         {fs::absolute(o.script_dir), fs::absolute(o.model), fs::absolute(o.tokens_file).parent_path(),
                          fs::absolute(o.out)},
                         extra, std::chrono::duration_cast<std::chrono::milliseconds>(o.timeout));
  spec.stdout_path = o.out / "stdout.log";
  spec.stderr_path = o.out / "stderr.log";
  const auto proc = run_process(spec);

  json error;
  if (fs::exists(o.out / "error.json")) {
    try {
      std::ifstream in(o.out / "error.json");
      error = json::parse(in);
    } catch (const json::exception&) {
      error = {{"type", "unreadable error.json"}};
    }
  }
  const auto output = o.out / "output.safetensors";
  if (proc.timed_out) {
    r.status = CaptureStatus::Timeout;
    r.detail = proc.describe();
  } else if (proc.signal != 0) {
    r.status = CaptureStatus::Crash;
    r.detail = proc.describe();
  } else if (!proc.started || proc.exit_code != 0) {
    r.status = CaptureStatus::Error;
    r.detail = error.is_object() ? fmt::format("{} during {}: {}", error.value("type", "?"), error.value("stage", "?"),
                                               error.value("message", ""))
                                 : proc.describe();
    if (!env.import_errors.empty()) r.detail += fmt::format(" (environment import errors: {})", json(env.import_errors).dump());
  } else if (!fs::exists(output)) {
    r.status = CaptureStatus::NoOutput;
    r.detail = "capture exited 0 but wrote no output.safetensors";
  } else if (auto problem = check_capture_output(output, o.tokens_file); !problem.empty()) {
    r.status = CaptureStatus::BadOutput;
    r.detail = problem;
  } else {
    r.status = CaptureStatus::Ok;
    r.detail = fmt::format("captured in {:.1f} s", proc.wall_seconds);
  }
  r.outcome = {{"status", capture_status_name(r.status)},
               {"detail", r.detail},
               {"variant", o.variant},
               {"dtype", o.dtype},
               {"device", o.device},
               {"shims", o.shims},
               {"exit_code", proc.exit_code},
               {"signal", proc.signal},
               {"timed_out", proc.timed_out},
               {"wall_seconds", proc.wall_seconds},
               {"stderr_tail", proc.stderr_tail},
               {"error", error},
               {"environment",
                {{"id", env.id},
                 {"provider", env.provider},
                 {"python", env.python_version},
                 {"torch", env.torch_version},
                 {"transformers", env.transformers_version},
                 {"torch_source", env.torch_source}}}};
  std::ofstream(o.out / "outcome.json.tmp") << r.outcome.dump(2) << "\n";
  fs::rename(o.out / "outcome.json.tmp", o.out / "outcome.json");
  return r;
}

}  // namespace opensci::harness
