// The capture worker client (see capture_worker.hpp for the design, worker.py for the server).
#include "opensci/harness/capture_worker.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <optional>
#include <set>
#include <thread>

#include "opensci/error.hpp"

#ifndef OPEN_TREE_CLONE
#define OPEN_TREE_CLONE 1
#endif
#ifndef OPEN_TREE_CLOEXEC
#define OPEN_TREE_CLOEXEC O_CLOEXEC
#endif
#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif
#ifndef SYS_open_tree
#define SYS_open_tree 428
#endif

namespace opensci::harness {
namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

constexpr int kProtocol = 1;
constexpr const char* kPrivateKeys[] = {"HOME", "TMPDIR", "HF_HOME", "HF_MODULES_CACHE", "XDG_CACHE_HOME"};
// What the worker's own private directories are (but TMPDIR): paths that do not exist, so that an
// import-time constant the child failed to rewrite points nowhere instead of at a shared directory.
constexpr const char* kPlaceholderRoot = "/nonexistent/opensci-capture-worker";

std::string errno_text(int err) { return std::error_code(err, std::generic_category()).message(); }

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

bool is_private_key(const std::string& key) {
  return std::any_of(std::begin(kPrivateKeys), std::end(kPrivateKeys), [&](const char* k) { return key == k; });
}

fs::path worker_script() { return fs::path(OPENSCI_SOURCE_DIR) / "harness" / "python" / "worker.py"; }

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) fail("capture worker: cannot read {}", p.string());
  return {std::istreambuf_iterator<char>(in), {}};
}

struct Paths {
  fs::path dir;
  std::string key;
  fs::path sock() const { return dir / (key + ".sock"); }
  fs::path lock() const { return dir / (key + ".lock"); }
  fs::path log() const { return dir / (key + ".log"); }
  fs::path info() const { return dir / (key + ".json"); }
  fs::path tmp() const { return dir / (key + ".tmp"); }
};

// ---- sockets ---------------------------------------------------------------------------------

class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(o.release()) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) reset(o.release());
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { reset(); }
  int get() const { return fd_; }
  explicit operator bool() const { return fd_ >= 0; }
  int release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset(int fd = -1) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

// Connects to a Unix socket; a path too long for sun_path goes through /proc/self/fd/<dir>/name.
// Returns an invalid Fd and sets `error` (with errno in `err`) when nothing listens.
Fd connect_unix(const fs::path& path, std::string& error, int& err) {
  Fd sock(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!sock) fail("capture worker: socket(AF_UNIX) failed: {}", errno_text(errno));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::string target = path.string();
  Fd dir;
  if (target.size() >= sizeof addr.sun_path) {
    dir = Fd(::open(path.parent_path().c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
    if (!dir) {
      err = errno;
      error = fmt::format("open({}): {}", path.parent_path().string(), errno_text(err));
      return {};
    }
    target = fmt::format("/proc/self/fd/{}/{}", dir.get(), path.filename().string());
  }
  std::memcpy(addr.sun_path, target.c_str(), target.size() + 1);
  int rc;
  do rc = ::connect(sock.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
  while (rc != 0 && errno == EINTR);
  if (rc != 0) {
    err = errno;
    error = fmt::format("connect({}): {}", path.string(), errno_text(err));
    return {};
  }
  return sock;
}

// One newline-terminated JSON message, with descriptors attached (SCM_RIGHTS) to its first byte.
void send_message(int sock, const json& message, const std::vector<int>& fds) {
  const std::string data = message.dump() + "\n";
  size_t sent = 0;
  bool fds_sent = fds.empty();
  while (sent < data.size()) {
    iovec iov{const_cast<char*>(data.data() + sent), data.size() - sent};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    std::vector<char> control;
    if (!fds_sent) {
      control.resize(CMSG_SPACE(sizeof(int) * fds.size()));
      msg.msg_control = control.data();
      msg.msg_controllen = control.size();
      cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
      std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
    }
    const ssize_t n = ::sendmsg(sock, &msg, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail("capture worker: sending a request failed: {}", errno_text(errno));
    fds_sent = true;
    sent += static_cast<size_t>(n);
  }
}

// Newline-delimited JSON from a socket.
class Reader {
 public:
  enum class Got { Message, Timeout, Closed };
  explicit Reader(int fd) : fd_(fd) {}
  // Waits up to `wait` for one message.
  Got next(json& out, std::chrono::milliseconds wait) {
    const auto end = Clock::now() + wait;
    for (;;) {
      const auto nl = buf_.find('\n');
      if (nl != std::string::npos) {
        const std::string line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        try {
          out = json::parse(line);
        } catch (const json::exception& e) {
          out = {{"event", "garbled"}, {"text", line.substr(0, 200)}, {"error", e.what()}};
        }
        return Got::Message;
      }
      if (closed_) return Got::Closed;
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - Clock::now());
      if (left.count() <= 0) return Got::Timeout;
      pollfd p{fd_, POLLIN, 0};
      const int rc = ::poll(&p, 1, static_cast<int>(std::min<long long>(left.count() + 1, 1000)));
      if (rc < 0 && errno != EINTR) fail("capture worker: poll failed: {}", errno_text(errno));
      if (rc <= 0) continue;
      char chunk[65536];
      const ssize_t n = ::recv(fd_, chunk, sizeof chunk, 0);
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (n <= 0) {
        closed_ = true;
        continue;
      }
      buf_.append(chunk, static_cast<size_t>(n));
    }
  }

 private:
  int fd_;
  std::string buf_;
  bool closed_ = false;
};

// ---- locking and starting ----------------------------------------------------------------------

// flock(LOCK_EX) with a deadline; invalid Fd when it ran out.
Fd lock_with_deadline(const fs::path& path, Clock::time_point deadline) {
  Fd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  if (!fd) fail("capture worker: cannot open the start lock {}: {}", path.string(), errno_text(errno));
  for (;;) {
    if (::flock(fd.get(), LOCK_EX | LOCK_NB) == 0) return fd;
    if (errno != EWOULDBLOCK && errno != EINTR)
      fail("capture worker: flock({}) failed: {}", path.string(), errno_text(errno));
    if (Clock::now() >= deadline) return {};
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

bool process_alive(int pid) {
  if (pid <= 0) return false;
  std::ifstream stat(fmt::format("/proc/{}/stat", pid));
  std::string line;
  if (!std::getline(stat, line)) return false;
  const auto close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() && line[close + 2] != 'Z' && line[close + 2] != 'X';
}

std::string cmdline_of(int pid) {
  std::ifstream in(fmt::format("/proc/{}/cmdline", pid), std::ios::binary);
  std::string s{std::istreambuf_iterator<char>(in), {}};
  std::replace(s.begin(), s.end(), '\0', ' ');
  return s;
}

struct Connection {
  Fd sock;
  json hello;
  bool started_here = false;
  double ready_seconds = 0;  // how long getting a ready worker took (start included)
};

// The hello of a freshly connected worker, checked; nullopt + reason when it is not ours.
std::optional<json> read_hello(const Fd& sock, const std::string& key, std::string& why) {
  Reader reader(sock.get());
  json hello;
  const auto got = reader.next(hello, std::chrono::seconds(30));
  if (got != Reader::Got::Message) {
    why = got == Reader::Got::Closed ? "the worker closed the connection before saying hello (retiring?)"
                                     : "the worker did not say hello within 30 s";
    return std::nullopt;
  }
  if (hello.value("event", "") != "hello" || hello.value("protocol", 0) != kProtocol || hello.value("key", "") != key) {
    why = fmt::format("the socket answered with {} (expected a hello of protocol {} and key {})",
                      hello.dump().substr(0, 300), kProtocol, key);
    return std::nullopt;
  }
  return hello;
}

// A ready worker for `paths.key`, started (detached) from `spec` when none listens.
// Returns an invalid socket with `why` when no worker can be had.
Connection get_worker(const Paths& paths, const ProcessSpec& spec, Clock::time_point deadline, std::string& why) {
  // The worker's private TMPDIR: made here, under the lock, so that a predecessor of the same key
  // removing its own on the way out (also under the lock) cannot take it away.
  const auto t0 = Clock::now();
  Connection c;
  for (int attempt = 0; attempt < 4; ++attempt) {
    std::string error;
    int err = 0;
    if (Fd sock = connect_unix(paths.sock(), error, err)) {
      if (auto hello = read_hello(sock, paths.key, why)) {
        c.sock = std::move(sock);
        c.hello = *hello;
        c.ready_seconds = seconds_since(t0);
        return c;
      }
      if (why.find("answered with") != std::string::npos) return {};
      continue;  // a worker on its way out: it removes its socket under the lock, try again
    }
    // Nothing listens: start one, under the lock, unless someone else did meanwhile.
    Fd lock = lock_with_deadline(paths.lock(), deadline);
    if (!lock) {
      why = fmt::format("timed out waiting for the start lock {} (another harness starting this worker?)",
                        paths.lock().string());
      return {};
    }
    if (Fd sock = connect_unix(paths.sock(), error, err)) {
      lock.reset();
      if (auto hello = read_hello(sock, paths.key, why)) {
        c.sock = std::move(sock);
        c.hello = *hello;
        c.ready_seconds = seconds_since(t0);
        return c;
      }
      continue;
    }
    std::error_code ec;
    fs::remove(paths.sock(), ec);  // stale: its worker is gone (nothing accepted the connect)
    fs::create_directories(paths.tmp(), ec);
    int pid = 0;
    try {
      pid = spawn_detached(spec);
    } catch (const Error& e) {
      why = fmt::format("could not start the worker: {}", e.what());
      return {};
    }
    c.started_here = true;
    for (;;) {
      if (Fd sock = connect_unix(paths.sock(), error, err)) {
        lock.reset();
        if (auto hello = read_hello(sock, paths.key, why)) {
          c.sock = std::move(sock);
          c.hello = *hello;
          c.ready_seconds = seconds_since(t0);
          return c;
        }
        return {};
      }
      if (!process_alive(pid)) {
        why = fmt::format("the worker (pid {}) exited while starting; its log {} ends:\n{}", pid, paths.log().string(),
                          file_tail(paths.log(), 2000));
        return {};
      }
      if (Clock::now() >= deadline) {
        ::kill(pid, SIGKILL);
        why = fmt::format("the worker (pid {}) was not ready within the start limit ({:.0f} s); killed; log {}", pid,
                          seconds_since(t0), paths.log().string());
        return {};
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
    }
  }
  why = "no worker after 4 attempts: " + why;
  return {};
}

// Absolute normal forms (+ canonical forms) of dirs, parents first, none below another.
std::vector<fs::path> mount_targets(const std::vector<fs::path>& dirs) {
  std::set<std::string> all;
  for (const auto& d : dirs) {
    if (d.empty()) continue;
    std::string s = fs::absolute(d).lexically_normal().string();
    while (s.size() > 1 && s.back() == '/') s.pop_back();
    if (s == "/") fail("capture worker: cannot make the host's / visible inside the rootfs");
    std::error_code ec;
    if (!fs::is_directory(s, ec)) continue;
    all.insert(s);
    const auto canonical = fs::canonical(s, ec);
    if (!ec) all.insert(canonical.string());
  }
  std::vector<std::string> ordered(all.begin(), all.end());
  std::stable_sort(ordered.begin(), ordered.end(), [](const auto& a, const auto& b) { return a.size() < b.size(); });
  std::vector<fs::path> out;
  for (const auto& s : ordered) {
    const bool covered = std::any_of(out.begin(), out.end(), [&](const fs::path& p) {
      const std::string ps = p.string();
      return s.size() > ps.size() && s.compare(0, ps.size(), ps) == 0 && s[ps.size()] == '/';
    });
    if (!covered) out.emplace_back(s);
  }
  return out;
}

}  // namespace

fs::path default_worker_dir() {
  if (const char* v = std::getenv("OPENSCI_WORKER_DIR"); v && *v) return v;
  return default_cache_root() / "workers";
}

WorkerRun run_in_worker(const Environment& env, const WorkerJob& job, const WorkerSettings& settings) {
  WorkerRun run;
  const auto t0 = Clock::now();
  const fs::path dir = settings.dir.empty() ? default_worker_dir() : settings.dir;
  const fs::path script = worker_script();
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) {
    run.fallback_reason = fmt::format("cannot create the worker dir {}: {}", dir.string(), ec.message());
    return run;
  }
  if (!fs::exists(script)) {
    run.fallback_reason = fmt::format("{} is missing", script.string());
    return run;
  }

  // What the capture would run cold, as the process inside the environment sees it (no rootfs
  // wrapper): its argv, complete environment and working directory.
  Environment inner = env;
  inner.rootfs.clear();
  const auto child = inner.python(fs::absolute(job.script), job.args, {}, job.extra_env, job.timeout);
  // The worker gets the same environment except for the private directories.
  auto worker_extra = job.extra_env;
  for (const char* k : kPrivateKeys)
    if (worker_extra.count(k)) worker_extra[k] = fmt::format("{}/{}", kPlaceholderRoot, k);
  const auto worker_inner = inner.python(script, {}, {}, worker_extra, std::chrono::milliseconds(0));
  json base_env = json::object(), worker_base = json::object();
  for (const auto& [k, v] : child.env)
    if (!is_private_key(k)) base_env[k] = v;
  for (const auto& [k, v] : worker_inner.env)
    if (!is_private_key(k)) worker_base[k] = v;
  if (base_env != worker_base) {
    run.fallback_reason = fmt::format("the worker's environment would differ from the capture's ({} vs {})",
                                      worker_base.dump(), base_env.dump());
    return run;
  }
  // The interpreter's identity beyond its path: the cache entry's build, else the executable.
  std::string stamp = env.manifest.is_object() ? env.manifest.value("built_at", std::string()) : std::string();
  if (stamp.empty()) {
    const fs::path exe = env.rootfs.empty() ? env.python_exe : env.rootfs / env.python_exe.relative_path();
    const auto resolved = fs::canonical(exe, ec);
    if (!ec) {
      const auto mtime = fs::last_write_time(resolved, ec);
      stamp =
          fmt::format("{} {}", resolved.string(), ec ? 0 : static_cast<long long>(mtime.time_since_epoch().count()));
    }
  }
  const json key_material = {{"protocol", kProtocol},
                             {"worker_py", request_hash(read_file(script))},
                             {"env_id", env.id},
                             {"provider", env.provider},
                             {"python", env.python_exe.string()},
                             {"rootfs", env.rootfs.string()},
                             {"python_path", json(env.python_path).dump()},
                             {"stamp", stamp},
                             {"env", base_env},
                             {"dir", dir.string()},
                             {"pollute_for_test", settings.pollute_for_test}};
  const Paths paths{dir, request_hash(key_material)};
  const bool mount_ns = !env.rootfs.empty();
  // Its TMPDIR is real (torch derives import-time values from tempfile.gettempdir(), e.g.
  // TORCHINDUCTOR_CACHE_DIR; with a missing TMPDIR they would name /tmp, which no rewrite could
  // tell apart from a real /tmp path); the child rewrites them to its own.
  const fs::path worker_tmp = paths.tmp();  // created under the start lock (get_worker)
  if (worker_extra.count("TMPDIR")) worker_extra["TMPDIR"] = worker_tmp.string();

  int idle = static_cast<int>(settings.idle.count());
  if (const char* v = std::getenv("OPENSCI_WORKER_IDLE_SECONDS"); v && *v) idle = std::max(1, std::atoi(v));
  std::vector<std::string> worker_args = {"--socket", paths.sock().string(), "--lock", paths.lock().string(),
                                          "--info",   paths.info().string(), "--key",  paths.key,
                                          "--idle",   std::to_string(idle)};
  if (mount_ns) worker_args.push_back("--mount-ns");
  if (!settings.pollute_for_test.empty())
    worker_args.insert(worker_args.end(), {"--pollute-for-test", settings.pollute_for_test, "--script-dir",
                                           job.script.parent_path().string()});
  std::vector<fs::path> worker_dirs = {script.parent_path(), dir};
  if (!settings.pollute_for_test.empty()) worker_dirs.push_back(fs::absolute(job.script).parent_path());
  auto worker_spec = env.python(script, worker_args, worker_dirs, worker_extra, std::chrono::milliseconds(0));
  worker_spec.cwd = dir;  // its HOME does not exist
  worker_spec.stdout_path = paths.log();
  worker_spec.stderr_path = paths.log();

  // The capture's descriptors: its output files, and for a rootfs the directories it must see.
  std::vector<Fd> owned;
  std::vector<int> fds;
  for (const auto& p : {job.stdout_path, job.stderr_path}) {
    if (p.has_parent_path()) fs::create_directories(p.parent_path(), ec);
    Fd fd(::open(p.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (!fd) {
      run.fallback_reason = fmt::format("cannot open {}: {}", p.string(), errno_text(errno));
      return run;
    }
    fds.push_back(fd.get());
    owned.push_back(std::move(fd));
  }
  json mounts = json::array();
  if (mount_ns) {
    std::vector<fs::path> visible = job.host_dirs;
    visible.push_back(fs::absolute(job.script).parent_path());
    for (const char* k : kPrivateKeys)
      if (const auto it = job.extra_env.find(k); it != job.extra_env.end()) visible.emplace_back(it->second);
    for (const auto& p : env.python_path) visible.push_back(p);
    for (const auto& target : mount_targets(visible)) {
      const long fd = ::syscall(SYS_open_tree, AT_FDCWD, target.c_str(),
                                static_cast<unsigned>(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE));
      if (fd < 0) {
        run.fallback_reason = fmt::format("open_tree({}) failed: {} (needs Linux >= 5.2 and CAP_SYS_ADMIN)",
                                          target.string(), errno_text(errno));
        return run;
      }
      fds.push_back(static_cast<int>(fd));
      owned.emplace_back(static_cast<int>(fd));
      mounts.push_back(target.string());
    }
  }

  std::string why;
  const auto deadline = t0 + settings.start_timeout;
  Connection conn = get_worker(paths, worker_spec, deadline, why);
  if (!conn.sock) {
    run.fallback_reason = why;
    return run;
  }
  if (!conn.hello.value("usable", false)) {
    run.fallback_reason = "the worker cannot serve this environment: " + conn.hello.value("unusable_reason", "");
    return run;
  }
  const json request = {{"op", "capture"},
                        {"argv", std::vector<std::string>(child.argv.begin() + 1, child.argv.end())},
                        {"env", child.env},
                        {"cwd", child.cwd.string()},
                        {"mounts", mounts}};
  const auto t_send = Clock::now();
  try {
    send_message(conn.sock.get(), request, fds);
  } catch (const Error& e) {
    run.fallback_reason = e.what();
    return run;
  }
  owned.clear();  // the worker has its own copies now
  Reader reader(conn.sock.get());
  json started;
  const auto got = reader.next(started, std::chrono::seconds(60));
  if (got != Reader::Got::Message || started.value("event", "") != "started") {
    run.fallback_reason =
        got == Reader::Got::Message
            ? fmt::format("the worker did not start the capture: {}",
                          started.value("reason", started.dump().substr(0, 300)))
            : fmt::format("the worker {} before starting the capture",
                          got == Reader::Got::Closed ? "closed the connection" : "did not answer within 60 s");
    return run;
  }
  run.used = true;
  const int pgid = started.value("pgid", 0);
  const ForwardedGroup forwarded(pgid);
  ProcessResult& proc = run.proc;
  proc.started = true;

  const bool has_timeout = job.timeout.count() > 0;
  const auto kill_at = t_send + job.timeout;
  // Time points with a flag, not std::optional: GCC's -Wmaybe-uninitialized misfires on an
  // optional time_point at -O1 (the tooling's level, CMakeLists.txt).
  Clock::time_point sigkill_at{}, give_up_at{};
  bool sigkill_pending = false, giving_up = false;
  json exited;
  for (;;) {
    auto wait = std::chrono::milliseconds(1000);
    const auto now = Clock::now();
    if (has_timeout && !proc.timed_out) {
      if (now >= kill_at) {
        proc.timed_out = true;
        try {
          send_message(conn.sock.get(), {{"op", "kill"}, {"signal", SIGTERM}}, {});
        } catch (const Error&) {  // the worker is gone: the Closed branch below handles it
        }
        sigkill_at = now + job.kill_grace;
        sigkill_pending = true;
        continue;
      }
      wait = std::min(
          wait, std::chrono::duration_cast<std::chrono::milliseconds>(kill_at - now) + std::chrono::milliseconds(1));
    }
    if (sigkill_pending) {
      if (now >= sigkill_at) {
        try {
          send_message(conn.sock.get(), {{"op", "kill"}, {"signal", SIGKILL}}, {});
        } catch (const Error&) {
        }
        sigkill_pending = false;
        give_up_at = now + std::chrono::seconds(5);
        giving_up = true;
        continue;
      }
      wait = std::min(wait, std::chrono::duration_cast<std::chrono::milliseconds>(sigkill_at - now) +
                                std::chrono::milliseconds(1));
    }
    if (giving_up && now >= give_up_at) {
      run.worker_lost = true;
      run.detail = fmt::format("the capture worker (pid {}) did not report the end of the killed capture",
                               conn.hello.value("pid", 0));
      break;
    }
    json msg;
    const auto r = reader.next(msg, wait);
    if (r == Reader::Got::Closed) {
      run.worker_lost = true;
      run.detail = fmt::format("the capture worker (pid {}) died mid-capture (connection closed after {:.2f} s)",
                               conn.hello.value("pid", 0), seconds_since(t_send));
      break;
    }
    if (r == Reader::Got::Message && msg.value("event", "") == "exited") {
      exited = msg;
      break;
    }
  }
  if (run.worker_lost && pgid > 0) {
    // The child died with the worker (PR_SET_PDEATHSIG); whatever else is left of its group goes
    // now. Members exist, so the group id is still the capture's.
    if (!live_group_members(pgid).empty()) {
      ::kill(-pgid, SIGKILL);
      const auto end = Clock::now() + std::chrono::seconds(2);
      while (!live_group_members(pgid).empty() && Clock::now() < end)
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    proc.signal = SIGKILL;
  }
  if (!exited.is_null()) {
    if (exited.contains("signal")) proc.signal = exited.value("signal", 0);
    if (exited.contains("exit_code")) proc.exit_code = exited.value("exit_code", -1);
    if (!proc.timed_out) proc.strays_killed = exited.value("strays_killed", 0);
    const auto& clean = exited.contains("clean_start") ? exited["clean_start"] : json();
    if (!clean.is_object() && proc.exit_code == 125 && !proc.timed_out) {
      run.setup_failed = true;
      run.detail = fmt::format(
          "the capture worker's child (pid {}) could not set the capture up (exit 125 before "
          "the script ran); its stderr ends: {}",
          pgid, file_tail(job.stderr_path, 600));
    } else if (clean.is_object() && !clean.value("clean", true)) {
      run.unclean = true;
      run.detail = fmt::format(
          "the capture worker (pid {}) handed over a state that is not its pristine one; the "
          "capture refused to run: {}",
          conn.hello.value("pid", 0), clean.dump());
    }
  }
  proc.wall_seconds = seconds_since(t_send);
  proc.stderr_tail = file_tail(job.stderr_path);
  run.record = {
      {"mode", "worker"},
      {"worker_pid", conn.hello.value("pid", 0)},
      {"worker_started_at", conn.hello.value("started_at", "")},
      {"worker_started_by_this_capture", conn.started_here},
      {"worker_key", paths.key},
      {"worker_socket", paths.sock().string()},
      {"worker_log", paths.log().string()},
      {"worker_import_seconds", conn.hello.value("import_seconds", 0.0)},
      {"captures_served", started.value("captures_served", 0)},
      {"get_worker_seconds", conn.ready_seconds},
      {"fork_to_exit_seconds", exited.is_null() ? json() : exited["fork_to_exit_seconds"]},
      {"child_cpu_seconds", exited.is_null() ? json() : exited.value("child_cpu_seconds", json())},
      {"worker_cpu_seconds", exited.is_null() ? json() : exited.value("worker_cpu_seconds", json())},
      {"child_pid", pgid},
      {"mounts", mounts},
      {"clean_start", exited.is_null() ? json() : exited["clean_start"]},
      {"modules_cache",
       exited.is_null() ? json() : exited.value("child_report", json::object()).value("modules_cache", json())}};
  if (run.worker_lost) run.record["worker_lost"] = run.detail;
  return run;
}

std::vector<WorkerInfo> list_workers(const fs::path& dir) {
  std::vector<WorkerInfo> out;
  std::error_code ec;
  std::set<std::string> keys;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const auto ext = e.path().extension().string();
    if (ext == ".sock" || (ext == ".json" && e.path().stem().extension().empty()))
      keys.insert(e.path().stem().string());
  }
  for (const auto& key : keys) {
    const Paths paths{dir, key};
    WorkerInfo w;
    w.key = key;
    w.socket = paths.sock();
    try {
      std::ifstream in(paths.info());
      if (in) w.status = json::parse(in);
    } catch (const json::exception&) {
    }
    w.pid = w.status.is_object() ? w.status.value("pid", 0) : 0;
    std::string error;
    int err = 0;
    w.state = "dead";
    if (Fd sock = connect_unix(paths.sock(), error, err)) {
      std::string why;
      if (auto hello = read_hello(sock, key, why)) {
        w.state = "ready";
        w.status = *hello;
        w.pid = hello->value("pid", 0);
      } else {
        w.state = "unresponsive";
      }
    } else if (process_alive(w.pid)) {
      w.state = "unresponsive";
    }
    out.push_back(std::move(w));
  }
  return out;
}

std::vector<std::string> stop_workers(const fs::path& dir) {
  std::vector<std::string> lines;
  for (const auto& w : list_workers(dir)) {
    const Paths paths{dir, w.key};
    std::string line = fmt::format("worker {} (pid {}, {}): ", w.key, w.pid, w.state);
    bool asked = false;
    if (w.state == "ready") {
      std::string error;
      int err = 0;
      if (Fd sock = connect_unix(paths.sock(), error, err)) {
        std::string why;
        if (read_hello(sock, w.key, why)) {
          try {
            send_message(sock.get(), {{"op", "stop"}}, {});
            Reader reader(sock.get());
            json reply;
            asked = reader.next(reply, std::chrono::seconds(5)) == Reader::Got::Message;
          } catch (const Error&) {
          }
        }
      }
    }
    // A pid from an info file is only signalled when it still is this worker.
    const bool ours = w.pid > 0 && cmdline_of(w.pid).find("worker.py") != std::string::npos &&
                      cmdline_of(w.pid).find(w.key) != std::string::npos;
    auto wait_gone = [&](std::chrono::milliseconds d) {
      const auto end = Clock::now() + d;
      while (process_alive(w.pid) && Clock::now() < end) std::this_thread::sleep_for(std::chrono::milliseconds(20));
      return !process_alive(w.pid);
    };
    if (!ours) {
      line += asked ? "stopped" : "not running";
    } else if (wait_gone(asked ? std::chrono::seconds(10) : std::chrono::milliseconds(0))) {
      line += "stopped";
    } else {
      ::kill(w.pid, SIGTERM);
      if (wait_gone(std::chrono::seconds(5))) {
        line += "stopped (SIGTERM)";
      } else {
        ::kill(w.pid, SIGKILL);
        line += wait_gone(std::chrono::seconds(5)) ? "killed (SIGKILL)" : "still alive after SIGKILL";
      }
    }
    std::error_code ec;
    if (!process_alive(w.pid)) {
      // A worker that died without cleaning up leaves its socket and info file.
      std::string error;
      int err = 0;
      if (!connect_unix(paths.sock(), error, err)) fs::remove(paths.sock(), ec);
      fs::remove(paths.info(), ec);
    }
    lines.push_back(line);
  }
  return lines;
}

}  // namespace opensci::harness
