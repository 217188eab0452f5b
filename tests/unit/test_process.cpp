// The subprocess runner: exit codes, capture, clean environment, timeouts that take down the
// whole process group (grandchildren included), crashes, exec failures, cwd, EINTR.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>

#include "opensci/error.hpp"
#include "opensci/harness/process.hpp"
#include "test_helpers.hpp"

using namespace opensci::harness;
using opensci::test::read_text;
using opensci::test::ScratchDir;

namespace {

const std::map<std::string, std::string> kEnv = {{"PATH", "/usr/bin:/bin"}, {"LANG", "C.UTF-8"}};

ProcessSpec sh(const std::string& script, const ScratchDir& dir) {
  ProcessSpec spec;
  spec.argv = {"/bin/sh", "-c", script};
  spec.env = kEnv;
  spec.stdout_path = dir / "out.txt";
  spec.stderr_path = dir / "err.txt";
  return spec;
}

// Gone = no such process, or a zombie waiting for init to reap it (it runs no code any more).
bool process_gone(pid_t pid) {
  if (::kill(pid, 0) != 0 && errno == ESRCH) return true;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return true;
  const auto close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() && (line[close + 2] == 'Z' || line[close + 2] == 'X');
}

std::vector<pid_t> read_pids(const std::filesystem::path& file) {
  std::vector<pid_t> pids;
  std::ifstream in(file);
  pid_t p;
  while (in >> p) pids.push_back(p);
  return pids;
}

}  // namespace

TEST_CASE("run_process: exit codes", "[process]") {
  ScratchDir dir("proc-exit");
  auto r = run_process(sh("exit 0", dir));
  CHECK(r.started);
  CHECK(r.ok());
  CHECK(r.exit_code == 0);
  r = run_process(sh("exit 3", dir));
  CHECK(r.started);
  CHECK_FALSE(r.ok());
  CHECK(r.exit_code == 3);
  CHECK(r.signal == 0);
  CHECK_FALSE(r.timed_out);
  CHECK(r.describe().find("exit code 3") != std::string::npos);
  CHECK(r.wall_seconds >= 0);
}

TEST_CASE("run_process: stdout and stderr go to files, stderr tail kept", "[process]") {
  ScratchDir dir("proc-capture");
  auto r = run_process(sh("echo to-stdout; echo to-stderr >&2; exit 1", dir));
  CHECK(r.exit_code == 1);
  CHECK(read_text(dir / "out.txt") == "to-stdout\n");
  CHECK(read_text(dir / "err.txt") == "to-stderr\n");
  CHECK(r.stderr_tail == "to-stderr\n");

  SECTION("the tail is the last ~4 KiB") {
    r = run_process(sh("i=0; while [ $i -lt 2000 ]; do echo line-$i >&2; i=$((i+1)); done; echo LAST >&2", dir));
    CHECK(r.stderr_tail.size() <= 4096);
    CHECK(r.stderr_tail.size() > 3000);
    CHECK(r.stderr_tail.rfind("line-", 0) == 0);  // starts at a line boundary
    CHECK(r.stderr_tail.substr(r.stderr_tail.size() - 5) == "LAST\n");
  }
  SECTION("one path for both streams merges them") {
    auto spec = sh("echo a; echo b >&2; echo c", dir);
    spec.stderr_path = spec.stdout_path;
    r = run_process(spec);
    CHECK(read_text(dir / "out.txt") == "a\nb\nc\n");
  }
  SECTION("parent directories of the output files are created") {
    auto spec = sh("echo nested", dir);
    spec.stdout_path = dir / "a" / "b" / "out.txt";
    REQUIRE(run_process(spec).ok());
    CHECK(read_text(dir / "a" / "b" / "out.txt") == "nested\n");
  }
}

TEST_CASE("run_process: the child's environment is exactly the spec's", "[process]") {
  ScratchDir dir("proc-env");
  ::setenv("OPENSCI_PARENT_ONLY", "leaked", 1);
  auto spec = sh("echo \"[${OPENSCI_PARENT_ONLY}][${CHILD_VAR}]\"; env", dir);
  spec.env["CHILD_VAR"] = "given";
  const auto r = run_process(spec);
  ::unsetenv("OPENSCI_PARENT_ONLY");
  REQUIRE(r.ok());
  const auto out = read_text(dir / "out.txt");
  CHECK(out.rfind("[][given]\n", 0) == 0);
  CHECK(out.find("OPENSCI_PARENT_ONLY") == std::string::npos);
  CHECK(out.find("HOME=") == std::string::npos);  // not even HOME is inherited
  CHECK(out.find("CHILD_VAR=given") != std::string::npos);
}

TEST_CASE("run_process: timeout kills the whole process group, grandchildren included", "[process]") {
  ScratchDir dir("proc-timeout");
  const auto pids = dir / "pids";
  // The leader starts a sleeping child and a sub-shell which starts its own sleeping child;
  // one grandchild even ignores SIGTERM, so only the SIGKILL after the grace period gets it.
  auto spec = sh("sleep 1000 & echo $! >> " + pids.string() + "; sh -c 'sleep 1000 & echo $! >> " + pids.string() +
                     "; (trap \"\" TERM; exec sleep 1000) & echo $! >> " + pids.string() + "; wait' & echo $! >> " +
                     pids.string() + "; echo $$ >> " + pids.string() + "; wait",
                 dir);
  spec.timeout = std::chrono::milliseconds(600);
  spec.kill_grace = std::chrono::milliseconds(500);
  const auto t0 = std::chrono::steady_clock::now();
  const auto r = run_process(spec);
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK(r.started);
  CHECK(r.timed_out);
  CHECK_FALSE(r.ok());
  CHECK(r.describe().find("timed out") != std::string::npos);
  CHECK(took < 4.0);
  const auto all = read_pids(pids);
  REQUIRE(all.size() == 5);
  for (const pid_t p : all) {
    INFO("pid " << p);
    CHECK(process_gone(p));
  }
  CHECK(live_group_members(all.back()).empty());
}

TEST_CASE("run_process: processes left behind by a leader that exited are killed", "[process]") {
  ScratchDir dir("proc-strays");
  const auto r = run_process(sh("sleep 1000 & echo $! > " + (dir / "pid").string() + "; exit 0", dir));
  CHECK(r.ok());
  CHECK(r.strays_killed == 1);
  const auto pids = read_pids(dir / "pid");
  REQUIRE(pids.size() == 1);
  CHECK(process_gone(pids[0]));
}

TEST_CASE("run_process: a crash by signal is reported as such", "[process]") {
  ScratchDir dir("proc-signal");
  const auto r = run_process(sh("kill -SEGV $$", dir));
  CHECK(r.started);
  CHECK(r.signal == SIGSEGV);
  CHECK(r.exit_code == -1);
  CHECK_FALSE(r.timed_out);
  CHECK(r.describe().find("SIGSEGV") != std::string::npos);
}

TEST_CASE("run_process: a missing binary is reported clearly", "[process]") {
  ScratchDir dir("proc-missing");
  ProcessSpec spec;
  spec.env = kEnv;
  spec.stderr_path = dir / "err.txt";
  SECTION("a path") {
    spec.argv = {"/nonexistent/bin/opensci-no-such-tool", "--flag"};
    const auto r = run_process(spec);
    CHECK_FALSE(r.started);
    CHECK_FALSE(r.ok());
    INFO(r.describe());
    CHECK(r.describe().find("could not start") != std::string::npos);
    CHECK(r.start_error.find("execve(/nonexistent/bin/opensci-no-such-tool)") != std::string::npos);
    CHECK(r.start_error.find("No such file or directory") != std::string::npos);
  }
  SECTION("a name looked up in the child's PATH") {
    spec.argv = {"opensci-no-such-tool"};
    const auto r = run_process(spec);
    CHECK_FALSE(r.started);
    CHECK(r.start_error.find("not found in the child's PATH=/usr/bin:/bin") != std::string::npos);
  }
  SECTION("not executable") {
    opensci::test::write_text(dir / "script.sh", "#!/bin/sh\necho hi\n");
    spec.argv = {(dir / "script.sh").string()};
    const auto r = run_process(spec);
    CHECK_FALSE(r.started);
    CHECK(r.start_error.find("Permission denied") != std::string::npos);
  }
  SECTION("an empty argv is a usage error") {
    spec.argv.clear();
    REQUIRE_ERROR_MENTIONS(run_process(spec), "empty argv");
  }
}

TEST_CASE("run_process: working directory", "[process]") {
  ScratchDir dir("proc-cwd");
  std::filesystem::create_directories(dir / "work");
  auto spec = sh("pwd -P", dir);
  spec.cwd = dir / "work";
  REQUIRE(run_process(spec).ok());
  CHECK(read_text(dir / "out.txt") == std::filesystem::canonical(dir / "work").string() + "\n");

  spec.cwd = dir / "missing";
  const auto r = run_process(spec);
  CHECK_FALSE(r.started);
  CHECK(r.start_error.find("chdir(" + (dir / "missing").string() + ")") != std::string::npos);
}

TEST_CASE("run_process: EINTR-safe while the parent is hit by signals", "[process]") {
  ScratchDir dir("proc-eintr");
  struct sigaction handler {
  }, old{};
  handler.sa_handler = [](int) {};
  handler.sa_flags = 0;  // no SA_RESTART: blocking calls return EINTR
  sigemptyset(&handler.sa_mask);
  ::sigaction(SIGUSR1, &handler, &old);
  std::atomic<bool> done{false};
  const pid_t self = ::getpid();
  std::thread pester([&] {
    while (!done) {
      ::kill(self, SIGUSR1);
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
  auto spec = sh("sleep 0.3; echo finished", dir);
  spec.timeout = std::chrono::seconds(20);
  const auto r = run_process(spec);
  done = true;
  pester.join();
  ::sigaction(SIGUSR1, &old, nullptr);
  CHECK(r.ok());
  CHECK_FALSE(r.timed_out);
  CHECK(read_text(dir / "out.txt") == "finished\n");
}

TEST_CASE("run_process: concurrent calls from several threads", "[process]") {
  ScratchDir dir("proc-threads");
  std::vector<ProcessResult> results(6);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < results.size(); ++i) {
    threads.emplace_back([&, i] {
      ProcessSpec spec;
      spec.argv = {"/bin/sh", "-c", "sleep 0.1; echo $N; exit $N"};
      spec.env = kEnv;
      spec.env["N"] = std::to_string(i);
      spec.stdout_path = dir / ("out" + std::to_string(i));
      spec.timeout = std::chrono::seconds(20);
      results[i] = run_process(spec);
    });
  }
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < results.size(); ++i) {
    CHECK(results[i].exit_code == static_cast<int>(i));
    CHECK(read_text(dir / ("out" + std::to_string(i))) == std::to_string(i) + "\n");
  }
}

TEST_CASE("run_process: heartbeat while the child runs", "[process]") {
  ScratchDir dir("proc-heartbeat");
  auto spec = sh("sleep 0.35", dir);
  int beats = 0;
  spec.heartbeat_interval = std::chrono::milliseconds(100);
  spec.heartbeat = [&](double seconds) {
    ++beats;
    CHECK(seconds > 0);
  };
  REQUIRE(run_process(spec).ok());
  CHECK(beats >= 2);
}

TEST_CASE("shell_quote survives quotes and spaces", "[process]") {
  ScratchDir dir("proc-quote");
  const std::string tricky = "it's a \"test\" $HOME `x` \\";
  const auto r = run_process(sh("printf '%s' " + shell_quote(tricky), dir));
  REQUIRE(r.ok());
  CHECK(read_text(dir / "out.txt") == tricky);
}

TEST_CASE("run_process: children die with the harness (SIGTERM forwarded, SIGKILL via pdeathsig)", "[process]") {
  ScratchDir dir("proc-parent-dies");
  for (const int sig : {SIGTERM, SIGKILL}) {
    INFO("harness killed by signal " << sig);
    const auto pids = dir / ("pids-" + std::to_string(sig));
    const pid_t harness = ::fork();
    REQUIRE(harness >= 0);
    if (harness == 0) {
      forward_termination_to_children();
      // leader + a background grandchild
      auto spec = sh("sleep 1000 & echo $! >> " + pids.string() + "; echo $$ >> " + pids.string() + "; wait", dir);
      spec.timeout = std::chrono::seconds(30);
      run_process(spec);
      ::_exit(0);
    }
    for (int i = 0; i < 500 && read_pids(pids).size() < 2; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    const auto children = read_pids(pids);
    REQUIRE(children.size() == 2);
    ::kill(harness, sig);
    int status = 0;
    REQUIRE(::waitpid(harness, &status, 0) == harness);
    CHECK(WIFSIGNALED(status));
    CHECK(WTERMSIG(status) == sig);
    // the leader always goes; the grandchild too when the signal could be forwarded
    const pid_t leader = children[1], grandchild = children[0];
    bool leader_gone = false, grandchild_gone = false;
    for (int i = 0; i < 200 && !(leader_gone && (grandchild_gone || sig == SIGKILL)); ++i) {
      leader_gone = process_gone(leader);
      grandchild_gone = process_gone(grandchild);
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    CHECK(leader_gone);
    if (sig == SIGTERM) CHECK(grandchild_gone);
    if (!process_gone(grandchild)) ::kill(grandchild, SIGKILL);  // SIGKILL case: no one could forward
  }
}

TEST_CASE("run_process: only the listed descriptors reach the child", "[process]") {
  ScratchDir dir("proc-fds");
  // High numbers, so they cannot be confused with the fd the shell opens to list /proc/self/fd.
  const int leaked = ::fcntl(::open((dir / "plain").c_str(), O_WRONLY | O_CREAT, 0644), F_DUPFD, 50);  // no CLOEXEC
  const int passed = ::fcntl(::open((dir / "lock").c_str(), O_RDWR | O_CREAT, 0644), F_DUPFD_CLOEXEC, 60);
  REQUIRE(leaked > 2);
  REQUIRE(passed > 2);
  auto spec = sh("for f in /proc/self/fd/*; do echo ${f##*/}; done", dir);
  auto fds = [&] {
    REQUIRE(run_process(spec).ok());
    std::set<int> seen;
    std::istringstream in(read_text(dir / "out.txt"));
    int fd;
    while (in >> fd) seen.insert(fd);
    return seen;
  };
  auto seen = fds();
  CHECK_FALSE(seen.count(leaked));
  CHECK_FALSE(seen.count(passed));
  spec.inherit_fds = {passed};
  seen = fds();
  CHECK_FALSE(seen.count(leaked));
  CHECK(seen.count(passed));
  ::close(leaked);
  ::close(passed);
}
