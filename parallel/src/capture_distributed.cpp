#include "opensci/parallel/capture_distributed.hpp"

#include <fmt/format.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include "opensci/error.hpp"
#include "opensci/harness/environment.hpp"
#include "opensci/harness/process.hpp"

namespace opensci::parallel {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

json read_json_file(const fs::path& p) {
  std::ifstream in(p);
  if (!in) return json();
  try {
    return json::parse(in);
  } catch (const json::exception&) {
    return json{{"type", "unreadable " + p.filename().string()}};
  }
}

// A loopback TCP port nobody listens on right now (bound to 0, read back, released).
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) fail("capture-distributed: socket(): {}", std::strerror(errno));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    ::close(fd);
    fail("capture-distributed: cannot find a free loopback port: {}", std::strerror(errno));
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

}  // namespace

harness::CaptureResult run_distributed_capture(const DistributedCaptureOptions& o) {
  using harness::CaptureStatus;
  harness::CaptureResult r;
  fs::create_directories(o.out);
  for (const auto& entry : fs::directory_iterator(o.out))
    if (entry.is_regular_file()) fs::remove(entry.path());
  fs::remove_all(o.out / "run");
  if (o.mode != "tp" && o.mode != "ep") fail("capture-distributed: --mode must be tp or ep, not '{}'", o.mode);

  auto provider = harness::make_provider(o.env_spec);
  const auto availability = provider->probe();
  if (!availability) {
    r.status = CaptureStatus::Unavailable;
    r.detail = fmt::format("environment {} ({}) is unavailable here: {}", provider->id(), provider->kind(), availability.reason);
    std::ofstream(o.out / "SKIPPED") << r.detail << "\n";
    return r;
  }
  harness::Progress progress("env " + provider->id());
  const harness::Environment env = provider->realise(progress);

  const fs::path python_dir = fs::path(OPENSCI_SOURCE_DIR) / "parallel/python";
  const fs::path capture_dir = fs::path(OPENSCI_SOURCE_DIR) / "harness/python";
  auto extra = harness::private_run_env(o.out / "run");
  extra["OMP_NUM_THREADS"] = "1";
  extra["OPENSCI_CAPTURE_DIR"] = capture_dir.string();
  // Debian's torch is built without libuv (torchrun.py and env:// read this).
  extra["USE_LIBUV"] = "0";
  // torchrun (parallel/python/torchrun.py: torch.distributed.run with TCPStore honouring USE_LIBUV,
  // which Debian's libuv-less torch needs), static rendezvous on a free loopback port.
  const std::vector<std::string> args = {(python_dir / "torchrun.py").string(), "--nnodes", "1", "--node-rank", "0",
                                         "--master-addr", "127.0.0.1", "--master-port", std::to_string(free_port()),
                                         "--nproc-per-node", std::to_string(o.world), "--max-restarts", "0",
                                         (python_dir / "capture_distributed.py").string(),
                                         "--model", fs::absolute(o.model).string(),
                                         "--tokens-file", fs::absolute(o.tokens_file).string(),
                                         "--mode", o.mode, "--dtype", o.dtype, "--device", o.device,
                                         "--out-dir", fs::absolute(o.out).string()};
  auto spec = env.python_args(args,
                              {python_dir, capture_dir, fs::absolute(o.model), fs::absolute(o.tokens_file).parent_path(),
                               fs::absolute(o.out)},
                              extra, std::chrono::duration_cast<std::chrono::milliseconds>(o.timeout));
  spec.stdout_path = o.out / "stdout.log";
  spec.stderr_path = o.out / "stderr.log";
  const auto proc = harness::run_process(spec);

  const auto unsupported = read_json_file(o.out / "unsupported.json");
  if (unsupported.is_object() && unsupported.contains("reason")) {
    r.status = CaptureStatus::Unavailable;
    r.detail = fmt::format("no {} path: {}", o.mode == "tp" ? "tensor-parallel" : "expert-parallel",
                           unsupported.value("reason", ""));
    std::ofstream(o.out / "SKIPPED") << r.detail << "\n";
    return r;
  }
  const auto error = read_json_file(o.out / "error.json");
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
                                 : "torchrun " + proc.describe();
  } else if (!fs::exists(output)) {
    r.status = CaptureStatus::NoOutput;
    r.detail = "torchrun exited 0 but rank 0 wrote no output.safetensors";
  } else if (auto problem = harness::check_capture_output(output, o.tokens_file); !problem.empty()) {
    r.status = CaptureStatus::BadOutput;
    r.detail = problem;
  } else {
    r.status = CaptureStatus::Ok;
    r.detail = fmt::format("captured {} x{} under torchrun in {:.1f} s", o.mode, o.world, proc.wall_seconds);
  }
  r.outcome = {{"status", harness::capture_status_name(r.status)},
               {"detail", r.detail},
               {"variant", o.variant},
               {"dtype", o.dtype},
               {"device", o.device},
               {"distributed", {{"mode", o.mode}, {"world", o.world}, {"launcher", "torchrun --standalone"}}},
               {"exit_code", proc.exit_code},
               {"signal", proc.signal},
               {"timed_out", proc.timed_out},
               {"wall_seconds", proc.wall_seconds},
               {"stderr_tail", proc.stderr_tail},
               {"error", error},
               {"environment", harness::environment_record(env)}};
  std::ofstream(o.out / "outcome.json.tmp") << r.outcome.dump(2) << "\n";
  fs::rename(o.out / "outcome.json.tmp", o.out / "outcome.json");
  return r;
}

}  // namespace opensci::parallel
