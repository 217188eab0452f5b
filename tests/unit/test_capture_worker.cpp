// The capture worker (harness/python/worker.py + capture_worker.cpp), for real: the capture
// faults through the worker and cold, the harness or the worker SIGKILLed mid-capture, one
// worker under concurrent starts, stale sockets, idle exit, no inherited pipes, `env workers
// --stop`; in the Debian sid rootfs (when cached): no shim or remote-code state leaks from one
// capture into the next, per-capture HF_MODULES_CACHE under concurrency, logits identical to a
// cold run, and a polluted worker is refused. Every test uses a worker dir of its own.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <future>
#include <set>
#include <thread>

#include "opensci/harness/capture.hpp"
#include "opensci/harness/capture_worker.hpp"
#include "opensci/harness/cell.hpp"
#include "opensci/harness/process.hpp"
#include "opensci/harness/toy.hpp"
#include "opensci/safetensors.hpp"
#include "test_helpers.hpp"

extern char** environ;

using namespace opensci;
using namespace opensci::harness;
using opensci::test::read_text;
using opensci::test::ScratchDir;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const json kSystemPython = {{"provider", "system"}, {"python", "/usr/bin/python3"}};
const json kSid = {{"provider", "debian-rootfs"}, {"suite", "sid"}};

bool have_system_python() { return fs::exists("/usr/bin/python3"); }

json read_json(const fs::path& p) {
  std::ifstream in(p);
  return json::parse(in);
}

bool wait_for(const std::function<bool()>& cond, std::chrono::milliseconds limit) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (cond()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return cond();
}

bool alive(int pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return false;
  const auto close = line.rfind(')');
  return close != std::string::npos && line[close + 2] != 'Z';
}

int read_int(const fs::path& p) {
  std::ifstream in(p);
  int v = 0;
  in >> v;
  return v;
}

struct Fixture {
  ScratchDir dir{"worker"};
  fs::path model = dir / "model";
  Fixture() {
    ToyOptions toy;
    toy.config = opensci::test::source_dir() / "toy_configs/opensci-ref.json";
    toy.seed = 1;
    toy.out = model;
    build_toy(toy);
  }
  CaptureOptions options(const std::string& name, const fs::path& script_dir) const {
    CaptureOptions o;
    o.env_spec = kSystemPython;
    o.model = model;
    o.tokens_file = opensci::test::source_dir() / "fixtures/tokens/padded-batch.json";
    o.out = dir / ("capture-" + name);
    o.script_dir = script_dir;
    o.variant = "opensci-ref/none";
    o.timeout = std::chrono::seconds(3);
    o.worker_settings.dir = dir / "workers";
    o.worker_settings.start_timeout = std::chrono::seconds(60);
    return o;
  }
  fs::path fault(const std::string& name) const { return opensci::test::source_dir() / "tests/faults" / name; }
};

int judge(const fs::path& work, const CaptureOptions& o) {
  CellOptions c;
  c.name = "fault";
  c.capture = o.out;
  c.model = o.model;
  c.tokens_file = o.tokens_file;
  c.variant = o.variant;
  c.tolerance_file = opensci::test::source_dir() / "matrix/tolerances.json";
  c.tolerance = "fp32-cpu";
  c.expect = "pass";
  c.result = work / "result.json";
  return run_cell(c);
}

// posix_spawn of the CLI with extra environment; returns the pid.
int spawn_cli(const std::vector<std::string>& args, const std::map<std::string, std::string>& extra,
              const fs::path& log) {
  std::vector<std::string> env_strings;
  for (char** e = environ; *e; ++e) {
    const std::string kv = *e;
    if (!extra.count(kv.substr(0, kv.find('=')))) env_strings.push_back(kv);
  }
  for (const auto& [k, v] : extra) env_strings.push_back(k + "=" + v);
  std::vector<char*> argv{const_cast<char*>(OPENSCI_CLI)}, envp;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  for (auto& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  pid_t pid = 0;
  REQUIRE(posix_spawn(&pid, OPENSCI_CLI, &fa, nullptr, argv.data(), envp.data()) == 0);
  posix_spawn_file_actions_destroy(&fa);
  return pid;
}

std::vector<std::string> capture_args(const CaptureOptions& o, const json& spec) {
  return {"capture",
          "--env-spec",
          spec.dump(),
          "--model",
          o.model.string(),
          "--tokens-file",
          o.tokens_file.string(),
          "--out",
          o.out.string(),
          "--script-dir",
          o.script_dir.string(),
          "--variant",
          o.variant,
          "--timeout",
          std::to_string(o.timeout.count())};
}

// The cached Debian sid rootfs, or "" with the reason to skip.
std::string sid_unavailable() {
  const auto provider = make_provider(kSid);
  const auto a = provider->probe();
  if (!a) return "debian-sid rootfs unavailable here: " + a.reason;
  if (!a.ready) return "the debian-sid rootfs is not cached yet (ctest -R env/debian-sid builds it): " + a.reason;
  return "";
}

}  // namespace

TEST_CASE("capture faults never pass, through the worker and cold, and each run says how it ran") {
  if (!have_system_python()) {
    std::puts("OPENSCI-SKIPPED: /usr/bin/python3 is missing (scripts/install-deps.sh installs it)");
    return;
  }
  Fixture fx;
  struct Fault {
    const char* script;
    CaptureStatus status;
    const char* detail;
  };
  const Fault faults[] = {
      {"import_error", CaptureStatus::Error, "ImportError during load"},
      {"crash", CaptureStatus::Crash, "SIGSEGV"},
      {"hang", CaptureStatus::Timeout, "timed out"},
      {"garbage", CaptureStatus::BadOutput, "not JSON"},
      {"missing", CaptureStatus::NoOutput, "no output.safetensors"},
      {"nonfinite", CaptureStatus::Ok, "captured"},
      {"wrong_batch", CaptureStatus::BadOutput, "expected [3, 10, vocab]"},
  };
  int worker_pid = 0;
  for (const bool use_worker : {true, false}) {
    for (const auto& f : faults) {
      INFO("fault " << f.script << (use_worker ? " (worker)" : " (cold)"));
      auto o = fx.options(std::string(f.script) + (use_worker ? "-w" : "-c"), fx.fault(f.script));
      o.worker = use_worker;
      const auto r = run_capture(o);
      INFO("detail: " << r.detail);
      CHECK(r.status == f.status);
      CHECK(r.detail.find(f.detail) != std::string::npos);
      const auto outcome = read_json(o.out / "outcome.json");
      const auto& runner = outcome.at("runner");
      INFO("runner: " << runner.dump());
      if (use_worker) {
        REQUIRE(runner.value("mode", "") == "worker");
        if (worker_pid == 0) worker_pid = runner.value("worker_pid", 0);
        CHECK(runner.value("worker_pid", 0) == worker_pid);  // one worker served them all
        CHECK(runner.value("fork_to_exit_seconds", -1.0) >= 0.0);
        CHECK(runner.at("clean_start").value("clean", false));
        // Nothing of the capture's group survives it (the hang's grandchild `sleep` included).
        CHECK(live_group_members(runner.value("child_pid", 0)).empty());
      } else {
        CHECK(runner.value("mode", "") == "cold");
        CHECK(runner.value("why", "") == "--no-worker");
      }
      CHECK(judge(fx.dir.path(), o) == 1);
      CHECK(read_text(fx.dir / "result.json").find("\"verdict\": \"fail\"") != std::string::npos);
    }
  }
  CHECK(worker_pid > 0);
  // The served count goes up by one per capture.
  const auto last = read_json(fx.dir / "capture-wrong_batch-w/outcome.json").at("runner");
  CHECK(last.value("captures_served", 0) == 7);
  const auto lines = stop_workers(fx.dir / "workers");
  REQUIRE(lines.size() == 1);
  CHECK(lines[0].find("stopped") != std::string::npos);
  CHECK(wait_for([&] { return !alive(worker_pid); }, std::chrono::seconds(10)));
}

TEST_CASE("SIGKILL of the harness kills its capture in the worker, and the worker lives on") {
  if (!have_system_python()) {
    std::puts("OPENSCI-SKIPPED: /usr/bin/python3 is missing");
    return;
  }
  Fixture fx;
  auto o = fx.options("harness-killed", fx.fault("hang"));
  o.timeout = std::chrono::seconds(120);
  const int cli = spawn_cli(capture_args(o, kSystemPython), {{"OPENSCI_WORKER_DIR", (fx.dir / "workers").string()}},
                            fx.dir / "cli.log");
  REQUIRE(wait_for([&] { return fs::exists(o.out / "pid") && fs::exists(o.out / "grandchild"); },
                   std::chrono::seconds(60)));
  const int child = read_int(o.out / "pid"), grandchild = read_int(o.out / "grandchild");
  REQUIRE(alive(child));
  REQUIRE(alive(grandchild));
  ::kill(cli, SIGKILL);
  int status = 0;
  ::waitpid(cli, &status, 0);
  CHECK(wait_for([&] { return !alive(child) && !alive(grandchild); }, std::chrono::seconds(10)));
  CHECK(live_group_members(child).empty());
  // The worker saw its client go, killed that capture and serves the next one.
  const auto workers = list_workers(fx.dir / "workers");
  REQUIRE(workers.size() == 1);
  CHECK(workers[0].state == "ready");
  auto next = fx.options("after-kill", fx.fault("nonfinite"));
  const auto r = run_capture(next);
  CHECK(r.status == CaptureStatus::Ok);
  CHECK(read_json(next.out / "outcome.json").at("runner").value("worker_pid", 0) == workers[0].pid);
  stop_workers(fx.dir / "workers");
}

TEST_CASE("a worker dying mid-capture is a crash and leaves nothing of the capture behind") {
  if (!have_system_python()) {
    std::puts("OPENSCI-SKIPPED: /usr/bin/python3 is missing");
    return;
  }
  Fixture fx;
  auto o = fx.options("worker-killed", fx.fault("hang"));
  o.timeout = std::chrono::seconds(120);
  auto pending = std::async(std::launch::async, [&] { return run_capture(o); });
  REQUIRE(wait_for([&] { return fs::exists(o.out / "pid") && fs::exists(o.out / "grandchild"); },
                   std::chrono::seconds(60)));
  const int child = read_int(o.out / "pid"), grandchild = read_int(o.out / "grandchild");
  const auto workers = list_workers(fx.dir / "workers");
  REQUIRE(workers.size() == 1);
  REQUIRE(workers[0].pid > 0);
  ::kill(workers[0].pid, SIGKILL);
  REQUIRE(pending.wait_for(std::chrono::seconds(30)) == std::future_status::ready);
  const auto r = pending.get();
  INFO("detail: " << r.detail);
  CHECK(r.status == CaptureStatus::Crash);
  CHECK(r.detail.find("died mid-capture") != std::string::npos);
  CHECK(wait_for([&] { return !alive(child) && !alive(grandchild); }, std::chrono::seconds(10)));
  const auto outcome = read_json(o.out / "outcome.json");
  CHECK(outcome.at("runner").contains("worker_lost"));
  CHECK(outcome.value("status", "") == "crash");
  CHECK(judge(fx.dir.path(), o) == 1);
  // The dead worker left its socket: the next capture replaces it with a new worker.
  CHECK(fs::exists(fx.dir / "workers" / (workers[0].key + ".sock")));
  auto next = fx.options("after-worker-death", fx.fault("nonfinite"));
  CHECK(run_capture(next).status == CaptureStatus::Ok);
  const auto runner = read_json(next.out / "outcome.json").at("runner");
  CHECK(runner.value("worker_pid", 0) != workers[0].pid);
  CHECK(runner.value("worker_started_by_this_capture", false));
  stop_workers(fx.dir / "workers");
}

TEST_CASE("one worker for concurrent captures and processes, a new key is a new worker, idle exit, no pipes held") {
  if (!have_system_python()) {
    std::puts("OPENSCI-SKIPPED: /usr/bin/python3 is missing");
    return;
  }
  Fixture fx;
  const auto workers_dir = fx.dir / "workers";
  // Two harness processes and two threads start at once on an empty worker dir.
  std::vector<CaptureOptions> runs;
  for (int i = 0; i < 4; ++i) runs.push_back(fx.options("concurrent-" + std::to_string(i), fx.fault("nonfinite")));
  for (auto& o : runs) o.timeout = std::chrono::seconds(60);
  const int cli_a =
      spawn_cli(capture_args(runs[0], kSystemPython), {{"OPENSCI_WORKER_DIR", workers_dir.string()}}, fx.dir / "a.log");
  const int cli_b =
      spawn_cli(capture_args(runs[1], kSystemPython), {{"OPENSCI_WORKER_DIR", workers_dir.string()}}, fx.dir / "b.log");
  auto t2 = std::async(std::launch::async, [&] { return run_capture(runs[2]); });
  auto t3 = std::async(std::launch::async, [&] { return run_capture(runs[3]); });
  int status_a = 0, status_b = 0;
  ::waitpid(cli_a, &status_a, 0);
  ::waitpid(cli_b, &status_b, 0);
  CHECK(t2.get().status == CaptureStatus::Ok);
  CHECK(t3.get().status == CaptureStatus::Ok);
  CHECK(WIFEXITED(status_a));
  CHECK(WIFEXITED(status_b));
  std::set<int> pids;
  int started_here = 0;
  for (const auto& o : runs) {
    const auto outcome = read_json(o.out / "outcome.json");
    INFO(o.out.string() << ": " << outcome.dump().substr(0, 600));
    CHECK(outcome.value("status", "") == "ok");
    pids.insert(outcome.at("runner").value("worker_pid", 0));
    started_here += outcome.at("runner").value("worker_started_by_this_capture", false) ? 1 : 0;
  }
  CHECK(pids.size() == 1);
  CHECK(started_here == 1);
  const int first = *pids.begin();

  // Another environment (here: another OMP_NUM_THREADS, which the libraries read at import) is
  // another worker, never the first one.
  auto other = fx.options("threads-1", fx.fault("nonfinite"));
  other.threads = 1;
  REQUIRE(run_capture(other).status == CaptureStatus::Ok);
  const auto other_runner = read_json(other.out / "outcome.json").at("runner");
  CHECK(other_runner.value("worker_pid", 0) != first);
  CHECK(list_workers(workers_dir).size() == 2);

  // A stale socket file (its worker SIGKILLed) is replaced by a new worker.
  ::kill(first, SIGKILL);
  REQUIRE(wait_for([&] { return !alive(first); }, std::chrono::seconds(5)));
  auto again = fx.options("stale", fx.fault("nonfinite"));
  REQUIRE(run_capture(again).status == CaptureStatus::Ok);
  const int replacement = read_json(again.out / "outcome.json").at("runner").value("worker_pid", 0);
  CHECK(replacement != first);
  CHECK(replacement > 0);

  // The CLI returns at once even with its worker still alive: no pipe of ours is held open.
  ProcessSpec piped;
  std::string cmd = "'" OPENSCI_CLI "'";
  auto piped_opts = fx.options("piped", fx.fault("nonfinite"));
  for (const auto& a : capture_args(piped_opts, kSystemPython)) cmd += " " + shell_quote(a);
  piped.argv = {"/bin/sh", "-c", cmd + " | cat > /dev/null"};
  piped.env = {
      {"PATH", "/usr/bin:/bin"}, {"OPENSCI_WORKER_DIR", workers_dir.string()}, {"OPENSCI_WORKER_IDLE_SECONDS", "300"}};
  piped.timeout = std::chrono::seconds(60);
  const auto pr = run_process(piped);
  CHECK(pr.ok());
  CHECK(pr.wall_seconds < 20);  // the worker lives 300 s more; the pipe closed with the CLI
  CHECK(alive(replacement));

  // `env workers --stop` stops them all.
  ProcessSpec stop;
  stop.argv = {OPENSCI_CLI, "env", "workers", "--stop", "--dir", workers_dir.string()};
  stop.env = {{"PATH", "/usr/bin:/bin"}};
  stop.stdout_path = fx.dir / "stop.log";
  stop.timeout = std::chrono::seconds(60);
  CHECK(run_process(stop).ok());
  INFO(read_text(fx.dir / "stop.log"));
  CHECK(read_text(fx.dir / "stop.log").find("2 worker(s)") != std::string::npos);
  CHECK(!alive(replacement));
  CHECK(!alive(other_runner.value("worker_pid", 0)));
  for (const auto& w : list_workers(workers_dir)) CHECK(w.state == "dead");

  // Idle: a worker exits by itself and removes its socket.
  ::setenv("OPENSCI_WORKER_IDLE_SECONDS", "1", 1);
  auto idle = fx.options("idle", fx.fault("nonfinite"));
  const auto ir = run_capture(idle);
  ::unsetenv("OPENSCI_WORKER_IDLE_SECONDS");
  REQUIRE(ir.status == CaptureStatus::Ok);
  const auto idle_runner = read_json(idle.out / "outcome.json").at("runner");
  const int idle_pid = idle_runner.value("worker_pid", 0);
  CHECK(wait_for([&] { return !alive(idle_pid); }, std::chrono::seconds(15)));
  CHECK(!fs::exists(idle_runner.value("worker_socket", "")));
}

TEST_CASE("debian-sid: shims and remote code of one capture never reach the next, logits as cold") {
  if (const auto why = sid_unavailable(); !why.empty()) {
    std::printf("OPENSCI-SKIPPED: %s\n", why.c_str());
    return;
  }
  ScratchDir dir("worker-sid");
  const auto src = opensci::test::source_dir();
  auto toy = [&](const std::string& name, const std::string& config, const std::string& remote) {
    ToyOptions t;
    t.config = src / "toy_configs" / config;
    t.seed = 1;
    t.out = dir / name;
    if (!remote.empty()) t.remote_code = src / "fixtures/remote_code" / remote;
    build_toy(t);
    return t.out;
  };
  const auto losskwargs = toy("losskwargs", "opensci-ref-published.json", "opensci_ref_published_losskwargs");
  const auto published = toy("published", "opensci-ref-published.json", "opensci_ref_published");
  const auto ref = toy("ref", "opensci-ref.json", "opensci_ref");
  auto options = [&](const std::string& name, const fs::path& model, std::vector<std::string> shims) {
    CaptureOptions o;
    o.env_spec = kSid;
    o.model = model;
    o.tokens_file = src / "fixtures/tokens/padded-batch.json";
    o.out = dir / ("cap-" + name);
    o.script_dir = src / "harness/python";
    o.variant = name;
    o.shims = std::move(shims);
    o.timeout = std::chrono::seconds(300);
    o.worker_settings.dir = dir / "workers";
    return o;
  };
  auto run = [&](const CaptureOptions& o) {
    const auto r = run_capture(o);
    INFO(o.out.string() << ": " << r.detail);
    const auto prov = read_json(o.out / "provenance.json");
    return std::make_tuple(r, read_json(o.out / "outcome.json"), prov);
  };
  auto check_clean = [](const json& prov) {
    const auto& runner = prov.at("runner");
    INFO("runner: " << runner.dump());
    REQUIRE(runner.value("mode", "") == "worker");
    CHECK(runner.at("clean_start").value("clean", false));
    CHECK(runner.at("clean_start").at("transformers_modules").empty());
    CHECK(runner.at("clean_start").at("shim_markers").empty());
  };

  // 1. The kwargs-alias shim makes LossKwargs importable: H1 is gone, H2 (no 'default' RoPE) stops it.
  const auto [r1, o1, p1] = run(options("losskwargs+kwargs-alias", losskwargs, {"kwargs-alias"}));
  check_clean(p1);
  CHECK(r1.status == CaptureStatus::Error);
  CHECK(o1.at("error").value("type", "") == "KeyError");
  const int worker = p1.at("runner").value("worker_pid", 0);
  // 2. The same fixture unpatched, same worker: the alias must be gone, H1's ImportError again.
  const auto [r2, o2, p2] = run(options("losskwargs", losskwargs, {}));
  check_clean(p2);
  CHECK(p2.at("runner").value("worker_pid", 0) == worker);
  CHECK(r2.status == CaptureStatus::Error);
  CHECK(o2.at("error").value("type", "") == "ImportError");
  CHECK(o2.at("error").value("message", "").find("LossKwargs") != std::string::npos);
  // 3. All runtime shims (ROPE_INIT_FUNCTIONS['default'], wrapped PreTrainedModel methods, a
  //    config class default): the published fixture passes ...
  const auto [r3, o3, p3] = run(
      options("published+shims", published,
              {"kwargs-alias", "rope-default", "tied-keys-dict", "tie-default", "guard-init", "recompute-inv-freq"}));
  check_clean(p3);
  CHECK(r3.status == CaptureStatus::Ok);
  // 4. ... and unpatched, in the same worker, fails with H2 again: no shim survived.
  const auto [r4, o4, p4] = run(options("published", published, {}));
  check_clean(p4);
  CHECK(p4.at("runner").value("worker_pid", 0) == worker);
  CHECK(r4.status == CaptureStatus::Error);
  CHECK(o4.at("error").value("message", "").find("default") != std::string::npos);
  CHECK(p4.at("runner").value("captures_served", 0) == 4);

  // 5. Two remote-code captures at once in one worker, each with its own modules cache.
  auto a = options("ref-a", ref, {}), b = options("ref-b", ref, {});
  auto fa = std::async(std::launch::async, [&] { return run_capture(a); });
  auto fb = std::async(std::launch::async, [&] { return run_capture(b); });
  REQUIRE(fa.get().status == CaptureStatus::Ok);
  REQUIRE(fb.get().status == CaptureStatus::Ok);
  for (const auto* o : {&a, &b}) {
    const auto prov = read_json(o->out / "provenance.json");
    check_clean(prov);
    CHECK(prov.at("runner").value("worker_pid", 0) == worker);
    const std::string cache = (fs::absolute(o->out) / "run" / "hf" / "modules").string();
    CHECK(prov.at("runner").value("modules_cache", "") == cache);
    INFO("model module: " << prov.value("model_module_file", ""));
    CHECK(prov.value("model_module_file", "").rfind(cache + "/transformers_modules/", 0) == 0);
    REQUIRE(!prov.at("remote_code_files").empty());
    for (const auto& f : prov.at("remote_code_files")) CHECK(f.get<std::string>().rfind(cache, 0) == 0);
  }

  // 6. The same cell cold: bit-identical logits and hidden states.
  auto cold = options("ref-cold", ref, {});
  cold.worker = false;
  REQUIRE(run_capture(cold).status == CaptureStatus::Ok);
  CHECK(read_json(cold.out / "outcome.json").at("runner").value("mode", "") == "cold");
  const SafetensorsFile warm_out(a.out / "output.safetensors"), cold_out(cold.out / "output.safetensors");
  REQUIRE(warm_out.tensors().size() == cold_out.tensors().size());
  for (const auto& info : warm_out.tensors()) {
    INFO("tensor " << info.name);
    const auto& other = cold_out.at(info.name);
    REQUIRE(info.shape == other.shape);
    const auto x = warm_out.bytes(info), y = cold_out.bytes(other);
    CHECK(std::equal(x.begin(), x.end(), y.begin(), y.end()));
  }
  stop_workers(dir / "workers");
}

TEST_CASE("debian-sid: a worker whose own state was changed is refused by its children") {
  if (const auto why = sid_unavailable(); !why.empty()) {
    std::printf("OPENSCI-SKIPPED: %s\n", why.c_str());
    return;
  }
  ScratchDir dir("worker-polluted");
  const auto src = opensci::test::source_dir();
  ToyOptions t;
  t.config = src / "toy_configs/opensci-ref-published.json";
  t.seed = 1;
  t.out = dir / "losskwargs";
  t.remote_code = src / "fixtures/remote_code/opensci_ref_published_losskwargs";
  build_toy(t);
  CaptureOptions o;
  o.env_spec = kSid;
  o.model = t.out;
  o.tokens_file = src / "fixtures/tokens/padded-batch.json";
  o.out = dir / "cap";
  o.script_dir = src / "harness/python";
  o.variant = "losskwargs";
  o.timeout = std::chrono::seconds(300);
  o.worker_settings.dir = dir / "workers";
  // The worker applies these shims to itself after recording its pristine state: had the child
  // not refused, this unpatched H1 fixture would get past its ImportError.
  o.worker_settings.pollute_for_test = "kwargs-alias,rope-default";
  const auto r = run_capture(o);
  INFO("detail: " << r.detail);
  CHECK(r.status == CaptureStatus::Error);
  CHECK(r.detail.find("not its pristine one") != std::string::npos);
  CHECK(r.detail.find("LossKwargs added") != std::string::npos);
  CHECK(r.detail.find("ROPE_INIT_FUNCTIONS.default added") != std::string::npos);
  CHECK(!fs::exists(o.out / "output.safetensors"));
  stop_workers(dir / "workers");
}
