#include "opensci/harness/capture.hpp"
#include "opensci/gpu/resource_groups.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>
#include <csignal>
#include <cstring>
#include <fstream>
#include <limits>
#include <thread>

#include "opensci/error.hpp"
#include "opensci/forward.hpp"
#include "opensci/harness/environment.hpp"
#include "opensci/harness/sha256.hpp"
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

// What a golden fixture must prove before it is replayed: every file it holds is the one
// golden.json hashed (nothing added, removed or edited), and it was recorded for what this cell
// asks: the variant, the shims, the dtype and device. Returns the problems, each naming its field.
std::vector<std::string> verify_golden(const fs::path& src, const CaptureOptions& o) {
  std::vector<std::string> problems;
  json golden;
  try {
    std::ifstream in(src / "golden.json");
    if (!in) return {fmt::format("{}: no golden.json (every golden fixture records the sha256 of its files)", src.string())};
    golden = json::parse(in);
  } catch (const json::exception& e) {
    return {fmt::format("{}: golden.json is not valid JSON: {}", (src / "golden.json").string(), e.what())};
  }
  const auto files = golden.value("files", json::object());
  if (!files.is_object() || files.empty()) problems.push_back("golden.json: 'files' lists no file hashes");
  for (const auto& e : fs::directory_iterator(src)) {
    const auto name = e.path().filename().string();
    if (name == "golden.json") continue;
    if (!files.contains(name)) problems.push_back(fmt::format("golden.json files: {} is in the fixture but not hashed", name));
  }
  for (const auto& [name, entry] : files.items()) {
    const auto path = src / name;
    if (!fs::exists(path)) {
      problems.push_back(fmt::format("golden.json files.{}: listed but missing from {}", name, src.string()));
      continue;
    }
    const auto want = entry.value("sha256", std::string());
    const auto got = sha256_file(path);
    if (got != want)
      problems.push_back(fmt::format("golden.json files.{}.sha256: recorded {}, the file hashes to {} (edited after recording)",
                                     name, want, got));
  }
  std::ifstream oin(src / "outcome.json");
  json outcome;
  try {
    outcome = json::parse(oin);
  } catch (const json::exception& e) {
    problems.push_back(fmt::format("outcome.json: not valid JSON: {}", e.what()));
    return problems;
  }
  const auto field = [&](const char* key) {
    return outcome.contains(key) && outcome[key].is_string() ? outcome[key].get<std::string>() : std::string("<none>");
  };
  if (field("variant") != o.variant)
    problems.push_back(fmt::format("outcome.json variant: recorded '{}', the cell asks for '{}'", field("variant"), o.variant));
  if (field("dtype") != o.dtype)
    problems.push_back(fmt::format("outcome.json dtype: recorded {}, the cell asks for {}", field("dtype"), o.dtype));
  if (field("device") != o.device)
    problems.push_back(fmt::format("outcome.json device: recorded {}, the cell asks for {}", field("device"), o.device));
  std::vector<std::string> shims;
  for (const auto& s : outcome.value("shims", json::array())) shims.push_back(s.is_string() ? s.get<std::string>() : s.dump());
  auto want_shims = o.shims;
  std::sort(shims.begin(), shims.end());
  std::sort(want_shims.begin(), want_shims.end());
  if (shims != want_shims)
    problems.push_back(fmt::format("outcome.json shims: recorded [{}], the cell applies [{}]", fmt::join(shims, ", "),
                                   fmt::join(want_shims, ", ")));
  const auto genv = golden.value("environment", json::object());
  const auto oenv = outcome.value("environment", json::object());
  if (genv.value("transformers", std::string()) != oenv.value("transformers", std::string()))
    problems.push_back(fmt::format("golden.json environment.transformers {} differs from outcome.json's {}",
                                   genv.value("transformers", std::string()), oenv.value("transformers", std::string())));
  return problems;
}

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
  if (const auto problems = verify_golden(src, o); !problems.empty()) {
    // A fixture that is not what it claims is never judged: the cell fails naming the field.
    r.outcome["recorded_status"] = r.outcome.value("status", std::string());
    r.outcome["status"] = "bad-output";
    r.outcome["detail"] = fmt::format("golden capture {} fails verification: {}", src.string(), fmt::join(problems, "; "));
    r.outcome["golden_problems"] = problems;
  } else if (r.outcome.value("status", std::string()) == "ok") {
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

nlohmann::json environment_record(const Environment& env) {
  return {{"id", env.id},
          {"provider", env.provider},
          {"python", env.python_version},
          {"torch", env.torch_version},
          {"transformers", env.transformers_version},
          {"torch_source", env.torch_source}};
}

std::map<std::string, std::string> capture_gpu_env(const std::string& device, const EnvLookup& env, std::string* why) {
  if (!device.starts_with("cuda")) return {};
  // The host does not know how many GPUs the capture's runtime sees: the allocation is checked
  // for form here, and the capture fails on a device its runtime does not have.
  const auto s = gpu::select_gpu(env, std::numeric_limits<int>::max());
  if (why) *why = s.source;
  if (!s.from_ctest && !env("OPENSCI_GPU_DEVICE")) return {};
  if (device.size() > 4 && device != "cuda:0")
    fail("capture on '{}' with a GPU allocation ({}): the capture sees only the allocated GPU, as cuda:0; ask for "
         "'cuda'",
         device, s.source);
  const auto id = std::to_string(s.device);
  return {{"CUDA_VISIBLE_DEVICES", id}, {"HIP_VISIBLE_DEVICES", id}};
}

CaptureResult run_capture(const CaptureOptions& o) {
  CaptureResult r;
  fs::create_directories(o.out);
  for (const char* stale : {"SKIPPED", "SKIPPED.json", "outcome.json", "output.safetensors", "provenance.json", "error.json",
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
    std::ofstream(o.out / "SKIPPED.json") << json{{"reason", r.detail}, {"unreachable", availability.unreachable}}.dump(2) << "\n";
    return r;
  }
  Progress progress("env " + provider->id());
  const Environment env = provider->realise(progress);

  const auto run_dir = o.out / "run";
  const int threads = o.threads > 0 ? o.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  auto extra = private_run_env(run_dir);
  extra["OMP_NUM_THREADS"] = std::to_string(threads);
  std::string gpu_why;
  for (const auto& [k, v] : capture_gpu_env(o.device, [](const std::string& name) -> std::optional<std::string> {
         const char* v = std::getenv(name.c_str());
         return v ? std::optional<std::string>(v) : std::nullopt;
       }, &gpu_why))
    extra[k] = v;
  if (!gpu_why.empty()) fmt::print("capture: {} ({})\n", extra.count("CUDA_VISIBLE_DEVICES") ? "GPU " + extra["CUDA_VISIBLE_DEVICES"] : "every GPU visible", gpu_why);
  std::vector<std::string> args = {"--model", fs::absolute(o.model).string(), "--tokens-file",
                                   fs::absolute(o.tokens_file).string(), "--dtype", o.dtype, "--device", o.device,
                                   "--attn-impl", o.attn_impl, "--out-dir", fs::absolute(o.out).string(),
                                   "--threads", std::to_string(threads)};
  if (o.hidden_states) args.push_back("--hidden-states");
  if (o.dump_state_dict) args.push_back("--dump-state-dict");
  for (const auto& s : o.shims) args.insert(args.end(), {"--shim", s});
  const fs::path script = fs::absolute(o.script_dir) / "capture.py";
  const std::vector<fs::path> host_dirs = {fs::absolute(o.script_dir), fs::absolute(o.model),
                                           fs::absolute(o.tokens_file).parent_path(), fs::absolute(o.out)};
  const auto timeout = std::chrono::duration_cast<std::chrono::milliseconds>(o.timeout);
  std::string cold_why = "--no-worker";
  if (const char* v = std::getenv("OPENSCI_CAPTURE_WORKER"); v && std::string(v) == "0") cold_why = "OPENSCI_CAPTURE_WORKER=0";
  WorkerRun worker;
  if (o.worker && cold_why == "--no-worker") {
    worker = run_in_worker(env, {script, args, host_dirs, extra, o.out / "stdout.log", o.out / "stderr.log", timeout},
                           o.worker_settings);
    cold_why = worker.fallback_reason;
    if (!worker.used) fmt::print(stderr, "capture: running cold: no capture worker: {}\n", cold_why);
  }
  ProcessResult proc;
  json runner;
  if (worker.used) {
    proc = worker.proc;
    runner = worker.record;
  } else {
    auto spec = env.python(script, args, host_dirs, extra, timeout);
    spec.stdout_path = o.out / "stdout.log";
    spec.stderr_path = o.out / "stderr.log";
    proc = run_process(spec);
    runner = {{"mode", "cold"}, {"why", cold_why}};
  }

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
    if (worker.worker_lost) r.detail += "; " + worker.detail;
  } else if (worker.worker_lost) {
    r.status = CaptureStatus::Crash;
    r.detail = worker.detail + "; its process group was killed";
  } else if (worker.unclean || worker.setup_failed) {
    r.status = CaptureStatus::Error;
    r.detail = worker.detail;
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
    r.detail = fmt::format("captured in {:.2f} s{}", proc.wall_seconds,
                           worker.used ? fmt::format(" (capture worker pid {})", runner.value("worker_pid", 0)) : "");
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
               {"runner", runner},
               {"error", error},
               {"environment", environment_record(env)}};
  std::ofstream(o.out / "outcome.json.tmp") << r.outcome.dump(2) << "\n";
  fs::rename(o.out / "outcome.json.tmp", o.out / "outcome.json");
  return r;
}

}  // namespace opensci::harness
