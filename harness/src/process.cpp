// Subprocess runner (see process.hpp). The child only calls async-signal-safe functions
// between fork and execve: everything it needs (argv, envp, paths) is prepared before fork.
#include "opensci/harness/process.hpp"

#include <fcntl.h>
#include <fmt/core.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <climits>
#include <fstream>
#include <mutex>
#include <system_error>
#include <thread>

#include "opensci/error.hpp"

namespace opensci::harness {
namespace {

using Clock = std::chrono::steady_clock;

std::string errno_text(int err) { return std::error_code(err, std::generic_category()).message(); }

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

void sleep_for(std::chrono::milliseconds d) {
  timespec req{static_cast<time_t>(d.count() / 1000), static_cast<long>((d.count() % 1000) * 1000000)};
  timespec rem{};
  while (nanosleep(&req, &rem) != 0 && errno == EINTR) req = rem;
}

// What the child reports through the CLOEXEC pipe when a step before/including execve fails.
enum class ChildStage : int { Setsid = 1, DevNull, Stdout, Stderr, Chdir, Execve };
struct ChildFailure {
  ChildStage stage;
  int err;
};

[[noreturn]] void child_fail(int fd, ChildStage stage) {
  const ChildFailure msg{stage, errno};
  const char* p = reinterpret_cast<const char*>(&msg);
  size_t left = sizeof msg;
  while (left > 0) {
    const ssize_t n = ::write(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    p += n;
    left -= static_cast<size_t>(n);
  }
  _exit(127);
}

// In a forked child before exec (async-signal-safe calls only): no blocked signals and every
// handler back to its default, so the program starts as from a shell.
void reset_signals_in_child() {
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, nullptr);
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  for (int sig = 1; sig < NSIG; ++sig)
    if (sig != SIGKILL && sig != SIGSTOP) sigaction(sig, &dfl, nullptr);
}

int open_retry(const char* path, int flags, mode_t mode = 0) {
  int fd;
  do fd = ::open(path, flags, mode);
  while (fd < 0 && errno == EINTR);
  return fd;
}

void close_from(int lo, int hi) {
  if (lo > hi) return;
  if (::close_range(static_cast<unsigned>(lo), static_cast<unsigned>(hi), 0) == 0) return;
  const long max_fd = std::min<long>(sysconf(_SC_OPEN_MAX), 65536);
  for (long fd = lo; fd <= std::min<long>(hi, max_fd); ++fd) ::close(static_cast<int>(fd));
}

std::string resolve_program(const std::string& name, const std::map<std::string, std::string>& env,
                            std::string& error) {
  if (name.find('/') != std::string::npos) return name;
  const auto it = env.find("PATH");
  if (it == env.end()) {
    error = fmt::format("'{}' is not a path and the child environment has no PATH to look it up in", name);
    return {};
  }
  size_t begin = 0;
  while (begin <= it->second.size()) {
    size_t end = it->second.find(':', begin);
    if (end == std::string::npos) end = it->second.size();
    const std::string dir = it->second.substr(begin, end - begin);
    if (!dir.empty()) {
      const std::string candidate = dir + "/" + name;
      struct stat st {};
      if (::stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(candidate.c_str(), X_OK) == 0)
        return candidate;
    }
    begin = end + 1;
  }
  error = fmt::format("'{}' not found in the child's PATH={}", name, it->second);
  return {};
}

std::string stage_text(ChildStage stage, const ProcessSpec& spec, const std::string& program) {
  switch (stage) {
    case ChildStage::Setsid:
      return "setsid()";
    case ChildStage::DevNull:
      return "open(/dev/null) for stdin";
    case ChildStage::Stdout:
      return fmt::format("open({}) for stdout", spec.stdout_path.string());
    case ChildStage::Stderr:
      return fmt::format("open({}) for stderr", spec.stderr_path.string());
    case ChildStage::Chdir:
      return fmt::format("chdir({})", spec.cwd.string());
    case ChildStage::Execve:
      return fmt::format("execve({})", program);
  }
  return "child setup";
}

int waitpid_retry(pid_t pid, int* status, int flags) {
  int rc;
  do rc = ::waitpid(pid, status, flags);
  while (rc < 0 && errno == EINTR);
  return rc;
}

// True once the leader has terminated (it stays a zombie: WNOWAIT keeps the pgid reserved).
bool leader_ended(pid_t pid) {
  siginfo_t info{};
  int rc;
  do rc = ::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG | WNOWAIT);
  while (rc < 0 && errno == EINTR);
  if (rc < 0) return true;  // ECHILD: nothing left to wait for
  return info.si_pid == pid;
}

// Process groups of the children running now, so that SIGINT/SIGTERM/SIGHUP of the harness
// (Ctrl-C, a CI job cancelled) reaches them too: they live in their own sessions and would
// otherwise survive us. Fixed-size and lock-free: the signal handler only reads it.
constexpr size_t kMaxTracked = 256;
std::atomic<pid_t> g_running_groups[kMaxTracked];

void forward_and_die(int sig) {
  for (auto& g : g_running_groups) {
    const pid_t pgid = g.load();
    if (pgid > 0) ::kill(-pgid, SIGTERM);
  }
  // SA_RESETHAND restored the default action: die of the same signal.
  ::raise(sig);
}

void install_forwarding(bool only_if_default) {
  for (const int sig : {SIGINT, SIGTERM, SIGHUP}) {
    struct sigaction current {};
    if (only_if_default && (::sigaction(sig, nullptr, &current) != 0 || current.sa_handler != SIG_DFL)) continue;
    struct sigaction act {};
    act.sa_handler = forward_and_die;
    act.sa_flags = SA_RESETHAND;
    sigemptyset(&act.sa_mask);
    ::sigaction(sig, &act, nullptr);
  }
}

// Installed once, and only for signals whose action is still the default (an application's
// own handlers are left alone).
void install_forwarding_once() {
  static std::once_flag once;
  std::call_once(once, [] { install_forwarding(true); });
}

struct TrackedGroup {
  explicit TrackedGroup(pid_t pgid) {
    for (auto& g : g_running_groups) {
      pid_t expected = 0;
      if (g.compare_exchange_strong(expected, pgid)) {
        slot = &g;
        return;
      }
    }
  }
  ~TrackedGroup() {
    if (slot) slot->store(0);
  }
  std::atomic<pid_t>* slot = nullptr;
};

// The steps before execve shared by run_process's child and spawn_detached's grandchild:
// default signal dispositions, stdin /dev/null, stdout/stderr files, cwd, no core files, every
// descriptor closed but err_fd and keep_fds (sorted). Async-signal-safe.
void child_redirect_and_close(int err_fd, const char* out_path, const char* err_path, bool merged, const char* cwd,
                              const std::vector<int>& keep_fds) {
  const int in = open_retry("/dev/null", O_RDONLY);
  if (in < 0 || ::dup2(in, 0) < 0) child_fail(err_fd, ChildStage::DevNull);
  if (*out_path) {
    const int fd = open_retry(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || ::dup2(fd, 1) < 0) child_fail(err_fd, ChildStage::Stdout);
  }
  if (merged) {
    if (::dup2(1, 2) < 0) child_fail(err_fd, ChildStage::Stderr);
  } else if (*err_path) {
    const int fd = open_retry(err_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || ::dup2(fd, 2) < 0) child_fail(err_fd, ChildStage::Stderr);
  }
  if (*cwd && ::chdir(cwd) != 0) child_fail(err_fd, ChildStage::Chdir);
  const rlimit no_core{0, 0};
  ::setrlimit(RLIMIT_CORE, &no_core);
  int lo = 3;
  size_t k = 0;
  bool err_done = false;
  for (;;) {
    int keep = INT_MAX;
    const bool take_err = !err_done && (k >= keep_fds.size() || err_fd < keep_fds[k]);
    if (take_err)
      keep = err_fd;
    else if (k < keep_fds.size())
      keep = keep_fds[k];
    if (keep == INT_MAX) break;
    close_from(lo, keep - 1);
    lo = std::max(lo, keep + 1);
    if (take_err)
      err_done = true;
    else
      ::fcntl(keep_fds[k++], F_SETFD, 0);
  }
  close_from(lo, INT_MAX);
}

}  // namespace

ForwardedGroup::ForwardedGroup(int pgid) {
  if (pgid <= 0) return;
  install_forwarding_once();
  for (auto& g : g_running_groups) {
    pid_t expected = 0;
    if (g.compare_exchange_strong(expected, pgid)) {
      slot_ = &g;
      return;
    }
  }
}

ForwardedGroup::~ForwardedGroup() {
  if (slot_) static_cast<std::atomic<pid_t>*>(slot_)->store(0);
}

int spawn_detached(const ProcessSpec& spec) {
  if (spec.argv.empty()) fail("spawn_detached: empty argv (expected at least the program to run)");
  if (spec.stdout_path.empty() || spec.stderr_path.empty())
    fail("spawn_detached({}): stdout_path and stderr_path are required (a detached process must not inherit the "
         "caller's streams)",
         spec.argv[0]);
  std::string resolve_error;
  const std::string program = resolve_program(spec.argv[0], spec.env, resolve_error);
  if (program.empty()) fail("spawn_detached: {}", resolve_error);
  std::vector<std::string> env_strings;
  for (const auto& [key, value] : spec.env) env_strings.push_back(key + "=" + value);
  std::vector<char*> argv, envp;
  for (const auto& a : spec.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  for (auto& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);
  for (const auto& p : {spec.stdout_path, spec.stderr_path}) {
    std::error_code ec;
    if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path(), ec);
  }
  const std::string out_path = spec.stdout_path.string(), err_path = spec.stderr_path.string();
  const std::string cwd = spec.cwd.string();
  const bool merged = out_path == err_path;
  std::vector<int> keep_fds;
  for (const int fd : spec.inherit_fds)
    if (fd > 2) keep_fds.push_back(fd);
  std::sort(keep_fds.begin(), keep_fds.end());
  keep_fds.erase(std::unique(keep_fds.begin(), keep_fds.end()), keep_fds.end());

  int err_pipe[2], pid_pipe[2];
  if (::pipe2(err_pipe, O_CLOEXEC) != 0) fail("spawn_detached: pipe2 failed: {}", errno_text(errno));
  if (::pipe2(pid_pipe, O_CLOEXEC) != 0) {
    const int err = errno;
    ::close(err_pipe[0]);
    ::close(err_pipe[1]);
    fail("spawn_detached: pipe2 failed: {}", errno_text(err));
  }
  const pid_t middle = ::fork();
  if (middle < 0) {
    const int err = errno;
    for (const int fd : {err_pipe[0], err_pipe[1], pid_pipe[0], pid_pipe[1]}) ::close(fd);
    fail("spawn_detached: fork failed for '{}': {}", program, errno_text(err));
  }
  if (middle == 0) {
    // ---- intermediate: async-signal-safe calls only ----
    int err_fd = ::fcntl(err_pipe[1], F_DUPFD_CLOEXEC, 3);
    if (err_fd < 0) err_fd = err_pipe[1];
    reset_signals_in_child();
    if (::setsid() < 0) child_fail(err_fd, ChildStage::Setsid);
    const pid_t server = ::fork();
    if (server < 0) child_fail(err_fd, ChildStage::Setsid);
    if (server > 0) {
      const ssize_t n = ::write(pid_pipe[1], &server, sizeof server);
      _exit(n == static_cast<ssize_t>(sizeof server) ? 0 : 126);
    }
    // ---- the detached process (no longer a session leader: it can never get a terminal) ----
    child_redirect_and_close(err_fd, out_path.c_str(), err_path.c_str(), merged, cwd.c_str(), keep_fds);
    ::execve(program.c_str(), argv.data(), envp.data());
    child_fail(err_fd, ChildStage::Execve);
  }
  ::close(err_pipe[1]);
  ::close(pid_pipe[1]);
  pid_t server = -1;
  size_t got_pid = 0;
  while (got_pid < sizeof server) {
    const ssize_t n = ::read(pid_pipe[0], reinterpret_cast<char*>(&server) + got_pid, sizeof server - got_pid);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got_pid += static_cast<size_t>(n);
  }
  ::close(pid_pipe[0]);
  ChildFailure failure{};
  size_t got = 0;
  while (got < sizeof failure) {
    const ssize_t n = ::read(err_pipe[0], reinterpret_cast<char*>(&failure) + got, sizeof failure - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  ::close(err_pipe[0]);
  int status = 0;
  waitpid_retry(middle, &status, 0);
  if (got == sizeof failure)
    fail("spawn_detached: {}: {}", stage_text(failure.stage, spec, program), errno_text(failure.err));
  if (got_pid != sizeof server || server <= 0)
    fail("spawn_detached({}): the intermediate process ended without reporting the pid ({})", program,
         WIFSIGNALED(status) ? fmt::format("signal {}", WTERMSIG(status)) : fmt::format("exit {}", WEXITSTATUS(status)));
  return server;
}

void forward_termination_to_children() { install_forwarding(false); }

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'')
      out += "'\\''";
    else
      out += c;
  }
  return out + "'";
}

std::string file_tail(const std::filesystem::path& path, size_t max_bytes) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return {};
  in.seekg(0, std::ios::end);
  const auto size = static_cast<size_t>(std::max<std::streamoff>(in.tellg(), 0));
  const size_t start = size > max_bytes ? size - max_bytes : 0;
  in.seekg(static_cast<std::streamoff>(start));
  std::string text(size - start, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<size_t>(std::max<std::streamsize>(in.gcount(), 0)));
  if (start > 0) {  // start at a line boundary when we cut
    const auto nl = text.find('\n');
    if (nl != std::string::npos && nl + 1 < text.size()) text.erase(0, nl + 1);
  }
  return text;
}

std::vector<int> live_group_members(int pgid) {
  std::vector<int> pids;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/proc", ec)) {
    const std::string name = entry.path().filename().string();
    int pid = 0;
    const auto [ptr, perr] = std::from_chars(name.data(), name.data() + name.size(), pid);
    if (perr != std::errc() || ptr != name.data() + name.size()) continue;
    std::ifstream stat(entry.path() / "stat");
    std::string line;
    if (!std::getline(stat, line)) continue;  // exited meanwhile
    const auto close = line.rfind(')');
    if (close == std::string::npos) continue;
    // after "pid (comm) ": state ppid pgrp ...
    char state = 0;
    long ppid = 0, pgrp = 0;
    if (std::sscanf(line.c_str() + close + 1, " %c %ld %ld", &state, &ppid, &pgrp) != 3) continue;
    if (pgrp == pgid && state != 'Z' && state != 'X') pids.push_back(pid);
  }
  return pids;
}

std::string ProcessResult::describe() const {
  if (!started) return fmt::format("could not start: {}", start_error);
  std::string text;
  if (timed_out) {
    text = fmt::format("timed out after {:.1f} s; process group killed (SIGTERM, then SIGKILL after the grace period)",
                       wall_seconds);
    if (signal != 0) {
      const char* abbrev = ::sigabbrev_np(signal);
      text += fmt::format("; leader ended by signal {} (SIG{})", signal, abbrev ? abbrev : "?");
    }
  } else if (signal != 0) {
    const char* abbrev = ::sigabbrev_np(signal);
    text = fmt::format("killed by signal {} (SIG{}) after {:.2f} s", signal, abbrev ? abbrev : "?", wall_seconds);
  } else {
    text = fmt::format("exit code {} after {:.2f} s", exit_code, wall_seconds);
  }
  if (strays_killed > 0) text += fmt::format("; {} leftover process(es) of its group killed", strays_killed);
  return text;
}

ProcessResult run_process(const ProcessSpec& spec) {
  if (spec.argv.empty()) fail("run_process: empty argv (expected at least the program to run)");
  ProcessResult result;
  const auto t0 = Clock::now();

  std::string resolve_error;
  const std::string program = resolve_program(spec.argv[0], spec.env, resolve_error);
  if (program.empty()) {
    result.start_error = resolve_error;
    return result;
  }

  // Everything the child touches is prepared here (no allocation after fork).
  std::vector<std::string> env_strings;
  env_strings.reserve(spec.env.size());
  for (const auto& [key, value] : spec.env) env_strings.push_back(key + "=" + value);
  std::vector<char*> argv, envp;
  for (const auto& a : spec.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  for (auto& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);
  for (const auto& p : {spec.stdout_path, spec.stderr_path}) {
    if (p.empty() || !p.has_parent_path()) continue;
    std::error_code ec;
    std::filesystem::create_directories(p.parent_path(), ec);
  }
  const std::string out_path = spec.stdout_path.string(), err_path = spec.stderr_path.string();
  const std::string cwd = spec.cwd.string();
  const bool merged = !out_path.empty() && out_path == err_path;
  std::vector<int> keep_fds;
  for (const int fd : spec.inherit_fds)
    if (fd > 2) keep_fds.push_back(fd);
  std::sort(keep_fds.begin(), keep_fds.end());
  keep_fds.erase(std::unique(keep_fds.begin(), keep_fds.end()), keep_fds.end());

  install_forwarding_once();
  const pid_t parent_pid = ::getpid();
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC) != 0) fail("run_process: pipe2 failed: {}", errno_text(errno));
  const pid_t pid = ::fork();
  if (pid < 0) {
    const int err = errno;
    ::close(pipe_fds[0]);
    ::close(pipe_fds[1]);
    fail("run_process: fork failed for '{}': {}", program, errno_text(err));
  }
  if (pid == 0) {
    // ---- child: async-signal-safe calls only ----
    int err_fd = ::fcntl(pipe_fds[1], F_DUPFD_CLOEXEC, 3);
    if (err_fd < 0) err_fd = pipe_fds[1];
    reset_signals_in_child();
    if (::setsid() < 0) child_fail(err_fd, ChildStage::Setsid);
    // Die with the parent (even when it is SIGKILLed); the check closes the race where the
    // parent died before prctl.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent_pid) _exit(127);
    // stdin /dev/null, the output files, cwd, no core files (a crashing capture must not litter
    // core files), every other descriptor closed but err_fd and the inherited ones.
    child_redirect_and_close(err_fd, out_path.c_str(), err_path.c_str(), merged, cwd.c_str(), keep_fds);
    ::execve(program.c_str(), argv.data(), envp.data());
    child_fail(err_fd, ChildStage::Execve);
  }

  // ---- parent ----
  const TrackedGroup tracked(pid);
  ::close(pipe_fds[1]);
  ChildFailure failure{};
  size_t got = 0;
  while (got < sizeof failure) {
    const ssize_t n = ::read(pipe_fds[0], reinterpret_cast<char*>(&failure) + got, sizeof failure - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  ::close(pipe_fds[0]);
  if (got == sizeof failure) {
    int status = 0;
    waitpid_retry(pid, &status, 0);
    result.start_error = fmt::format("{}: {}", stage_text(failure.stage, spec, program), errno_text(failure.err));
    result.wall_seconds = seconds_since(t0);
    if (!err_path.empty()) result.stderr_tail = file_tail(spec.stderr_path);
    return result;
  }
  result.started = true;

  const bool has_timeout = spec.timeout.count() > 0;
  const auto deadline = t0 + spec.timeout;
  auto next_beat = t0 + spec.heartbeat_interval;
  std::chrono::milliseconds step{1};
  while (!leader_ended(pid)) {
    const auto now = Clock::now();
    if (has_timeout && now >= deadline) {
      result.timed_out = true;
      ::kill(-pid, SIGTERM);
      const auto grace_end = Clock::now() + spec.kill_grace;
      while (Clock::now() < grace_end && !(leader_ended(pid) && live_group_members(pid).empty()))
        sleep_for(std::chrono::milliseconds(20));
      break;
    }
    if (spec.heartbeat && spec.heartbeat_interval.count() > 0 && now >= next_beat) {
      spec.heartbeat(seconds_since(t0));
      next_beat = now + spec.heartbeat_interval;
    }
    auto wait = step;
    if (has_timeout) {
      wait = std::min(
          wait, std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now) + std::chrono::milliseconds(1));
    }
    sleep_for(wait);
    step = std::min(step * 2, std::chrono::milliseconds(25));
  }

  // The leader is a zombie (or killed); its pid still reserves the process group id, so
  // signalling -pid cannot hit an unrelated group. Whatever is left of the group goes now.
  auto strays = live_group_members(pid);
  if (!strays.empty()) {
    if (!result.timed_out) result.strays_killed = static_cast<int>(strays.size());
    ::kill(-pid, SIGKILL);
    const auto kill_end = Clock::now() + std::chrono::seconds(2);
    while (!live_group_members(pid).empty() && Clock::now() < kill_end) sleep_for(std::chrono::milliseconds(5));
  }
  if (result.timed_out && !leader_ended(pid)) ::kill(pid, SIGKILL);

  int status = 0;
  if (waitpid_retry(pid, &status, 0) == pid) {
    if (WIFEXITED(status)) result.exit_code = WEXITSTATUS(status);
    if (WIFSIGNALED(status)) result.signal = WTERMSIG(status);
  }
  result.wall_seconds = seconds_since(t0);
  if (!err_path.empty()) result.stderr_tail = file_tail(spec.stderr_path);
  return result;
}

}  // namespace opensci::harness
