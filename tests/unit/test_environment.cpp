// Environment providers: the cache machinery (lock, .partial, READY manifest) under concurrency,
// ${VAR} expansion, unavailable reasons, the system and overlay providers against this machine's
// /usr/bin/python3, and python inside a cached debian-rootfs when one is READY.
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <thread>

#include "opensci/error.hpp"
#include "opensci/harness/environment.hpp"
#include "test_helpers.hpp"

using namespace opensci::harness;
using opensci::test::read_text;
using opensci::test::ScratchDir;
using opensci::test::write_text;
namespace fs = std::filesystem;

namespace {

// A real CachedProvider whose build is cheap: it appends a line to `log` (shared between
// processes, O_APPEND), sleeps a little so concurrent callers overlap, writes a payload.
class CheapProvider final : public CachedProvider {
 public:
  CheapProvider(fs::path cache_root, fs::path log, std::string tag = "a", bool fail_build = false,
                std::string step = {})
      : CachedProvider(std::move(cache_root)),
        log_(std::move(log)),
        tag_(std::move(tag)),
        fail_(fail_build),
        step_(std::move(step)) {}
  std::string kind() const override { return "cheap"; }
  std::string id() const override { return "cheap-" + tag_; }
  nlohmann::json request() const override { return {{"provider", "cheap"}, {"tag", tag_}}; }
  Availability probe() const override { return Availability::yes("cheap", is_ready()); }

 protected:
  nlohmann::json build(const fs::path& partial, Progress&) override {
    const int fd = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    const std::string line = std::to_string(::getpid()) + " " + partial.string() + "\n";
    REQUIRE(::write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size()));
    ::close(fd);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    if (!step_.empty()) {  // a build step, run like the real providers run theirs
      ProcessSpec spec;
      spec.argv = {"/bin/sh", "-c", step_};
      spec.env = {{"PATH", "/usr/bin:/bin"}};
      spec.inherit_fds = {current_build_lock_fd()};
      REQUIRE(run_process(spec).ok());
    }
    write_text(partial / "logs" / "build.log", "built\n");
    if (fail_) throw opensci::Error("cheap build failed on purpose");
    write_text(partial / "payload.txt", "payload of " + tag_);
    return {{"versions", {{"python", "0.0"}}}, {"payload", "payload.txt"}};
  }
  Environment open(const fs::path& dir, const nlohmann::json& manifest) const override {
    Environment env;
    env.provider = kind();
    env.id = dir.filename().string();
    env.root = dir;
    env.manifest = manifest;
    return env;
  }

 private:
  fs::path log_;
  std::string tag_;
  bool fail_;
  std::string step_;
};

size_t count_lines(const fs::path& p) {
  std::ifstream in(p);
  size_t n = 0;
  std::string line;
  while (std::getline(in, line)) ++n;
  return n;
}

// Runs `script` with python in `env`; returns stdout (REQUIREs success).
std::string run_python(const Environment& env, const ScratchDir& dir, const std::string& script,
                       const std::vector<fs::path>& host_dirs = {}) {
  write_text(dir / "script.py", script);
  auto extra = private_run_env(dir / "run");
  auto spec = env.python(
      dir / "script.py", {},
      [&] {
        auto dirs = host_dirs;
        dirs.push_back(dir.path());
        return dirs;
      }(),
      extra, std::chrono::seconds(120));
  spec.stdout_path = dir / "stdout.txt";
  spec.stderr_path = dir / "stderr.txt";
  const auto r = run_process(spec);
  INFO("python: " << r.describe() << "\nstderr:\n" << r.stderr_tail);
  REQUIRE(r.ok());
  return read_text(dir / "stdout.txt");
}

std::string python3_can_import(const std::string& module) {
  ProcessSpec spec;
  spec.argv = {"/usr/bin/python3", "-c", "import " + module};
  spec.env = {{"PATH", "/usr/bin:/bin"}, {"PYTHONNOUSERSITE", "1"}};
  spec.stderr_path = "/dev/null";
  return run_process(spec).ok() ? "yes" : "no";
}

}  // namespace

TEST_CASE("expand_vars: VAR, VAR with default, unset and malformed", "[environment]") {
  ::setenv("OPENSCI_TEST_WHEELS", "/srv/wheels", 1);
  ::unsetenv("OPENSCI_TEST_UNSET");
  std::vector<std::string> missing;
  CHECK(expand_vars("${OPENSCI_TEST_WHEELS}/tf-4.57", missing) == "/srv/wheels/tf-4.57");
  CHECK(expand_vars("plain $HOME text", missing) == "plain $HOME text");
  CHECK(expand_vars("${OPENSCI_TEST_UNSET:-/fallback}", missing) == "/fallback");
  CHECK(missing.empty());
  CHECK(expand_vars("a${OPENSCI_TEST_UNSET}b", missing) == "ab");
  REQUIRE(missing == std::vector<std::string>{"OPENSCI_TEST_UNSET"});
  REQUIRE_ERROR_MENTIONS(expand_vars("${OPENSCI_TEST_WHEELS", missing), "without '}'");
  REQUIRE_ERROR_MENTIONS(expand_vars("${1BAD}", missing), "malformed variable '${1BAD}'");
  ::unsetenv("OPENSCI_TEST_WHEELS");
}

TEST_CASE("make_provider: an unset variable makes the provider unavailable, naming it", "[environment]") {
  ScratchDir cache("env-unset");
  ::unsetenv("OPENSCI_TEST_WHEELHOUSE_UNSET");
  auto p = make_provider(
      {{"provider", "venv"}, {"transformers", "4.57.6"}, {"find_links", "${OPENSCI_TEST_WHEELHOUSE_UNSET}"}},
      {cache.path()});
  const auto a = p->probe();
  CHECK_FALSE(a.available);
  CHECK(a.reason.find("${OPENSCI_TEST_WHEELHOUSE_UNSET} is not set") != std::string::npos);
  CHECK(a.reason.find("\"find_links\"") != std::string::npos);
  CHECK(p->kind() == "venv");
  Progress quiet("test", nullptr);
  REQUIRE_ERROR_MENTIONS(p->realise(quiet), "unavailable", "OPENSCI_TEST_WHEELHOUSE_UNSET");

  // nested: the base of an overlay
  auto o = make_provider({{"provider", "overlay"},
                          {"base", {{"provider", "system"}, {"python", "${OPENSCI_TEST_WHEELHOUSE_UNSET}/python"}}},
                          {"transformers_src", "/x"}},
                         {cache.path()});
  CHECK(o->probe().reason.find("\"base.python\"") != std::string::npos);
}

TEST_CASE("make_provider: malformed specs are errors naming the problem", "[environment]") {
  ScratchDir cache("env-bad");
  const ProviderOptions opt{cache.path()};
  REQUIRE_ERROR_MENTIONS(make_provider(nlohmann::json::array(), opt), "expected a JSON object");
  REQUIRE_ERROR_MENTIONS(make_provider({{"suite", "sid"}}, opt), "missing string key \"provider\"");
  REQUIRE_ERROR_MENTIONS(make_provider({{"provider", "conda"}}, opt), "unknown provider \"conda\"", "debian-rootfs");
  REQUIRE_ERROR_MENTIONS(make_provider({{"provider", "debian-rootfs"}, {"suit", "sid"}}, opt), "unknown key \"suit\"");
  REQUIRE_ERROR_MENTIONS(make_provider({{"provider", "debian-rootfs"}, {"packages", "python3"}}, opt),
                         "\"packages\" must be a list of strings");
  REQUIRE_ERROR_MENTIONS(make_provider({{"provider", "system"}}, opt), "system environment spec", "missing \"python\"");
  REQUIRE_ERROR_MENTIONS(make_provider({{"provider", "venv"}}, opt), "missing \"transformers\"");
  REQUIRE_ERROR_MENTIONS(make_provider({{"provider", "overlay"}, {"transformers_src", "/x"}}, opt),
                         "\"base\" must be a JSON object");
  // notes are allowed
  CHECK_NOTHROW(make_provider({{"provider", "system"}, {"python", "/usr/bin/python3"}, {"_why", "host python"}}, opt));
}

TEST_CASE("providers report why they are unavailable", "[environment]") {
  ScratchDir cache("env-why");
  const ProviderOptions opt{cache.path()};
  SECTION("system: missing interpreter") {
    const auto a = make_provider({{"provider", "system"}, {"python", "/nonexistent/bin/python3"}}, opt)->probe();
    CHECK_FALSE(a.available);
    CHECK(a.reason == "interpreter /nonexistent/bin/python3 does not exist or is not executable");
  }
  SECTION("venv: a wheel dir without the requested transformers") {
    fs::create_directories(cache / "wheels");
    write_text(cache / "wheels" / "transformers-4.48.0-py3-none-any.whl", "");
    const auto a =
        make_provider({{"provider", "venv"}, {"transformers", "4.57.6"}, {"find_links", (cache / "wheels").string()}},
                      opt)
            ->probe();
    CHECK_FALSE(a.available);
    CHECK(a.reason.find("has no transformers-4.57.6-*.whl") != std::string::npos);
  }
  SECTION("venv: an index that does not answer") {
    const auto a =
        make_provider({{"provider", "venv"}, {"transformers", "4.57.6"}, {"index_url", "http://127.0.0.1:9/simple"}},
                      opt)
            ->probe();
    CHECK_FALSE(a.available);
    CHECK(a.reason.find("package index http://127.0.0.1:9/simple is not reachable") != std::string::npos);
  }
  SECTION("uv: not installed") {
    auto p = make_provider({{"provider", "uv"}, {"transformers", "4.48.0"}, {"index_url", "http://127.0.0.1:9/simple"}},
                           opt);
    const auto a = p->probe();
    CHECK_FALSE(a.available);
    // Either uv is missing here, or it is installed and the index is what is missing.
    CHECK((a.reason.find("uv not found") != std::string::npos || a.reason.find("not reachable") != std::string::npos));
  }
  SECTION("overlay: a source dir without transformers, and an unavailable base") {
    fs::create_directories(cache / "src-empty");
    auto a = make_provider({{"provider", "overlay"},
                            {"base", {{"provider", "system"}, {"python", "/usr/bin/python3"}}},
                            {"transformers_src", (cache / "src-empty").string()}},
                           opt)
                 ->probe();
    CHECK_FALSE(a.available);
    CHECK(a.reason.find("no transformers package under " + (cache / "src-empty").string()) != std::string::npos);
    a = make_provider({{"provider", "overlay"},
                       {"base", {{"provider", "system"}, {"python", "/nonexistent/python"}}},
                       {"transformers_src", (cache / "src-empty").string()}},
                      opt)
            ->probe();
    CHECK_FALSE(a.available);
    CHECK(a.reason.find("base environment system-nonexistent-python: interpreter /nonexistent/python") !=
          std::string::npos);
  }
  SECTION("debian-rootfs: an unreachable mirror") {
    const auto a =
        make_provider({{"provider", "debian-rootfs"}, {"suite", "sid"}, {"mirror", "http://127.0.0.1:9/debian"}}, opt)
            ->probe();
    CHECK_FALSE(a.available);
    // Not root / no unshare is reported first; otherwise the mirror.
    CHECK((a.reason.find("mirror http://127.0.0.1:9/debian is not reachable") != std::string::npos ||
           a.reason.find("root") != std::string::npos));
    // the mirror can also come from OPENSCI_DEBIAN_MIRROR (it overrides the host's apt sources)
    ::setenv("OPENSCI_DEBIAN_MIRROR", "http://127.0.0.1:9/mirror-from-env/debian", 1);
    const auto b = make_provider({{"provider", "debian-rootfs"}, {"suite", "trixie"}}, opt)->probe();
    ::unsetenv("OPENSCI_DEBIAN_MIRROR");
    CHECK_FALSE(b.available);
    CHECK((b.reason.find("mirror-from-env") != std::string::npos || b.reason.find("root") != std::string::npos));
  }
}

TEST_CASE("cache entry: concurrent provisioning from two threads builds once", "[environment][cache]") {
  ScratchDir cache("env-threads");
  const auto log = cache / "builds.log";
  std::vector<Environment> envs(2);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < envs.size(); ++i)
    threads.emplace_back([&, i] {
      CheapProvider p(cache.path(), log);
      Progress quiet("t", nullptr);
      envs[i] = p.realise(quiet);
    });
  for (auto& t : threads) t.join();
  CHECK(count_lines(log) == 1);
  CheapProvider p(cache.path(), log);
  REQUIRE(p.is_ready());
  CHECK(envs[0].root == p.cache_dir());
  CHECK(envs[1].root == p.cache_dir());
  CHECK(read_text(p.cache_dir() / "payload.txt") == "payload of a");
  CHECK_FALSE(fs::exists(p.cache_dir().string() + ".partial"));
  CHECK(p.cache_dir().filename().string() == "cheap-a-" + request_hash(p.request()));

  const auto m = read_ready_manifest(p.cache_dir());
  REQUIRE(m);
  CHECK(m->at("request") == p.request());
  CHECK(m->at("request_hash") == request_hash(p.request()));
  CHECK(m->at("payload") == "payload.txt");
  CHECK(m->at("built_at").get<std::string>().size() == 20);  // 2026-01-01T00:00:00Z
  CHECK(m->at("build_seconds").get<double>() >= 0.3);
  // READY was written via rename: no temp file left
  CHECK_FALSE(fs::exists(p.cache_dir() / "READY.tmp"));

  // a third realise does not build
  Progress quiet("t", nullptr);
  p.realise(quiet);
  CHECK(count_lines(log) == 1);
}

TEST_CASE("cache entry: concurrent provisioning from several processes builds once", "[environment][cache]") {
  ScratchDir cache("env-procs");
  const auto log = cache / "builds.log";
  std::vector<pid_t> children;
  for (int i = 0; i < 3; ++i) {
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      int code = 0;
      try {
        CheapProvider p(cache.path(), log);
        Progress quiet("child", nullptr);
        const auto env = p.realise(quiet);
        code = read_text(env.root / "payload.txt") == "payload of a" ? 0 : 3;
      } catch (...) {
        code = 2;
      }
      ::_exit(code);
    }
    children.push_back(pid);
  }
  for (const pid_t pid : children) {
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
  }
  CHECK(count_lines(log) == 1);
}

TEST_CASE("cache entry: a leftover .partial from a killed build is removed and rebuilt", "[environment][cache]") {
  ScratchDir cache("env-partial");
  CheapProvider p(cache.path(), cache / "builds.log");
  const fs::path partial = p.cache_dir().string() + ".partial";
  fs::create_directories(partial / "rootfs" / "usr");
  write_text(partial / "rootfs" / "usr" / "half-written", "x");
  // list shows it as stale (nobody holds the lock)
  auto listed = list_cached_environments(cache.path());
  REQUIRE(listed.size() == 1);
  CHECK(listed[0].state == "stale-partial");

  Progress quiet("t", nullptr);
  const auto env = p.realise(quiet);
  CHECK(count_lines(cache / "builds.log") == 1);
  CHECK_FALSE(fs::exists(partial));
  CHECK_FALSE(fs::exists(env.root / "rootfs"));
  CHECK(fs::exists(env.root / "READY"));

  listed = list_cached_environments(cache.path());
  REQUIRE(listed.size() == 1);
  CHECK(listed[0].state == "ready");
  CHECK(listed[0].name == p.cache_name());
}

TEST_CASE("cache entry: a .partial with something mounted below it is never deleted", "[environment][cache]") {
  if (::geteuid() != 0) {
    WARN("OPENSCI-SKIPPED: needs root to create a mount namespace (running as uid " << ::geteuid() << ")");
    return;
  }
  ScratchDir cache("env-mounted");
  CheapProvider p(cache.path(), cache / "builds.log");
  const fs::path partial = p.cache_dir().string() + ".partial";
  fs::create_directories(partial / "rootfs" / "proc");
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    // A private mount namespace: the tmpfs exists only for this child.
    int code = 10;
    if (::unshare(CLONE_NEWNS) == 0 && ::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) == 0 &&
        ::mount("opensci-test", (partial / "rootfs" / "proc").c_str(), "tmpfs", 0, nullptr) == 0) {
      try {
        Progress quiet("child", nullptr);
        p.realise(quiet);
        code = 1;  // must not get here
      } catch (const opensci::Error& e) {
        const std::string what = e.what();
        code = what.find("refusing to remove") != std::string::npos &&
                       what.find((partial / "rootfs" / "proc").string()) != std::string::npos
                   ? 0
                   : 2;
      }
      code = code == 0 && fs::exists(partial / "rootfs" / "proc") ? 0 : (code ? code : 3);
    }
    ::_exit(code);
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  // Outside that namespace nothing is mounted: the next provisioning cleans up and builds.
  Progress quiet("t", nullptr);
  p.realise(quiet);
  CHECK(p.is_ready());
}

TEST_CASE("cache entry: build processes orphaned by a killed harness keep the entry locked", "[environment][cache]") {
  ScratchDir cache("env-orphan");
  const auto started = cache / "step-started";
  // The step's leader dies with the harness (PR_SET_PDEATHSIG); its background child survives
  // for ~1.5 s and still holds the inherited lock.
  const pid_t harness = ::fork();
  REQUIRE(harness >= 0);
  if (harness == 0) {
    CheapProvider p(cache.path(), cache / "builds.log", "a", false, "sleep 1.5 & touch " + started.string() + "; wait");
    Progress quiet("child", nullptr);
    try {
      p.realise(quiet);
    } catch (...) {
    }
    ::_exit(0);
  }
  for (int i = 0; i < 500 && !fs::exists(started); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  REQUIRE(fs::exists(started));
  ::kill(harness, SIGKILL);
  int status = 0;
  REQUIRE(::waitpid(harness, &status, 0) == harness);
  const auto t0 = std::chrono::steady_clock::now();
  CheapProvider p(cache.path(), cache / "builds.log");
  Progress quiet("t", nullptr);
  p.realise(quiet);  // waits for the orphan, then removes its .partial and builds
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK(waited > 1.0);
  CHECK(count_lines(cache / "builds.log") == 2);
  CHECK(p.is_ready());
  CHECK_FALSE(fs::exists(p.cache_dir().string() + ".partial"));
}

TEST_CASE("cache entry: a failed build keeps its logs and leaves no partial", "[environment][cache]") {
  ScratchDir cache("env-failed");
  CheapProvider bad(cache.path(), cache / "builds.log", "a", true);
  Progress quiet("t", nullptr);
  REQUIRE_ERROR_MENTIONS(bad.realise(quiet), "provisioning cheap-a-", "failed on purpose", ".failed-logs");
  CHECK_FALSE(bad.is_ready());
  CHECK_FALSE(fs::exists(bad.cache_dir().string() + ".partial"));
  CHECK(read_text(bad.cache_dir().string() + ".failed-logs/build.log") == "built\n");
  const auto listed = list_cached_environments(cache.path());
  REQUIRE(listed.size() == 1);
  CHECK(listed[0].state == "failed");

  CheapProvider good(cache.path(), cache / "builds.log", "a", false);
  good.realise(quiet);
  CHECK(good.is_ready());
}

TEST_CASE("cache entry: different requests get different entries", "[environment][cache]") {
  ScratchDir cache("env-keys");
  CheapProvider a(cache.path(), cache / "log", "a"), b(cache.path(), cache / "log", "b");
  CHECK(a.cache_dir() != b.cache_dir());
  CHECK(request_hash(a.request()) == request_hash(nlohmann::json::parse(a.request().dump())));
  CHECK(request_hash(a.request()).size() == 16);
}

TEST_CASE("default_cache_root follows OPENSCI_CACHE_DIR, then XDG_CACHE_HOME, then HOME", "[environment]") {
  const auto save = [](const char* n) {
    const char* v = std::getenv(n);
    return v ? std::optional<std::string>(v) : std::nullopt;
  };
  const auto restore = [](const char* n, const std::optional<std::string>& v) {
    if (v)
      ::setenv(n, v->c_str(), 1);
    else
      ::unsetenv(n);
  };
  const auto o = save("OPENSCI_CACHE_DIR"), x = save("XDG_CACHE_HOME"), h = save("HOME");
  ::setenv("HOME", "/home/someone", 1);
  ::unsetenv("OPENSCI_CACHE_DIR");
  ::unsetenv("XDG_CACHE_HOME");
  CHECK(default_cache_root() == "/home/someone/.cache/opensci-compat");
  ::setenv("XDG_CACHE_HOME", "/xdg", 1);
  CHECK(default_cache_root() == "/xdg/opensci-compat");
  ::setenv("OPENSCI_CACHE_DIR", "/explicit", 1);
  CHECK(default_cache_root() == "/explicit");
  restore("OPENSCI_CACHE_DIR", o);
  restore("XDG_CACHE_HOME", x);
  restore("HOME", h);
}

TEST_CASE("system provider: /usr/bin/python3 of this machine, versions discovered", "[environment][python]") {
  if (!fs::exists("/usr/bin/python3")) {
    WARN("OPENSCI-SKIPPED: /usr/bin/python3 does not exist here");
    return;
  }
  auto p = make_provider({{"provider", "system"}, {"python", "/usr/bin/python3"}});
  CHECK(p->id() == "system-usr-bin-python3");
  const auto a = p->probe();
  REQUIRE(a.available);
  CHECK(a.ready);
  Progress quiet("t", nullptr);
  const auto env = p->realise(quiet);
  ScratchDir dir("env-system");
  const std::string direct = run_python(env, dir, "import sys; print(sys.version.split()[0])");
  CHECK(env.python_version + "\n" == direct);
  // torch / transformers: whatever this python really has, never assumed.
  for (const std::string module : {"torch", "transformers"}) {
    const std::string version = module == "torch" ? env.torch_version : env.transformers_version;
    INFO(module);
    if (python3_can_import(module) == "no") {
      CHECK(version.empty());
      REQUIRE(env.import_errors.count(module));
      CHECK(env.import_errors.at(module).find("ModuleNotFoundError") != std::string::npos);
      CHECK(env.summary().find(module + " absent") != std::string::npos);
    } else {
      CHECK_FALSE(version.empty());
    }
  }
}

TEST_CASE("Environment::python: clean offline environment, private dirs, cwd", "[environment][python]") {
  auto p = make_provider({{"provider", "system"}, {"python", "/usr/bin/python3"}});
  Progress quiet("t", nullptr);
  const auto env = p->realise(quiet);
  ScratchDir dir("env-clean");
  ::setenv("OPENSCI_PARENT_ONLY", "leaked", 1);
  const auto out = run_python(env, dir,
                              "import json, os\n"
                              "print(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd()}))\n");
  ::unsetenv("OPENSCI_PARENT_ONLY");
  const auto j = nlohmann::json::parse(out);
  const auto& e = j.at("env");
  CHECK_FALSE(e.contains("OPENSCI_PARENT_ONLY"));
  CHECK(e.at("HF_HUB_OFFLINE") == "1");
  CHECK(e.at("TRANSFORMERS_OFFLINE") == "1");
  CHECK(e.at("PYTHONDONTWRITEBYTECODE") == "1");
  CHECK(e.at("PYTHONNOUSERSITE") == "1");
  CHECK(e.at("LANG") == "C.UTF-8");
  CHECK(e.at("HOME") == (dir / "run" / "home").string());
  CHECK(e.at("TMPDIR") == (dir / "run" / "tmp").string());
  CHECK(e.at("HF_HOME") == (dir / "run" / "hf").string());
  CHECK(e.at("PATH").get<std::string>().rfind("/usr/bin:", 0) == 0);
  CHECK(j.at("cwd") == (dir / "run" / "home").string());
  // the private dirs are required
  REQUIRE_ERROR_MENTIONS(env.python(dir / "x.py", {}, {}, {{"HOME", "/tmp"}}, std::chrono::seconds(1)),
                         "extra_env must set TMPDIR", "private_run_env");
}

TEST_CASE("overlay provider: a transformers source tree first on PYTHONPATH of the system python",
          "[environment][python]") {
  ScratchDir dir("env-overlay");
  fs::create_directories(dir / "checkout" / "src" / "transformers");
  write_text(dir / "checkout" / "src" / "transformers" / "__init__.py", "__version__ = \"4.99.0.dev0\"\n");
  fs::create_directories(dir / "deps" / "huggingface_hub");
  write_text(dir / "deps" / "huggingface_hub" / "__init__.py", "__version__ = \"0.36.0\"\n");
  auto p = make_provider({{"provider", "overlay"},
                          {"base", {{"provider", "system"}, {"python", "/usr/bin/python3"}}},
                          {"transformers_src", (dir / "checkout").string()},
                          {"pythonpath", {(dir / "deps").string()}}},
                         {dir / "cache"});
  const auto a = p->probe();
  INFO(a.reason);
  REQUIRE(a.available);
  Progress quiet("t", nullptr);
  const auto env = p->realise(quiet);
  CHECK(env.provider == "overlay");
  CHECK(env.transformers_version == "4.99.0.dev0");
  REQUIRE(env.python_path.size() == 2);
  CHECK(env.python_path[0] == dir / "checkout" / "src");
  CHECK(env.python_path[1] == dir / "deps");
  ScratchDir run("env-overlay-run");
  const auto out = run_python(env, run,
                              "import transformers, huggingface_hub\n"
                              "print(transformers.__file__); print(huggingface_hub.__version__)\n");
  CHECK(out == (dir / "checkout" / "src" / "transformers" / "__init__.py").string() + "\n0.36.0\n");
  // a second realise reuses the cache entry and rediscovers (the tree is live)
  write_text(dir / "checkout" / "src" / "transformers" / "__init__.py", "__version__ = \"4.99.1.dev0\"\n");
  CHECK(p->realise(quiet).transformers_version == "4.99.1.dev0");
}

TEST_CASE("venv provider: offline install from a wheel directory", "[environment][python]") {
  ScratchDir dir("env-venv");
  fs::create_directories(dir / "wheels");
  // Two tiny but real wheels standing in for transformers and torch, written by zipfile.
  ProcessSpec make;
  make.argv = {"/usr/bin/python3", "-c",
               "import sys, zipfile\n"
               "out = sys.argv[1]\n"
               "for name, version in (('transformers', '4.57.6'), ('torch', '2.9.0')):\n"
               "    di = '%s-%s.dist-info' % (name, version)\n"
               "    files = {name + '/__init__.py': '__version__ = %r\\n' % version,\n"
               "             di + '/METADATA': 'Metadata-Version: 2.1\\nName: %s\\nVersion: %s\\n' % (name, version),\n"
               "             di + '/WHEEL': 'Wheel-Version: 1.0\\nGenerator: t\\nRoot-Is-Purelib: true\\nTag: "
               "py3-none-any\\n'}\n"
               "    files[di + '/RECORD'] = ''.join(k + ',,\\n' for k in files) + di + '/RECORD,,\\n'\n"
               "    with zipfile.ZipFile('%s/%s-%s-py3-none-any.whl' % (out, name, version), 'w') as z:\n"
               "        for k, v in files.items(): z.writestr(k, v)\n",
               (dir / "wheels").string()};
  make.env = {{"PATH", "/usr/bin:/bin"}};
  make.stderr_path = dir / "make.err";
  REQUIRE(run_process(make).ok());

  auto p = make_provider({{"provider", "venv"}, {"transformers", "4.57.6"}, {"find_links", (dir / "wheels").string()}},
                         {dir / "cache"});
  const auto a = p->probe();
  if (!a.available) {
    WARN("OPENSCI-SKIPPED: " << a.reason);
    return;
  }
  Progress quiet("t", nullptr);
  const auto env = p->realise(quiet);
  CHECK(env.provider == "venv");
  CHECK(env.transformers_version == "4.57.6");
  CHECK(env.torch_version == "2.9.0");
  CHECK(env.manifest.at("installed").at("transformers") == "4.57.6");
  CHECK(env.python_exe == env.root / "venv" / "bin" / "python");
  ScratchDir run("env-venv-run");
  CHECK(run_python(env, run, "import sys, transformers; print(sys.prefix == sys.base_prefix, transformers.__file__)") ==
        "False " + (env.root / "venv").string() + "/lib/python" +
            env.python_version.substr(0, env.python_version.rfind('.')) + "/site-packages/transformers/__init__.py\n");
  CHECK(p->probe().ready);
}

TEST_CASE("debian-rootfs provider: python runs inside the cached rootfs", "[environment][rootfs]") {
  auto p = make_provider(default_environment_spec());
  const auto* cached = dynamic_cast<const CachedProvider*>(p.get());
  REQUIRE(cached);
  if (!cached->is_ready()) {
    WARN("OPENSCI-SKIPPED: no READY " << p->id() << " rootfs at " << cached->cache_dir().string()
                                      << " (provision it with: opensci-compat env provision)");
    return;
  }
  const auto a = p->probe();
  if (!a.available) {
    WARN("OPENSCI-SKIPPED: the cached rootfs cannot be used here: " << a.reason);
    return;
  }
  Progress quiet("t", nullptr);
  const auto env = p->realise(quiet);  // READY: nothing is built
  CHECK(env.rootfs == cached->cache_dir() / "rootfs");
  CHECK_FALSE(env.python_version.empty());
  CHECK(env.has_torch());
  CHECK(env.has_transformers());

  ScratchDir dir("env-rootfs");
  ::setenv("OPENSCI_PARENT_ONLY", "leaked", 1);
  const auto out =
      run_python(env, dir,
                 "import json, os, sys, torch, transformers\n"
                 "here = os.path.dirname(os.path.abspath(__file__))\n"
                 "open(os.path.join(here, 'written-inside.txt'), 'w').write('hello')\n"
                 "x = torch.ones(256, 256) @ torch.ones(256, 256)\n"
                 "maps = open('/proc/self/maps').read()\n"
                 "root = [l.split(' - ')[1].split()[0] for l in open('/proc/self/mountinfo')\n"
                 "        if l.split()[4] == '/'][-1]\n"
                 "print(json.dumps({'python': sys.version.split()[0], 'torch': torch.__version__,\n"
                 "  'transformers': transformers.__version__, 'value': float(x[0, 0]),\n"
                 "  'openblas': 'openblas' in maps, 'root_fs': root, 'cwd': os.getcwd(),\n"
                 "  'leak': os.environ.get('OPENSCI_PARENT_ONLY'), 'offline': os.environ.get('HF_HUB_OFFLINE')}))\n");
  ::unsetenv("OPENSCI_PARENT_ONLY");
  const auto j = nlohmann::json::parse(out);
  CHECK(j.at("python") == env.python_version);
  CHECK(j.at("torch") == env.torch_version);
  CHECK(j.at("transformers") == env.transformers_version);
  CHECK(j.at("value") == 256.0);
  CHECK(j.at("openblas") == true);  // libopenblas0-pthread, not the reference BLAS
  CHECK(j.at("leak").is_null());
  CHECK(j.at("offline") == "1");
  CHECK(j.at("cwd") == (dir / "run" / "home").string());
  // the host dir was visible at the same absolute path, writable
  CHECK(read_text(dir / "written-inside.txt") == "hello");
  if (j.at("root_fs") == "overlay") {
    // runs see the rootfs copy-on-write: no mountpoint dirs leak into the cached tree
    CHECK_FALSE(fs::exists(env.rootfs / dir.path().relative_path()));
  } else {
    WARN("overlayfs unavailable here (root fs type " << j.at("root_fs")
                                                     << "): runs create mountpoint dirs in the rootfs");
  }
}

// ---- index environments (issue 9): versions, installer failures, env-error vs Not Run ----

TEST_CASE("transformers_version_matches: exact versions and release lines", "[environment]") {
  CHECK(transformers_version_matches("5.12.1", "5.12.1"));
  CHECK_FALSE(transformers_version_matches("5.12.1", "5.13.0"));  // a moved Debian package
  CHECK_FALSE(transformers_version_matches("5.12.1", "5.12.10"));
  CHECK_FALSE(transformers_version_matches("5.12.1", "5.12"));
  CHECK(transformers_version_matches("5.24", "5.24.0"));
  CHECK(transformers_version_matches("5.24", "5.24.3"));
  CHECK_FALSE(transformers_version_matches("5.24", "5.25.0"));  // the index moved past "latest"
  CHECK_FALSE(transformers_version_matches("5.2", "5.20.2"));
  CHECK_FALSE(transformers_version_matches("5.24", "5.24.0rc1"));
  CHECK_FALSE(transformers_version_matches("5.24", "5.24.0.dev0"));
  CHECK_FALSE(transformers_version_matches("5.24", ""));  // not importable
  CHECK_FALSE(transformers_version_matches("", "5.24.0"));
}

TEST_CASE("parse_installer_failure: the package and the message of uv and pip failures", "[environment]") {
  // Real outputs of uv 0.13.9 and pip 25 (NO_COLOR, no terminal).
  auto f = parse_installer_failure(
      "Using Python 3.14.10 environment at: /x/venv\n"
      "error: No solution found when resolving dependencies\n"
      "  cause: Because there is no version of transformers==4.99.0 and you require transformers==4.99.0, we can "
      "conclude that your requirements are unsatisfiable.\n");
  REQUIRE(f);
  CHECK(f->package == "transformers");
  CHECK(f->message.rfind("error: No solution found", 0) == 0);
  CHECK(f->message.find("Using Python") == std::string::npos);
  f = parse_installer_failure(
      "error: No solution found when resolving dependencies\n"
      "  cause: Because torch==2.0.0 has no wheels with a matching Python ABI tag (e.g., `cp314`) and you require "
      "torch==2.0.0, we can conclude that your requirements are unsatisfiable.\n\n"
      "hint: You require CPython 3.14 (`cp314`), but we only found wheels for `torch` (v2.0.0) with the following "
      "Python ABI tags: `cp38`, `cp39`, `cp310`, `cp311`\n");
  REQUIRE(f);
  CHECK(f->package == "torch");
  CHECK(f->message.find("hint: You require CPython 3.14") != std::string::npos);
  f = parse_installer_failure(
      "error: No solution found when resolving dependencies\n"
      "  cause: Because transformers==4.48.3 depends on tokenizers>=0.21,<0.22 and you require transformers==4.48.3, "
      "we can conclude that you require tokenizers>=0.21,<0.22.\n"
      "         And because you require tokenizers==0.22.0, we can conclude that your requirements are "
      "unsatisfiable.\n");
  REQUIRE(f);
  CHECK(f->package == "transformers");
  f = parse_installer_failure(
      "Collecting transformers==4.99.0\n"
      "ERROR: Could not find a version that satisfies the requirement transformers==4.99.0 (from versions: 4.48.3)\n"
      "ERROR: No matching distribution found for transformers==4.99.0\n");
  REQUIRE(f);
  CHECK(f->package == "transformers");
  CHECK(f->message.find("Collecting") == std::string::npos);
  f = parse_installer_failure("ERROR: Failed building wheel for tokenizers\nerror: failed-wheel-build-for-install\n");
  REQUIRE(f);
  CHECK(f->package == "tokenizers");
  CHECK_FALSE(parse_installer_failure("Resolved 18 packages in 862ms\nInstalled 18 packages in 321ms\n"));
}

namespace {
// OPENSCI_UV for tests that need uv: the default cache's uv (fetched from the index by earlier
// provisioning) or nothing, in which case the test says why it is skipped.
std::string uv_for_tests() {
  if (const char* v = std::getenv("OPENSCI_UV"); v && *v) return v;
  const auto tools = default_cache_root() / "tools";
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(tools, ec))
    if (e.path().filename().string().starts_with("uv-") && fs::exists(e.path() / "READY") &&
        fs::exists(e.path() / "venv/bin/uv"))
      return (e.path() / "venv/bin/uv").string();
  return "";
}
struct ScopedEnv {
  ScopedEnv(const char* k, const std::string& v) : key(k) {
    if (const char* old = std::getenv(k)) saved = old;
    ::setenv(k, v.c_str(), 1);
  }
  ~ScopedEnv() {
    if (saved)
      ::setenv(key, saved->c_str(), 1);
    else
      ::unsetenv(key);
  }
  const char* key;
  std::optional<std::string> saved;
};
}  // namespace

TEST_CASE("uv provider: an unresolvable version is an env-error naming the package (real index)",
          "[environment][index]") {
  const auto uv = uv_for_tests();
  if (uv.empty()) {
    WARN("OPENSCI-SKIPPED: no uv in the cache yet (opensci-compat env provision of a uv environment fetches it)");
    return;
  }
  const ScopedEnv use_uv("OPENSCI_UV", uv);
  ScratchDir cache("env-uv-bad");
  auto p = make_provider({{"provider", "uv"}, {"transformers", "4.99.0"}, {"python", "/usr/bin/python3"}},
                         {cache.path()});
  const auto a = p->probe();
  if (!a.available) {
    WARN("OPENSCI-SKIPPED: " << a.reason);
    return;
  }
  Progress quiet("t", nullptr);
  try {
    p->realise(quiet);
    FAIL("transformers==4.99.0 does not exist, yet the environment was provisioned");
  } catch (const ProvisionError& e) {
    CHECK(e.status == "env-error");
    CHECK(e.package == "transformers");
    CHECK(e.resolver_message.find("no version of transformers==4.99.0") != std::string::npos);
    CHECK(std::string(e.what()).find("build logs kept in") != std::string::npos);
  }
  CHECK_FALSE(p->probe().ready);
}

TEST_CASE("uv provider: an unreachable index with an empty uv cache is unavailable, not an env-error",
          "[environment][index]") {
  const auto uv = uv_for_tests();
  if (uv.empty()) {
    WARN("OPENSCI-SKIPPED: no uv in the cache yet (opensci-compat env provision of a uv environment fetches it)");
    return;
  }
  const ScopedEnv use_uv("OPENSCI_UV", uv);
  ScratchDir cache("env-uv-offline");
  const nlohmann::json spec = {{"provider", "uv"},
                               {"transformers", "4.48.3"},
                               {"python", "/usr/bin/python3"},
                               {"index_url", "http://127.0.0.1:9/simple"}};
  // no uv cache at all: Not Run at probe time
  auto a = make_provider(spec, {cache.path()})->probe();
  CHECK_FALSE(a.available);
  CHECK(a.reason.find("package index http://127.0.0.1:9/simple is not reachable") != std::string::npos);
  // a uv cache that lacks the packages: uv resolves offline, fails, and the failure is "unavailable"
  fs::create_directories(cache / "uv-cache");
  auto p = make_provider(spec, {cache.path()});
  a = p->probe();
  REQUIRE(a.available);
  CHECK(a.reason.find("offline from the uv cache") != std::string::npos);
  Progress quiet("t", nullptr);
  try {
    p->realise(quiet);
    FAIL("provisioned offline from an empty uv cache");
  } catch (const ProvisionError& e) {
    CHECK(e.status == "unavailable");
    CHECK(std::string(e.what()).find("cannot satisfy transformers==4.48.3 torch offline") != std::string::npos);
  }
}

TEST_CASE("uv and venv specs: base rules", "[environment]") {
  ScratchDir cache("env-uv-spec");
  const ProviderOptions opt{cache.path()};
  const nlohmann::json base = {{"provider", "debian-rootfs"}, {"suite", "sid"}};
  REQUIRE_ERROR_MENTIONS(make_provider({{"provider", "uv"}, {"transformers", "5.0.0"}, {"base", base}, {"torch", "2.9"}}, opt),
                         "\"torch\" cannot be combined with \"base\"");
  REQUIRE_ERROR_MENTIONS(
      make_provider({{"provider", "uv"}, {"transformers", "5.0.0"}, {"base", {{"provider", "system"}, {"python", "/usr/bin/python3"}}}},
                    opt),
      "\"base\" must be a debian-rootfs spec");
  const auto p = make_provider({{"provider", "uv"}, {"transformers", "5.0.0"}, {"base", base}}, opt);
  CHECK(p->id() == "uv-debian-sid-transformers-5.0.0");
  CHECK(p->request().at("base").at("provider") == "debian-rootfs");
  // a different base is a different environment
  const auto q = make_provider(
      {{"provider", "uv"}, {"transformers", "5.0.0"}, {"base", {{"provider", "debian-rootfs"}, {"suite", "trixie"}}}}, opt);
  CHECK(request_hash(p->request()) != request_hash(q->request()));
}
