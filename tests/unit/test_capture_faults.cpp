// Subprocess faults of a capture: import error, crash, hang, garbage or missing output,
// non-finite logits, logits of another batch. Each runs for real (a python3 subprocess through
// the `system` provider, the same code path as a transformers capture) and none may pass.
#include <csignal>
#include <iostream>
#include <fstream>
#include <thread>
#include <chrono>

#include "opensci/harness/capture.hpp"
#include "opensci/harness/cell.hpp"
#include "opensci/harness/process.hpp"
#include "opensci/harness/toy.hpp"
#include "test_helpers.hpp"

using namespace opensci;
using namespace opensci::harness;
using opensci::test::ScratchDir;

namespace {

struct Fault {
  const char* script;
  CaptureStatus status;
  const char* detail;  // fragment of the recorded detail
};

CaptureOptions options_for(const ScratchDir& dir, const std::string& fault) {
  CaptureOptions o;
  o.env_spec = {{"provider", "system"}, {"python", "/usr/bin/python3"}};
  o.model = dir / "model";
  o.tokens_file = opensci::test::source_dir() / "fixtures/tokens/padded-batch.json";
  o.out = dir / ("capture-" + fault);
  o.script_dir = opensci::test::source_dir() / "tests/faults" / fault;
  o.variant = "opensci-ref/none";
  o.timeout = std::chrono::seconds(3);
  return o;
}

int judge(const ScratchDir& dir, const CaptureOptions& o, const std::string& expect) {
  CellOptions c;
  c.name = "fault";
  c.capture = o.out;
  c.model = o.model;
  c.tokens_file = o.tokens_file;
  c.variant = o.variant;
  c.tolerance_file = opensci::test::source_dir() / "matrix/tolerances.json";
  c.tolerance = "fp32-cpu";
  c.expect = expect;
  c.result = dir / "result.json";
  return run_cell(c);
}

// True when `pid` is a live (not zombie) process whose command line is exactly `argv` (read from
// /proc: no dependency on procps, whose absence must not look like "nothing survived").
bool process_alive(int pid, const std::vector<std::string>& argv) {
  const auto dir = std::filesystem::path("/proc") / std::to_string(pid);
  std::ifstream in(dir / "cmdline", std::ios::binary);
  if (!in) return false;
  std::string cmdline((std::istreambuf_iterator<char>(in)), {});
  std::string want;
  for (const auto& a : argv) want += a + '\0';
  std::ifstream stat(dir / "stat");
  std::string statline;
  std::getline(stat, statline);
  const auto close = statline.rfind(')');
  const bool zombie = close != std::string::npos && close + 2 < statline.size() && statline[close + 2] == 'Z';
  return cmdline == want && !zombie;
}

// How many live processes have exactly this command line.
int processes_running(const std::vector<std::string>& argv) {
  int n = 0;
  for (const auto& e : std::filesystem::directory_iterator("/proc")) {
    const auto pid = e.path().filename().string();
    if (pid.find_first_not_of("0123456789") != std::string::npos) continue;
    if (process_alive(std::stoi(pid), argv)) ++n;
  }
  return n;
}

// The fault scripts run under /usr/bin/python3: without it every capture would fail to start,
// which must not count as "the faults were caught". Skipped (with the reason) instead.
bool have_python() {
  if (std::filesystem::exists("/usr/bin/python3")) return true;
  std::cout << "OPENSCI-SKIPPED: /usr/bin/python3 is missing (scripts/install-deps.sh installs it); the fault "
               "scripts cannot run\n";
  return false;
}

}  // namespace

TEST_CASE("processes_running sees a live process and not a finished one") {
  // The check the hang test relies on must be able to see a survivor.
  const std::string marker = "654321";
  REQUIRE(std::system(("sleep " + marker + " & echo $! > /tmp/opensci-test-sleep.pid").c_str()) == 0);
  // The shell returns once it forked; the child may not have exec'd `sleep` yet.
  int seen = 0;
  for (int i = 0; i < 100 && seen == 0; ++i) {
    seen = processes_running({"sleep", marker});
    if (!seen) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  CHECK(seen == 1);
  REQUIRE(std::system("kill $(cat /tmp/opensci-test-sleep.pid); rm -f /tmp/opensci-test-sleep.pid") == 0);
  // A killed process lingers until it is reaped; on a loaded machine that can take a while.
  int left = 1;
  for (int i = 0; i < 100 && left; ++i) {
    left = processes_running({"sleep", marker});
    if (left) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  CHECK(left == 0);
}

TEST_CASE("no capture fault can pass a cell") {
  if (!have_python()) return;
  ScratchDir dir("faults");
  ToyOptions toy;
  toy.config = opensci::test::source_dir() / "toy_configs/opensci-ref.json";
  toy.seed = 1;
  toy.out = dir / "model";
  build_toy(toy);

  const Fault faults[] = {
      {"import_error", CaptureStatus::Error, "ImportError during load"},
      {"crash", CaptureStatus::Crash, "SIGSEGV"},
      {"hang", CaptureStatus::Timeout, "timed out"},
      {"garbage", CaptureStatus::BadOutput, "not JSON"},
      {"missing", CaptureStatus::NoOutput, "no output.safetensors"},
      {"nonfinite", CaptureStatus::Ok, "captured"},
      {"wrong_batch", CaptureStatus::BadOutput, "expected [3, 10, vocab]"},
  };
  for (const auto& f : faults) {
    INFO("fault " << f.script);
    const auto o = options_for(dir, f.script);
    const auto r = run_capture(o);
    INFO("detail: " << r.detail);
    CHECK(r.status == f.status);
    CHECK(r.detail.find(f.detail) != std::string::npos);
    CHECK(std::filesystem::exists(o.out / "outcome.json"));
    CHECK(judge(dir, o, "pass") == 1);
    const auto result = opensci::test::read_text(dir / "result.json");
    CHECK(result.find("\"verdict\": \"fail\"") != std::string::npos);
  }
}

TEST_CASE("a hung capture leaves no process of its group behind") {
  if (!have_python()) return;
  ScratchDir dir("hang");
  ToyOptions toy;
  toy.config = opensci::test::source_dir() / "toy_configs/opensci-ref.json";
  toy.out = dir / "model";
  build_toy(toy);
  const auto o = options_for(dir, "hang");
  const auto r = run_capture(o);
  REQUIRE(r.status == CaptureStatus::Timeout);
  // The grandchild `sleep 987654` ran in the capture's process group; none of it survives.
  // Its own pid (other tests run hangs of their own at the same time).
  const auto out = opensci::test::read_text(o.out / "outcome.json");
  CHECK(out.find("\"timed_out\": true") != std::string::npos);
  const auto grandchild = std::stoi(opensci::test::read_text(o.out / "grandchild"));
  REQUIRE(grandchild > 0);
  CHECK_FALSE(process_alive(grandchild, {"sleep", "987654"}));
}

TEST_CASE("an expected failure is judged by its hazard, strictly") {
  if (!have_python()) return;
  ScratchDir dir("xfail");
  ToyOptions toy;
  toy.config = opensci::test::source_dir() / "toy_configs/opensci-ref.json";
  toy.out = dir / "model";
  build_toy(toy);
  const auto o = options_for(dir, "import_error");
  run_capture(o);
  CHECK(judge(dir, o, "xfail:H1") == 0);  // the evidence names H1: expected failure
  CHECK(judge(dir, o, "xfail:H3") == 1);  // fails, but not for the expected reason
  const auto result = opensci::test::read_text(dir / "result.json");
  CHECK(result.find("expected H3 (wrong numbers), but the capture did not produce output") != std::string::npos);
  CHECK(result.find("diagnosed H1") != std::string::npos);
  CHECK(judge(dir, o, "xfail:H2") == 1);  // another error hazard: its signature does not match
  CHECK(opensci::test::read_text(dir / "result.json").find("expected failure H2 but the evidence says H1") != std::string::npos);
}

TEST_CASE("an unavailable environment is Not Run with its reason") {
  if (!have_python()) return;
  ScratchDir dir("unavail");
  ToyOptions toy;
  toy.config = opensci::test::source_dir() / "toy_configs/opensci-ref.json";
  toy.out = dir / "model";
  build_toy(toy);
  auto o = options_for(dir, "missing");
  o.env_spec = {{"provider", "system"}, {"python", "/nonexistent/python3"}};
  const auto r = run_capture(o);
  CHECK(r.status == CaptureStatus::Unavailable);
  CHECK(std::filesystem::exists(o.out / "SKIPPED"));
  CHECK(judge(dir, o, "pass") == 77);
  CHECK(opensci::test::read_text(dir / "result.json").find("/nonexistent/python3") != std::string::npos);
}
