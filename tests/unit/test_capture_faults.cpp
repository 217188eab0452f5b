// Subprocess faults of a capture: import error, crash, hang, garbage or missing output,
// non-finite logits, logits of another batch. Each runs for real (a python3 subprocess through
// the `system` provider, the same code path as a transformers capture) and none may pass.
#include <csignal>

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
  c.tolerance_file = opensci::test::source_dir() / "matrix/tolerances.json";
  c.tolerance = "fp32-cpu";
  c.expect = expect;
  c.result = dir / "result.json";
  return run_cell(c);
}

}  // namespace

TEST_CASE("no capture fault can pass a cell") {
  if (!std::filesystem::exists("/usr/bin/python3")) {
    WARN("skipped: /usr/bin/python3 is missing (scripts/install-deps.sh installs it)");
    return;
  }
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
  ScratchDir dir("hang");
  ToyOptions toy;
  toy.config = opensci::test::source_dir() / "toy_configs/opensci-ref.json";
  toy.out = dir / "model";
  build_toy(toy);
  const auto o = options_for(dir, "hang");
  const auto r = run_capture(o);
  REQUIRE(r.status == CaptureStatus::Timeout);
  // The grandchild `sleep 987654` ran in the capture's process group; none of it survives.
  const auto out = opensci::test::read_text(o.out / "outcome.json");
  CHECK(out.find("\"timed_out\": true") != std::string::npos);
  CHECK(std::system("pgrep -f '[s]leep 987654' > /dev/null") != 0);
}

TEST_CASE("an expected failure is judged by its hazard, strictly") {
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
  CHECK(result.find("expected failure H3 but the evidence says H1") != std::string::npos);
}

TEST_CASE("an unavailable environment is Not Run with its reason") {
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
