// Rank faults of a sharded job, for real: mpiexec launches 2 ranks of opensci-compat
// forward-sharded and rank 1 crashes, aborts, raises, exits early or hangs (--inject-fault).
// Each must end the launch as failed, within its timeout, with a summary naming rank 1 and what
// it did, and leave no process of the job behind (ranks, nor the grandchild a hung rank started).
#include <fmt/format.h>
#include <signal.h>

#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "opensci/harness/toy.hpp"
#include "opensci/parallel/cell_parallel.hpp"
#include "opensci/parallel/launcher.hpp"
#include "../unit/test_helpers.hpp"

using namespace opensci;
using namespace opensci::parallel;
using opensci::test::ScratchDir;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

struct RankFault {
  const char* kind;
  const char* state;    // what the launcher must call rank 1
  const char* summary;  // fragment of the one-line summary
};

// A live process (a zombie is dead: orphans wait there for a reaper that may never come).
bool alive(int64_t pid) {
  if (pid <= 0 || ::kill(static_cast<pid_t>(pid), 0) != 0) return false;
  const auto stat = test::read_text(fmt::format("/proc/{}/stat", pid));
  const auto close = stat.rfind(')');
  return close != std::string::npos && close + 2 < stat.size() && stat[close + 2] != 'Z';
}

}  // namespace

TEST_CASE("a rank that crashes, aborts, raises, exits early or hangs fails the launch, named, with no survivor") {
  std::string why;
  if (!launcher_available(&why)) {
    fmt::print("OPENSCI-SKIPPED: {}\n", why);
    return;
  }
  ScratchDir dir("rank-faults");
  harness::ToyOptions t;
  t.config = test::source_dir() / "toy_configs/opensci-ref.json";
  t.out = dir / "model";
  harness::build_toy(t);
  write_tokens_json(TokenBatch::from_json_file(test::source_dir() / "fixtures/tokens/padded-batch.json"),
                    dir / "tokens.json");

  const RankFault faults[] = {
      {"crash", "crashed", "rank 1 of 2 crashed: killed by signal 11 (Segmentation fault) during 'layer 0 attention'"},
      {"abort", "crashed", "rank 1 of 2 crashed: killed by signal 6 (Aborted)"},
      {"error", "error", "rank 1 of 2 failed: rank 1: injected error in layer 0"},
      {"exit", "exited early", "rank 1 of 2 exited early: exited without MPI_Finalize"},
      {"hang", "hung", "rank 1 of 2 hung: timed out after"},
  };
  for (const auto& f : faults) {
    INFO("fault " << f.kind);
    LaunchOptions o;
    o.program = OPENSCI_CLI;
    o.model = t.out;
    o.tokens_file = dir / "tokens.json";
    o.work = dir / f.kind;
    o.sp = 2;
    o.inject_fault = fmt::format("1:{}@0", f.kind);
    o.timeout = std::chrono::seconds(8);
    const auto start = std::chrono::steady_clock::now();
    const auto r = launch_sharded(o);
    const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    INFO("summary: " << r.summary);
    fmt::print("fault {}: {:.1f} s, {} leftover processes of the job killed: {}\n", f.kind, took, r.strays_killed, r.summary);
    CHECK_FALSE(r.ok);
    CHECK(r.summary.find(f.summary) != std::string::npos);
    REQUIRE(r.ranks.size() == 2);
    CHECK(r.ranks[1].state == f.state);
    CHECK(r.ranks[0].state != "finished");  // rank 0 cannot finish without rank 1
    CHECK(took < 8 + 3 + 5);                // timeout + kill grace + teardown
    if (std::string(f.kind) == "hang") {
      // rank 0 waited in the all-to-all that rank 1 never joined
      CHECK(r.summary.find("while rank 0 waited in 'layer 0 attention all-to-all (sequence -> heads)'") != std::string::npos);
      CHECK(took >= 8);
    }
    // No rank survives, nor the grandchild `sleep 918273` of the hung rank.
    for (const auto& st : r.rank_status) {
      INFO("rank status " << st.dump());
      if (st.is_object()) CHECK_FALSE(alive(st.value("pid", int64_t{0})));
    }
    CHECK(std::system("pgrep -f '[s]leep 918273' > /dev/null") != 0);
    CHECK_FALSE(fs::exists(r.output));
  }
}

TEST_CASE("when mpiexec itself is killed, its ranks die with it and the session sweep takes the rest") {
  std::string why;
  if (!launcher_available(&why)) {
    fmt::print("OPENSCI-SKIPPED: {}\n", why);
    return;
  }
  ScratchDir dir("mpiexec-killed");
  harness::ToyOptions t;
  t.config = test::source_dir() / "toy_configs/opensci-ref.json";
  t.out = dir / "model";
  harness::build_toy(t);
  write_tokens_json(TokenBatch::from_json_file(test::source_dir() / "fixtures/tokens/padded-batch.json"),
                    dir / "tokens.json");
  // A job in a session of its own whose rank 1 hangs with a grandchild, as the launcher starts it.
  const auto sid_file = dir / "sid";
  const auto cmd = fmt::format(
      "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 setsid sh -c 'echo $$ > {}; exec "
      "{} --oversubscribe --bind-to none -n 2 {} forward-sharded --model {} --tokens-file {} --sp 2 --status-dir {} "
      "--inject-fault 1:hang' > {} 2>&1 &",
      sid_file.string(), OPENSCI_MPIEXEC_FOR_TESTS, OPENSCI_CLI, t.out.string(), (dir / "tokens.json").string(),
      dir.path().string(), (dir / "job.log").string());
  REQUIRE(std::system(cmd.c_str()) == 0);
  json st = json::object();
  for (int i = 0; i < 300 && st.value("stage", "") != "layer 0 attention"; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    std::ifstream in(dir / "rank.1.json");
    try {
      if (in) st = json::parse(in);
    } catch (const json::exception&) {
      st = json::object();  // caught mid-rename: read again
    }
  }
  REQUIRE(st.value("stage", "") == "layer 0 attention");
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the grandchild is started
  const int sid = std::stoi(test::read_text(sid_file));
  REQUIRE(::kill(sid, SIGKILL) == 0);  // mpiexec (the session leader) dies without cleaning up
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  CHECK_FALSE(alive(st.value("pid", int64_t{0})));                      // the rank died with its parent
  CHECK(std::system("pgrep -f '[s]leep 918273' > /dev/null") == 0);     // its grandchild did not
  CHECK(kill_job_session(sid) >= 1);
  CHECK(std::system("pgrep -f '[s]leep 918273' > /dev/null") != 0);
}
