// uv from the index: never assumed installed. $OPENSCI_UV names a uv binary to use as-is;
// otherwise uv is installed once into <cache root>/tools/uv-<hash>/ (a venv of the host's
// python3 and `pip install uv`, through the same lock / .partial / READY machinery as the
// environments), and every uv-provided environment uses that binary.
#include <fmt/core.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>

#include "opensci/error.hpp"
#include "providers.hpp"

namespace opensci::harness::detail {
namespace fs = std::filesystem;
namespace {

constexpr int kRecipe = 1;

nlohmann::json uv_request() { return {{"tool", "uv"}, {"installed_with", "pip install uv"}, {"recipe", kRecipe}}; }
std::string uv_entry_name() { return "uv-" + request_hash(uv_request()); }
fs::path tools_dir(const fs::path& cache_root) { return cache_root / "tools"; }

bool executable(const fs::path& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(p.c_str(), X_OK) == 0;
}

// The interpreter that bootstraps uv: Debian's /usr/bin/python3 (python3-venv gives it
// ensurepip), else python3 from PATH.
std::optional<fs::path> bootstrap_python() {
  if (executable("/usr/bin/python3")) return fs::path("/usr/bin/python3");
  return find_host_program("python3");
}

std::string pip_index() {
  if (const char* v = std::getenv("PIP_INDEX_URL"); v && *v) return v;
  return "https://pypi.org/simple";
}

std::string run_and_read(const std::vector<std::string>& argv, std::chrono::seconds timeout, bool& ok) {
  char templ[] = "/tmp/opensci-uv-tool-XXXXXX";
  const int fd = ::mkstemp(templ);
  if (fd >= 0) ::close(fd);
  ProcessSpec spec;
  spec.argv = argv;
  spec.env = {{"PATH", "/usr/local/bin:/usr/bin:/bin"}, {"LANG", "C.UTF-8"}, {"PYTHONNOUSERSITE", "1"}};
  spec.timeout = timeout;
  spec.stdout_path = templ;
  spec.stderr_path = templ;
  const auto r = run_process(spec);
  ok = r.ok();
  std::ifstream in(templ);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ::unlink(templ);
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
  return text;
}

}  // namespace

std::optional<UvTool> ready_uv_tool(const fs::path& cache_root) {
  if (const char* v = std::getenv("OPENSCI_UV"); v && *v) {
    if (!executable(v)) return std::nullopt;
    bool ok = false;
    const auto version = run_and_read({v, "--version"}, std::chrono::seconds(30), ok);
    if (!ok) return std::nullopt;
    return UvTool{v, version, "$OPENSCI_UV"};
  }
  const fs::path dir = tools_dir(cache_root) / uv_entry_name();
  const auto manifest = read_ready_manifest(dir);
  if (!manifest) return std::nullopt;
  return UvTool{dir / "venv" / "bin" / "uv", manifest->value("uv_version", std::string("?")),
                fmt::format("index: pip install uv ({}), cache entry {}", manifest->value("uv_wheel", std::string("?")),
                            dir.string())};
}

std::string uv_tool_problem(const fs::path& cache_root, bool* unreachable) {
  if (unreachable) *unreachable = false;
  if (const char* v = std::getenv("OPENSCI_UV"); v && *v) {
    if (!ready_uv_tool(cache_root))
      return fmt::format("$OPENSCI_UV={} is not an executable uv (`{} --version` failed)", v, v);
    return "";
  }
  if (ready_uv_tool(cache_root)) return "";
  const auto python = bootstrap_python();
  if (!python)
    return "uv is not in the cache and there is no python3 to fetch it with (`pip install uv`); set OPENSCI_UV to a "
           "uv binary";
  bool ok = false;
  const auto out = run_and_read({python->string(), "-c", "import venv, ensurepip"}, std::chrono::seconds(30), ok);
  if (!ok)
    return fmt::format(
        "uv is not in the cache and {} cannot create a venv to fetch it (`import venv, ensurepip`: {}) — on Debian: "
        "apt-get install python3-venv; or set OPENSCI_UV to a uv binary",
        python->string(), out);
  if (const auto problem = check_url_reachable(pip_index()); !problem.empty()) {
    if (unreachable) *unreachable = true;
    return fmt::format("uv is not in the cache and the index {} it comes from is not reachable ({})", pip_index(),
                       problem);
  }
  return "";
}

UvTool ensure_uv_tool(const fs::path& cache_root, Progress& progress) {
  if (auto tool = ready_uv_tool(cache_root)) return *tool;
  if (const auto problem = uv_tool_problem(cache_root); !problem.empty()) throw ProvisionError(problem, "unavailable");
  const auto python = bootstrap_python();
  const std::string saved_label = progress.label();
  progress.set_label("tool uv");
  auto entry = ensure_cache_entry(
      tools_dir(cache_root), uv_entry_name(), uv_request(), progress, [&](const fs::path& partial, Progress& p) {
        const fs::path venv = partial / "venv";
        auto env = index_tool_env();
        env["HOME"] = (partial / "home").string();
        env["TMPDIR"] = (partial / "tmp").string();
        env["PIP_CACHE_DIR"] = (cache_root / "pip-cache").string();
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1";
        env["PYTHONNOUSERSITE"] = "1";
        fs::create_directories(partial / "home");
        fs::create_directories(partial / "tmp");
        ProcessSpec create, install;
        for (auto* s : {&create, &install}) {
          s->env = env;
          s->cwd = partial;
          s->timeout = std::chrono::minutes(10);
        }
        create.argv = {python->string(), "-m", "venv", venv.string()};
        install.argv = {(venv / "bin" / "python").string(), "-m", "pip", "install", "--no-input", "--progress-bar", "off",
                        "uv"};
        run_step(p, "python -m venv", venv.string(), create, partial / "logs" / "venv.log");
        run_step(p, "pip install uv", "from " + pip_index(), install, partial / "logs" / "install.log");
        bool ok = false;
        const auto version = run_and_read({(venv / "bin" / "uv").string(), "--version"}, std::chrono::seconds(30), ok);
        if (!ok) fail("the uv installed into {} does not run: {}", venv.string(), version);
        const auto wheel =
            run_and_read({(venv / "bin" / "python").string(), "-c",
                          "import importlib.metadata as m; d = m.distribution('uv'); print('uv ' + d.version)"},
                         std::chrono::seconds(30), ok);
        std::error_code ec;
        fs::remove_all(partial / "home", ec);
        fs::remove_all(partial / "tmp", ec);
        p.note("uv ready: " + version);
        return nlohmann::json{{"uv_version", version}, {"uv_wheel", ok ? wheel : "?"}, {"python", python->string()},
                              {"index", pip_index()}};
      });
  progress.set_label(saved_label);
  return UvTool{entry.dir / "venv" / "bin" / "uv", entry.manifest.value("uv_version", std::string("?")),
                fmt::format("index: pip install uv ({}), cache entry {}",
                            entry.manifest.value("uv_wheel", std::string("?")), entry.dir.string())};
}

}  // namespace opensci::harness::detail
