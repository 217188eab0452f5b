// Environments: the Environment run model, version discovery, the cache machinery shared by
// all cached providers (lock, .partial dir, READY manifest), spec expansion and the factory.
#include "opensci/harness/environment.hpp"

#include <fcntl.h>
#include <fmt/core.h>
#include <fmt/format.h>
#include <pwd.h>
#include <stdlib.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <regex>
#include <cerrno>
#include <ctime>
#include <fstream>
#include <set>
#include <sstream>
#include <system_error>
#include <thread>

#include "opensci/error.hpp"
#include "providers/providers.hpp"

namespace opensci::harness {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

std::string errno_text(int err) { return std::error_code(err, std::generic_category()).message(); }

std::string env_or(const char* name, const std::string& fallback = {}) {
  const char* v = std::getenv(name);
  return v && *v ? std::string(v) : fallback;
}

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

void fsync_path(const fs::path& p, bool directory) {
  const int fd = ::open(p.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

// Writes `text` to `path` atomically: path.tmp, fsync, rename.
void write_file_atomic(const fs::path& path, const std::string& text) {
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail("cannot write {}: {}", tmp.string(), errno_text(errno));
    out << text;
    out.flush();
    if (!out) fail("cannot write {}: {}", tmp.string(), errno_text(errno));
  }
  fsync_path(tmp, false);
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) fail("cannot rename {} to {}: {}", tmp.string(), path.string(), ec.message());
  fsync_path(path.parent_path(), true);
}

// An exclusive flock on <name>.lock held for the lifetime of the object.
class FileLock {
 public:
  FileLock(const fs::path& path, const std::string& what, Progress& progress) : path_(path) {
    do fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    while (fd_ < 0 && errno == EINTR);
    if (fd_ < 0) fail("cannot open lock file {}: {}", path.string(), errno_text(errno));
    const auto t0 = Clock::now();
    auto next_note = t0;
    for (;;) {
      if (::flock(fd_, LOCK_EX | LOCK_NB) == 0) break;
      const int err = errno;
      if (err == EINTR) continue;
      if (err != EWOULDBLOCK) {
        ::close(fd_);
        fail("cannot lock {}: {}", path.string(), errno_text(err));
      }
      if (Clock::now() >= next_note) {
        std::string holder;
        std::ifstream in(path);
        std::getline(in, holder);
        progress.note(
            fmt::format("waiting for {} (lock {} held by {} or the build processes it started; waited {:.0f} s)", what,
                        path.string(), holder.empty() ? "another process" : "pid " + holder,
                        std::chrono::duration<double>(Clock::now() - t0).count()));
        next_note = Clock::now() + std::chrono::seconds(30);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    const std::string pid = std::to_string(::getpid()) + "\n";
    if (::ftruncate(fd_, 0) == 0) {
      [[maybe_unused]] const auto n = ::pwrite(fd_, pid.data(), pid.size(), 0);
    }
  }
  ~FileLock() {
    if (fd_ >= 0) ::close(fd_);
  }
  int fd() const { return fd_; }
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;

 private:
  fs::path path_;
  int fd_ = -1;
};

// True when someone holds the lock right now.
bool lock_is_held(const fs::path& path, std::string& holder) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return false;
  const bool held = ::flock(fd, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK;
  ::close(fd);
  if (held) {
    std::ifstream in(path);
    std::getline(in, holder);
  }
  return held;
}

std::string unescape_mountinfo(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    auto octal = [&](size_t k) { return k < s.size() && s[k] >= '0' && s[k] <= '7'; };
    if (s[i] == '\\' && octal(i + 1) && octal(i + 2) && octal(i + 3)) {
      out += static_cast<char>(std::stoi(s.substr(i + 1, 3), nullptr, 8));
      i += 3;
    } else {
      out += s[i];
    }
  }
  return out;
}

void remove_tree_checked(const fs::path& p, const std::string& what, Progress& progress) {
  std::error_code ec;
  if (!fs::exists(fs::symlink_status(p, ec))) return;
  const auto mounts = mounts_under(p);
  if (!mounts.empty()) {
    std::vector<std::string> names;
    for (const auto& m : mounts) names.push_back(m.string());
    fail("refusing to remove {} {}: /proc/self/mountinfo shows {} mounted below it ({}); unmount first", what,
         p.string(), names.size(), fmt::join(names, ", "));
  }
  progress.note(fmt::format("removing {} {}", what, p.string()));
  fs::remove_all(p, ec);
  if (ec) fail("cannot remove {} {}: {}", what, p.string(), ec.message());
}

const char* kDiscoveryScript = R"PY(
import importlib, json, re, sys
out = {"python": sys.version.split()[0], "executable": sys.executable, "modules": {}}
for name in ("torch", "transformers"):
    info = {}
    try:
        m = importlib.import_module(name)
        info["version"] = str(getattr(m, "__version__", ""))
        info["path"] = str(getattr(m, "__file__", "") or "")
    except BaseException as e:
        info["error"] = "%s: %s" % (type(e).__name__, e)
        try:
            import importlib.util
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.origin:
                info["path"] = spec.origin
                src = open(spec.origin, encoding="utf-8").read()
                v = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', src, re.M)
                if v:
                    info["source_version"] = v.group(1)
        except BaseException:
            pass
    out["modules"][name] = info
print("OPENSCI_DISCOVERY " + json.dumps(out))
)PY";

}  // namespace

namespace {
thread_local int t_build_lock_fd = -1;
}
int current_build_lock_fd() { return t_build_lock_fd; }

// ---------------------------------------------------------------- Progress

Progress::Progress(std::string label, std::FILE* out) : label_(std::move(label)), out_(out), start_(Clock::now()) {}

double Progress::elapsed() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }

void Progress::stage(const std::string& name, const std::string& detail) {
  stages_.push_back({name, Clock::now()});
  if (!out_) return;
  fmt::print(out_, "[{}] +{:.1f}s stage {}: {}{}\n", label_, elapsed(), stages_.size(), name,
             detail.empty() ? "" : " — " + detail);
  std::fflush(out_);
}

void Progress::note(const std::string& text) {
  if (!out_) return;
  fmt::print(out_, "[{}] +{:.1f}s {}\n", label_, elapsed(), text);
  std::fflush(out_);
}

std::function<void(double)> Progress::heartbeat() {
  return [this](double seconds) {
    const std::string name = stages_.empty() ? std::string("step") : stages_.back().name;
    note(fmt::format("  ... {} still running ({:.0f} s)", name, seconds));
  };
}

nlohmann::json Progress::stages() const {
  nlohmann::json out = nlohmann::json::array();
  for (size_t i = 0; i < stages_.size(); ++i) {
    const auto end = i + 1 < stages_.size() ? stages_[i + 1].begin : Clock::now();
    out.push_back({{"name", stages_[i].name},
                   {"seconds", std::round(std::chrono::duration<double>(end - stages_[i].begin).count() * 10) / 10}});
  }
  return out;
}

// ---------------------------------------------------------------- Environment

std::map<std::string, std::string> private_run_env(const fs::path& run_dir) {
  const fs::path dir = fs::absolute(run_dir);
  std::map<std::string, std::string> env{{"HOME", (dir / "home").string()},
                                         {"TMPDIR", (dir / "tmp").string()},
                                         {"HF_HOME", (dir / "hf").string()},
                                         {"HF_MODULES_CACHE", (dir / "hf" / "modules").string()},
                                         {"XDG_CACHE_HOME", (dir / "cache").string()}};
  for (const auto& [key, value] : env) {
    std::error_code ec;
    fs::create_directories(value, ec);
    if (ec) fail("private_run_env: cannot create {} ({}): {}", value, key, ec.message());
  }
  return env;
}

ProcessSpec Environment::python(const fs::path& script, std::vector<std::string> args,
                                const std::vector<fs::path>& host_dirs,
                                const std::map<std::string, std::string>& extra_env,
                                std::chrono::milliseconds timeout) const {
  args.insert(args.begin(), script.string());
  return python_args(std::move(args), host_dirs, extra_env, timeout);
}

ProcessSpec Environment::python_args(std::vector<std::string> args, const std::vector<fs::path>& host_dirs,
                                     const std::map<std::string, std::string>& extra_env,
                                     std::chrono::milliseconds timeout) const {
  args.insert(args.begin(), python_exe.string());
  return command(std::move(args), host_dirs, extra_env, timeout);
}

ProcessSpec Environment::command(std::vector<std::string> argv, const std::vector<fs::path>& host_dirs,
                                 const std::map<std::string, std::string>& extra_env,
                                 std::chrono::milliseconds timeout) const {
  if (argv.empty()) fail("Environment::command ({}): empty argv", id);
  for (const char* key : {"HOME", "TMPDIR", "HF_HOME"}) {
    if (!extra_env.count(key))
      fail(
          "Environment::command ({}): extra_env must set {} to a private per-run directory (see private_run_env()); "
          "found keys: {}",
          id, key, [&] {
            std::vector<std::string> keys;
            for (const auto& kv : extra_env) keys.push_back(kv.first);
            return keys.empty() ? std::string("none") : fmt::format("{}", fmt::join(keys, ", "));
          }());
  }
  std::map<std::string, std::string> env{{"LANG", "C.UTF-8"},
                                         {"PATH", path_var.empty() ? "/usr/local/bin:/usr/bin:/bin" : path_var},
                                         {"HF_HUB_OFFLINE", "1"},
                                         {"TRANSFORMERS_OFFLINE", "1"},
                                         {"PYTHONDONTWRITEBYTECODE", "1"},
                                         {"PYTHONNOUSERSITE", "1"}};
  if (!python_path.empty()) {
    std::vector<std::string> parts;
    for (const auto& p : python_path) parts.push_back(p.string());
    env["PYTHONPATH"] = fmt::format("{}", fmt::join(parts, ":"));
  }
  for (const auto& [key, value] : extra_env) {
    if (key == "PYTHONPATH" && env.count(key))
      env[key] += ":" + value;
    else
      env[key] = value;
  }

  std::vector<fs::path> dirs = host_dirs;
  for (const char* key : {"HOME", "TMPDIR", "HF_HOME", "HF_MODULES_CACHE", "XDG_CACHE_HOME"}) {
    const auto it = extra_env.find(key);
    if (it == extra_env.end()) continue;
    const fs::path p(it->second);
    std::error_code ec;
    if (p.is_absolute() && fs::is_directory(p, ec)) dirs.push_back(p);
  }
  ProcessSpec spec;
  if (rootfs.empty()) {
    spec.argv = std::move(argv);
    spec.env = std::move(env);
  } else {
    for (const auto& p : python_path) dirs.push_back(p);
    for (const auto& p : mounts) dirs.push_back(p);
    spec = detail::rootfs_spec(rootfs, argv, env, dirs, rootfs.parent_path() / "run");
  }
  spec.cwd = extra_env.at("HOME");
  spec.timeout = timeout;
  return spec;
}

std::string Environment::summary() const {
  auto v = [&](const std::string& name, const std::string& version) {
    if (!version.empty()) return fmt::format("{} {}", name, version);
    const auto it = import_errors.find(name);
    return fmt::format("{} absent{}", name, it == import_errors.end() ? "" : " (" + it->second + ")");
  };
  return fmt::format("{} [{}]: python {}, {}, {}", id, provider, python_version.empty() ? "?" : python_version,
                     v("torch", torch_version), v("transformers", transformers_version));
}

void discover_versions(Environment& env, std::chrono::milliseconds timeout) {
  char templ[] = "opensci-discover-XXXXXX";
  const fs::path base = fs::temp_directory_path();
  std::string path_templ = (base / templ).string();
  if (!::mkdtemp(path_templ.data()))
    fail("discover_versions: mkdtemp under {} failed: {}", base.string(), errno_text(errno));
  const fs::path scratch(path_templ);
  struct Cleanup {
    fs::path p;
    ~Cleanup() {
      std::error_code ec;
      fs::remove_all(p, ec);
    }
  } cleanup{scratch};

  auto spec = env.python_args({"-c", kDiscoveryScript}, {}, private_run_env(scratch), timeout);
  spec.stdout_path = scratch / "stdout.txt";
  spec.stderr_path = scratch / "stderr.txt";
  const auto result = run_process(spec);
  std::ifstream in(spec.stdout_path);
  std::string line, payload;
  while (std::getline(in, line))
    if (line.rfind("OPENSCI_DISCOVERY ", 0) == 0) payload = line.substr(18);
  if (!result.ok() || payload.empty())
    fail(
        "discovering versions of {} ({}): python {} {}; expected a line 'OPENSCI_DISCOVERY {{...}}' on stdout; "
        "stderr tail:\n{}",
        env.id, env.provider, env.python_exe.string(), result.describe(), result.stderr_tail);
  const auto j = nlohmann::json::parse(payload);
  env.python_version = j.value("python", "");
  env.import_errors.clear();
  env.module_files.clear();
  for (const char* name : {"torch", "transformers"}) {
    const auto& m = j.at("modules").at(name);
    std::string version = m.value("version", "");
    if (m.contains("error")) env.import_errors[name] = m.at("error").get<std::string>();
    if (!m.value("path", std::string()).empty()) env.module_files[name] = m.at("path").get<std::string>();
    if (std::string(name) == "torch")
      env.torch_version = version;
    else
      env.transformers_version = version;
  }
}

namespace detail {

nlohmann::json versions_json(const Environment& env) {
  return {{"python", env.python_version},
          {"torch", env.torch_version},
          {"transformers", env.transformers_version},
          {"import_errors", env.import_errors},
          {"files", env.module_files}};
}

void apply_versions(Environment& env, const nlohmann::json& manifest) {
  if (!manifest.contains("versions")) return;
  const auto& v = manifest.at("versions");
  env.python_version = v.value("python", "");
  env.torch_version = v.value("torch", "");
  env.transformers_version = v.value("transformers", "");
  if (v.contains("import_errors")) env.import_errors = v.at("import_errors").get<std::map<std::string, std::string>>();
  if (v.contains("files")) env.module_files = v.at("files").get<std::map<std::string, std::string>>();
  env.torch_source = manifest.value("torch_source", env.torch_source);
}

}  // namespace detail

// ---------------------------------------------------------------- versions and installer failures

bool transformers_version_matches(const std::string& declared, const std::string& resolved) {
  if (declared.empty() || resolved.empty()) return false;
  if (declared == resolved) return true;
  auto split = [](const std::string& v) {
    std::vector<std::string> parts;
    std::stringstream ss(v);
    std::string piece;
    while (std::getline(ss, piece, '.')) parts.push_back(piece);
    return parts;
  };
  const auto d = split(declared), r = split(resolved);
  if (r.size() <= d.size()) return false;
  for (size_t i = 0; i < d.size(); ++i)
    if (d[i] != r[i]) return false;
  // the rest must be plain release components: "5.24" is not "5.24.0rc1" nor "5.24.0.dev0"
  for (size_t i = d.size(); i < r.size(); ++i)
    if (r[i].empty() || !std::all_of(r[i].begin(), r[i].end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); }))
      return false;
  return true;
}

std::optional<InstallerFailure> parse_installer_failure(const std::string& log) {
  // A distribution name as uv and pip print it (PEP 508 name, before any version specifier).
  static const std::string name = R"(([A-Za-z0-9][A-Za-z0-9._-]*[A-Za-z0-9]|[A-Za-z0-9]))";
  struct Pattern {
    std::regex re;
    int group;
  };
  static const std::vector<Pattern> patterns = {
      // uv
      {std::regex("there is no version of " + name), 1},
      {std::regex("Because " + name + R"([=<>!~][^ ]* has no wheels)"), 1},
      {std::regex("Because (?:only )?" + name + R"([=<>!~])"), 1},
      {std::regex("Failed to (?:download and )?build `" + name), 1},
      {std::regex("Failed to (?:download|fetch)[^`]*`" + name), 1},
      // pip
      {std::regex("No matching distribution found for " + name), 1},
      {std::regex("Could not find a version that satisfies the requirement " + name), 1},
      {std::regex("Cannot install " + name), 1},
      {std::regex("Failed building wheel for " + name), 1},
      {std::regex("Failed to build " + name), 1},
  };
  // The failure text: uv's "error:" block (with its cause/hint lines), pip's ERROR lines.
  std::vector<std::string> lines;
  {
    std::stringstream ss(log);
    std::string line;
    while (std::getline(ss, line)) lines.push_back(line);
  }
  std::string message;
  bool in_block = false;
  for (const auto& line : lines) {
    const bool starts = line.rfind("error:", 0) == 0 || line.rfind("ERROR:", 0) == 0 || line.rfind("  × ", 0) == 0 ||
                        line.rfind("× ", 0) == 0;
    if (starts) in_block = true;
    if (!in_block) continue;
    if (!message.empty()) message += "\n";
    message += line;
  }
  while (!message.empty() && (message.back() == '\n' || message.back() == ' ')) message.pop_back();
  if (message.empty()) return std::nullopt;
  if (message.size() > 4000) message = message.substr(0, 4000) + "\n[...]";
  InstallerFailure f;
  f.message = message;
  size_t best = std::string::npos;
  for (const auto& p : patterns) {
    std::smatch m;
    if (std::regex_search(message, m, p.re) && static_cast<size_t>(m.position(0)) < best) {
      best = static_cast<size_t>(m.position(0));
      f.package = m[p.group].str();
    }
  }
  return f;
}

// ---------------------------------------------------------------- cache machinery

std::string request_hash(const nlohmann::json& request) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : request.dump()) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  return fmt::format("{:016x}", h);
}

fs::path default_cache_root() {
  if (const auto dir = env_or("OPENSCI_CACHE_DIR"); !dir.empty()) return fs::absolute(dir);
  if (const auto xdg = env_or("XDG_CACHE_HOME"); !xdg.empty()) return fs::absolute(fs::path(xdg) / "opensci-compat");
  std::string home = env_or("HOME");
  if (home.empty()) {
    if (const passwd* pw = ::getpwuid(::getuid()); pw && pw->pw_dir) home = pw->pw_dir;
  }
  if (home.empty()) fail("cannot determine the cache dir: none of OPENSCI_CACHE_DIR, XDG_CACHE_HOME, HOME is set");
  return fs::path(home) / ".cache" / "opensci-compat";
}

std::optional<nlohmann::json> read_ready_manifest(const fs::path& dir) {
  std::ifstream in(dir / "READY");
  if (!in) return std::nullopt;
  try {
    auto j = nlohmann::json::parse(in);
    if (!j.is_object()) return std::nullopt;
    return j;
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

std::vector<fs::path> mounts_under(const fs::path& dir) {
  std::error_code ec;
  fs::path target = fs::weakly_canonical(fs::absolute(dir), ec);
  if (ec) target = fs::absolute(dir).lexically_normal();
  std::string prefix = target.string();
  while (prefix.size() > 1 && prefix.back() == '/') prefix.pop_back();
  std::vector<fs::path> found;
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string id, parent, devno, root, mount_point;
    if (!(fields >> id >> parent >> devno >> root >> mount_point)) continue;
    const std::string mp = unescape_mountinfo(mount_point);
    if (mp == prefix ||
        (mp.size() > prefix.size() && mp.compare(0, prefix.size(), prefix) == 0 && mp[prefix.size()] == '/'))
      found.emplace_back(mp);
  }
  return found;
}

CacheEntry ensure_cache_entry(const fs::path& envs_dir, const std::string& name, const nlohmann::json& request,
                              Progress& progress,
                              const std::function<nlohmann::json(const fs::path&, Progress&)>& build) {
  const fs::path final_dir = envs_dir / name;
  if (auto manifest = read_ready_manifest(final_dir)) return {final_dir, *manifest, false};

  std::error_code ec;
  fs::create_directories(envs_dir, ec);
  if (ec) fail("cannot create the environment cache dir {}: {}", envs_dir.string(), ec.message());
  FileLock lock(envs_dir / (name + ".lock"), "another provisioning of " + name, progress);
  if (auto manifest = read_ready_manifest(final_dir)) {
    progress.note(fmt::format("{} was provisioned by another process meanwhile", name));
    return {final_dir, *manifest, false};
  }
  remove_tree_checked(final_dir, "incomplete cache entry (no READY manifest)", progress);
  const fs::path partial = envs_dir / (name + ".partial");
  remove_tree_checked(partial, "leftover partial build (from a killed or failed provisioning)", progress);
  fs::create_directories(partial / "logs", ec);
  if (ec) fail("cannot create {}: {}", (partial / "logs").string(), ec.message());

  const auto t0 = Clock::now();
  nlohmann::json fields;
  struct LockForSteps {
    explicit LockForSteps(int fd) : saved(t_build_lock_fd) { t_build_lock_fd = fd; }
    ~LockForSteps() { t_build_lock_fd = saved; }
    int saved;
  };
  const fs::path failed_logs = envs_dir / (name + ".failed-logs");
  auto keep_logs = [&] {
    std::error_code ignore;
    fs::remove_all(failed_logs, ignore);
    fs::rename(partial / "logs", failed_logs, ignore);
    if (mounts_under(partial).empty()) fs::remove_all(partial, ignore);
  };
  try {
    const LockForSteps steps_hold_lock(lock.fd());
    fields = build(partial, progress);
  } catch (const ProvisionError& e) {
    keep_logs();
    throw ProvisionError(
        fmt::format("provisioning {} failed: {} (build logs kept in {})", name, e.what(), failed_logs.string()),
        e.status, e.package, e.resolver_message);
  } catch (const std::exception& e) {
    keep_logs();
    throw Error(
        fmt::format("provisioning {} failed: {} (build logs kept in {})", name, e.what(), failed_logs.string()));
  }
  {  // a successful build leaves no stale failure logs behind
    std::error_code ignore;
    fs::remove_all(failed_logs, ignore);
  }
  nlohmann::json manifest = {
      {"schema", 1},
      {"name", name},
      {"provider", request.value("provider", "")},
      {"request", request},
      {"request_hash", request_hash(request)},
      {"built_at", utc_now()},
      {"build_seconds", std::round(std::chrono::duration<double>(Clock::now() - t0).count() * 10) / 10},
      {"stages", progress.stages()}};
  if (fields.is_object()) manifest.update(fields);
  write_file_atomic(partial / "READY", manifest.dump(2) + "\n");
  fs::rename(partial, final_dir, ec);
  if (ec) fail("cannot publish {} as {}: {}", partial.string(), final_dir.string(), ec.message());
  fsync_path(envs_dir, true);
  return {final_dir, manifest, true};
}

std::vector<CachedEnvironmentInfo> list_cached_environments(const fs::path& cache_root) {
  std::vector<CachedEnvironmentInfo> out;
  const fs::path envs = cache_root / "envs";
  std::error_code ec;
  if (!fs::is_directory(envs, ec)) return out;
  std::set<std::string> ready;
  std::vector<fs::directory_entry> entries;
  for (const auto& entry : fs::directory_iterator(envs, ec)) entries.push_back(entry);
  std::sort(entries.begin(), entries.end(), [](const auto& a, const auto& b) { return a.path() < b.path(); });
  auto ends_with = [](const std::string& s, const std::string& suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  for (const auto& entry : entries) {
    const std::string file = entry.path().filename().string();
    if (!entry.is_directory(ec)) continue;
    CachedEnvironmentInfo info;
    info.dir = entry.path();
    if (ends_with(file, ".partial")) {
      info.name = file.substr(0, file.size() - 8);
      std::string holder;
      if (lock_is_held(envs / (info.name + ".lock"), holder)) {
        info.state = "building";
        info.detail = fmt::format("being built now (lock held by pid {})", holder.empty() ? "?" : holder);
      } else {
        info.state = "stale-partial";
        info.detail = "leftover of a killed build; removed by the next provisioning";
      }
    } else if (ends_with(file, ".failed-logs")) {
      info.name = file.substr(0, file.size() - 12);
      info.state = "failed";
      info.detail = "logs of the last failed build: " + entry.path().string();
    } else {
      info.name = file;
      info.manifest = read_ready_manifest(entry.path());
      info.state = info.manifest ? "ready" : "incomplete";
      if (info.manifest) {
        const auto& m = *info.manifest;
        const auto built = fmt::format("built {} in {} s", m.value("built_at", "?"), m.value("build_seconds", 0.0));
        if (m.contains("versions")) {
          const auto& v = m.at("versions");
          auto show = [&](const char* key) {
            const auto s = v.value(key, std::string());
            return s.empty() ? std::string("absent") : s;
          };
          info.detail = fmt::format("{}: python {}, torch {}, transformers {}; {}", m.value("provider", "?"),
                                    v.value("python", "?"), show("torch"), show("transformers"), built);
        } else {
          // overlays: the versions come from a live source tree and are discovered at each use
          const auto& req = m.at("request");
          const std::string src = req.value("transformers_src", "");
          info.detail = fmt::format(
              "{} on {}: {}; versions discovered at each use; {}", m.value("provider", "?"), m.value("base", "?"),
              src.empty() ? "wheels " + req.value("transformers_wheels", "") : "transformers source " + src, built);
        }
      } else {
        info.detail = "no READY manifest; removed by the next provisioning";
      }
    }
    out.push_back(std::move(info));
  }
  return out;
}

// ---------------------------------------------------------------- CachedProvider

CachedProvider::CachedProvider(fs::path cache_root) : cache_root_(std::move(cache_root)) {}

std::string CachedProvider::cache_name() const { return id() + "-" + request_hash(request()); }

fs::path CachedProvider::cache_dir() const { return cache_root_ / "envs" / cache_name(); }

bool CachedProvider::is_ready() const { return read_ready_manifest(cache_dir()).has_value(); }

Environment CachedProvider::realise(Progress& progress) {
  if (!is_ready()) {
    const auto availability = probe();
    if (!availability) fail("environment {} is unavailable: {}", id(), availability.reason);
  }
  const auto entry = ensure_cache_entry(cache_root_ / "envs", cache_name(), request(), progress,
                                        [this](const fs::path& partial, Progress& p) { return build(partial, p); });
  return open(entry.dir, entry.manifest);
}

// ---------------------------------------------------------------- specs and factory

std::string expand_vars(const std::string& text, std::vector<std::string>& missing) {
  std::string out;
  size_t i = 0;
  while (i < text.size()) {
    if (text.compare(i, 2, "${") != 0) {
      out += text[i++];
      continue;
    }
    const size_t close = text.find('}', i + 2);
    if (close == std::string::npos) fail("malformed '${{' without '}}' in \"{}\"", text);
    const std::string inner = text.substr(i + 2, close - i - 2);
    const size_t dash = inner.find(":-");
    const std::string name = inner.substr(0, dash);
    const bool valid = !name.empty() && !std::isdigit(static_cast<unsigned char>(name[0])) &&
                       std::all_of(name.begin(), name.end(),
                                   [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; });
    if (!valid) fail("malformed variable '${{{}}}' in \"{}\" (expected ${{NAME}} or ${{NAME:-default}})", inner, text);
    const char* value = std::getenv(name.c_str());
    if (value && *value)
      out += value;
    else if (dash != std::string::npos)
      out += inner.substr(dash + 2);
    else
      missing.push_back(name);
    i = close + 1;
  }
  return out;
}

namespace {

// Expands every string in `j`; `missing` gets "VAR (key path)" for unset variables.
nlohmann::json expand_json(const nlohmann::json& j, const std::string& where, std::vector<std::string>& missing) {
  if (j.is_string()) {
    std::vector<std::string> names;
    auto s = expand_vars(j.get<std::string>(), names);
    for (const auto& n : names) missing.push_back(fmt::format("${{{}}} is not set (used by \"{}\")", n, where));
    return s;
  }
  if (j.is_array()) {
    nlohmann::json out = nlohmann::json::array();
    for (size_t i = 0; i < j.size(); ++i) out.push_back(expand_json(j[i], fmt::format("{}[{}]", where, i), missing));
    return out;
  }
  if (j.is_object()) {
    nlohmann::json out = nlohmann::json::object();
    for (const auto& [key, value] : j.items())
      out[key] = expand_json(value, where.empty() ? key : where + "." + key, missing);
    return out;
  }
  return j;
}

class UnavailableProvider final : public EnvironmentProvider {
 public:
  UnavailableProvider(std::string kind, nlohmann::json spec, std::string reason)
      : kind_(std::move(kind)), spec_(std::move(spec)), reason_(std::move(reason)) {}
  std::string kind() const override { return kind_; }
  std::string id() const override {
    // Best effort, from the unexpanded spec: "venv-transformers-4.57.6" or just the kind.
    const auto tf = spec_.value("transformers", std::string());
    if (!tf.empty() && tf.find('$') == std::string::npos) return kind_ + "-transformers-" + tf;
    return kind_;
  }
  nlohmann::json request() const override { return spec_; }
  Availability probe() const override { return Availability::no(reason_); }
  Environment realise(Progress&) override { fail("environment {} is unavailable: {}", id(), reason_); }

 private:
  std::string kind_;
  nlohmann::json spec_;
  std::string reason_;
};

const std::vector<std::string> kKinds = {"debian-rootfs", "system", "venv", "uv", "overlay"};

}  // namespace

nlohmann::json default_environment_spec() { return {{"provider", "debian-rootfs"}, {"suite", "sid"}}; }

std::unique_ptr<EnvironmentProvider> make_provider(const nlohmann::json& spec, const ProviderOptions& options) {
  if (!spec.is_object()) fail("environment spec: expected a JSON object, found {}: {}", spec.type_name(), spec.dump());
  if (!spec.contains("provider") || !spec.at("provider").is_string())
    fail("environment spec: missing string key \"provider\" (one of {}) in {}", fmt::join(kKinds, ", "), spec.dump());
  const std::string kind = spec.at("provider").get<std::string>();
  if (std::find(kKinds.begin(), kKinds.end(), kind) == kKinds.end())
    fail("environment spec: unknown provider \"{}\" (expected one of {})", kind, fmt::join(kKinds, ", "));
  std::vector<std::string> missing;
  const nlohmann::json expanded = expand_json(spec, "", missing);
  if (!missing.empty())
    return std::make_unique<UnavailableProvider>(kind, spec, fmt::format("{}", fmt::join(missing, "; ")));
  const fs::path cache_root = options.cache_root.empty() ? default_cache_root() : fs::absolute(options.cache_root);
  if (kind == "debian-rootfs") return detail::make_debian_rootfs_provider(expanded, cache_root);
  if (kind == "system") return detail::make_system_provider(expanded);
  if (kind == "venv") return detail::make_pip_provider(expanded, cache_root, false, ProviderOptions{cache_root});
  if (kind == "uv") return detail::make_pip_provider(expanded, cache_root, true, ProviderOptions{cache_root});
  return detail::make_overlay_provider(expanded, cache_root, ProviderOptions{cache_root});
}

nlohmann::json load_spec(const std::string& json_or_file) {
  std::string text = json_or_file;
  const auto first = text.find_first_not_of(" \t\r\n");
  const bool inline_json = first != std::string::npos && text[first] == '{';
  if (!inline_json) {
    std::ifstream in(json_or_file);
    if (!in) fail("--spec: \"{}\" is neither a JSON object (starting with '{{') nor a readable file", json_or_file);
    std::stringstream ss;
    ss << in.rdbuf();
    text = ss.str();
  }
  try {
    auto j = nlohmann::json::parse(text);
    if (!j.is_object())
      fail("--spec {}: expected a JSON object, found {}", inline_json ? "text" : json_or_file, j.type_name());
    return j;
  } catch (const nlohmann::json::parse_error& e) {
    fail("--spec {}: invalid JSON: {}", inline_json ? "text" : json_or_file, e.what());
  }
}

}  // namespace opensci::harness
