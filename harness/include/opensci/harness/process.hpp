// Subprocess runner: one child in its own session / process group, a complete explicit
// environment (nothing inherited), stdout/stderr to files, a timeout that takes down the
// whole process group (grandchildren included) and reaps it.
#pragma once

#include <chrono>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace opensci::harness {

struct ProcessSpec {
  // argv[0] is the program: a path (contains '/') or a name looked up in env["PATH"] (not
  // the parent's PATH).
  std::vector<std::string> argv;
  // The COMPLETE environment of the child; nothing of the parent's environment is inherited.
  std::map<std::string, std::string> env;
  // Working directory of the child; empty = the parent's current directory.
  std::filesystem::path cwd;
  // <= 0: no timeout. On expiry the whole process group gets SIGTERM, then SIGKILL after
  // `kill_grace`, and is reaped.
  std::chrono::milliseconds timeout{0};
  std::chrono::milliseconds kill_grace{2000};
  // Files receiving the child's stdout/stderr (truncated; parent dirs created). Empty = inherit
  // the parent's stream (stderr_tail stays empty then). The same path for both = one merged file.
  std::filesystem::path stdout_path, stderr_path;
  // Optional: called every `heartbeat_interval` while the child runs, with seconds elapsed
  // (used for progress lines during long provisioning steps).
  std::chrono::milliseconds heartbeat_interval{0};
  std::function<void(double)> heartbeat;
  // Descriptors (besides 0-2) the child keeps open; all others are closed. Used to hand a
  // build's flock to its processes, so the lock stays held while any of them still runs.
  std::vector<int> inherit_fds;
};

struct ProcessResult {
  int exit_code = -1;       // WEXITSTATUS when the child exited, else -1
  int signal = 0;           // terminating signal, 0 when it exited
  bool timed_out = false;   // the timeout fired and the group was killed
  bool started = false;     // execve succeeded
  std::string start_error;  // why it could not start ("execve(/x/y): No such file or directory")
  int strays_killed = 0;    // processes of the group still alive after the leader ended (killed)
  double wall_seconds = 0;
  std::string stderr_tail;  // last ~4 KiB of the stderr file

  bool ok() const { return started && !timed_out && signal == 0 && exit_code == 0; }
  // One line: "exit code 3", "killed by signal 11 (SIGSEGV)", "timed out after 2.0 s ...",
  // "could not start: ...".
  std::string describe() const;
};

// Runs the process to completion. Never throws for failures of the child (they are in the
// result); throws opensci::Error for an unusable spec (empty argv) or when the parent cannot
// create pipes / fork. EINTR-safe; safe to call from several threads at once.
// The child dies with the caller: it gets SIGKILL when the calling thread's process dies
// (PR_SET_PDEATHSIG), and SIGINT/SIGTERM/SIGHUP of this process are forwarded as SIGTERM to the
// process groups of all running children (installed on first use for signals still at their
// default action; see forward_termination_to_children()).
ProcessResult run_process(const ProcessSpec& spec);

// Starts a process that outlives the caller (a server such as the capture worker): its own
// session, reparented to init (double fork; the intermediate process is reaped here), no
// PR_SET_PDEATHSIG, stdin /dev/null, stdout/stderr to spec.stdout_path / spec.stderr_path
// (required: a detached process must never hold the caller's pipes, or CTest would wait for it),
// every other descriptor closed except spec.inherit_fds, cwd and env as in run_process.
// spec.timeout and the heartbeat are ignored. Returns its pid; throws opensci::Error naming the
// failed step ("execve(/x/y): No such file or directory") when it cannot start.
int spawn_detached(const ProcessSpec& spec);

// While alive, SIGINT/SIGTERM/SIGHUP of this process are forwarded to process group `pgid` as to
// the children of run_process (for a process started elsewhere, e.g. a capture forked by the
// capture worker on this process's behalf). pgid <= 0: nothing.
class ForwardedGroup {
 public:
  explicit ForwardedGroup(int pgid);
  ~ForwardedGroup();
  ForwardedGroup(const ForwardedGroup&) = delete;
  ForwardedGroup& operator=(const ForwardedGroup&) = delete;

 private:
  void* slot_ = nullptr;
};

// Installs the SIGINT/SIGTERM/SIGHUP forwarding unconditionally (replacing existing handlers):
// the groups of running children get SIGTERM, then this process dies of the signal.
void forward_termination_to_children();

// Last `max_bytes` of a file ("" when missing).
std::string file_tail(const std::filesystem::path& path, size_t max_bytes = 4096);

// Quotes a string for /bin/sh ('...' with embedded quotes escaped).
std::string shell_quote(const std::string& s);

// Pids of live (non-zombie) processes whose process group is `pgid`, read from /proc.
std::vector<int> live_group_members(int pgid);

}  // namespace opensci::harness
