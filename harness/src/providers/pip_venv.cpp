// venv and uv: a virtual environment per transformers version, installed with pip (python3 -m venv)
// or uv (uv venv + uv pip install), from an index URL or an offline wheel directory.
#include <chrono>
#include <ctime>
#include <fmt/core.h>
#include <fmt/format.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <regex>

#include "opensci/error.hpp"
#include "providers.hpp"

namespace opensci::harness::detail {
namespace fs = std::filesystem;
namespace {

constexpr int kRecipe = 1;

class PipProvider final : public CachedProvider {
 public:
  PipProvider(const nlohmann::json& spec, fs::path cache_root, bool use_uv)
      : CachedProvider(std::move(cache_root)), uv_(use_uv) {
    SpecReader r(spec, kind());
    r.check_keys({"transformers", "torch", "packages", "python", "index_url", "find_links"});
    transformers_ = r.required_str("transformers");
    const std::regex version_re("[0-9A-Za-z.+!-]+");
    if (!std::regex_match(transformers_, version_re))
      fail("{} environment spec: \"transformers\" must be a version like 4.57.6, found \"{}\"", kind(), transformers_);
    torch_ = r.str("torch");
    packages_ = r.str_list("packages");
    python_ = r.str("python", uv_ ? "" : "/usr/bin/python3");
    index_url_ = r.str("index_url");
    find_links_ = r.str("find_links");
    // "latest": unpinned, resolved once per UTC day (the day is part of the cache key), so a
    // nightly matrix follows new releases without reinstalling on every run.
    if (transformers_ == "latest") {
      const auto now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
      std::tm tm{};
      gmtime_r(&now, &tm);
      resolved_on_ = fmt::format("{:04}-{:02}-{:02}", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday);
    }
  }

  std::string kind() const override { return uv_ ? "uv" : "venv"; }
  std::string id() const override { return kind() + "-transformers-" + sanitize_id(transformers_); }
  nlohmann::json request() const override {
    return {{"provider", kind()}, {"transformers", transformers_}, {"torch", torch_},           {"packages", packages_},
            {"python", python_},  {"index_url", index_url_},       {"find_links", find_links_}, {"recipe", kRecipe},
            {"resolved_on", resolved_on_}};
  }

  Availability probe() const override {
    if (is_ready()) return Availability::yes(fmt::format("ready at {}", cache_dir().string()), true);
    std::string tool;
    if (uv_) {
      const auto uv = find_host_program("uv");
      if (!uv)
        return Availability::no("uv not found in PATH (nor in the sbin/bin dirs); install uv or use the venv provider");
      tool = uv->string();
    } else {
      const auto base = find_host_program(python_);
      if (!base) return Availability::no(fmt::format("base interpreter {} not found or not executable", python_));
      if (base_pip_supports_python_option(*base)) {
        tool = base->string() + " -m venv --without-pip + its pip --python";
      } else {
        if (const auto problem = python_can_make_venvs(*base); !problem.empty()) return Availability::no(problem);
        tool = base->string() + " -m venv";
      }
    }
    if (!find_links_.empty()) {
      std::error_code ec;
      if (!fs::is_directory(find_links_, ec))
        return Availability::no(fmt::format("find_links {} is not a directory", find_links_));
      if (index_url_.empty()) {
        if (!has_distribution(find_links_, "transformers", transformers_))
          return Availability::no(
              fmt::format("find_links {} has no transformers-{}-*.whl (nor .tar.gz) and no index_url is given",
                          find_links_, transformers_));
        if (!has_distribution(find_links_, "torch", torch_))
          return Availability::no(fmt::format("find_links {} has no torch{}-*.whl and no index_url is given",
                                              find_links_, torch_.empty() ? "" : "-" + torch_));
        return Availability::yes(fmt::format("will build {} with {} offline from {} into {}", id(), tool, find_links_,
                                             cache_dir().string()));
      }
    }
    const std::string index = effective_index();
    if (const auto problem = check_url_reachable(index); !problem.empty())
      return Availability::offline(fmt::format(
          "package index {} is not reachable ({}) and no find_links wheel directory is given", index, problem));
    return Availability::yes(
        fmt::format("will build {} with {} from {} into {}", id(), tool, index, cache_dir().string()));
  }

 protected:
  nlohmann::json build(const fs::path& partial, Progress& progress) override {
    progress.set_label("env " + id());
    const fs::path logs = partial / "logs";
    const fs::path venv = partial / "venv";
    std::map<std::string, std::string> env = host_tool_env();
    env["HOME"] = (partial / "home").string();
    env["TMPDIR"] = (partial / "tmp").string();
    env["PIP_CACHE_DIR"] = (cache_root() / "pip-cache").string();
    env["UV_CACHE_DIR"] = (cache_root() / "uv-cache").string();
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1";
    env["PYTHONNOUSERSITE"] = "1";
    fs::create_directories(partial / "home");
    fs::create_directories(partial / "tmp");

    std::vector<std::string> source;
    if (!find_links_.empty()) {
      if (index_url_.empty()) source.push_back("--no-index");
      source.insert(source.end(), {"--find-links", find_links_});
    }
    if (!index_url_.empty()) source.insert(source.end(), {"--index-url", index_url_});
    std::vector<std::string> requirements = {transformers_ == "latest" ? "transformers" : "transformers==" + transformers_};
    if (torch_.empty())
      requirements.push_back("torch");
    else if (std::isdigit(static_cast<unsigned char>(torch_[0])))
      requirements.push_back("torch==" + torch_);
    else
      requirements.push_back("torch" + torch_);
    requirements.insert(requirements.end(), packages_.begin(), packages_.end());

    ProcessSpec create, install, freeze;
    for (auto* s : {&create, &install, &freeze}) {
      s->env = env;
      s->cwd = partial;
    }
    create.timeout = std::chrono::minutes(5);
    install.timeout = std::chrono::minutes(60);
    freeze.timeout = std::chrono::minutes(2);
    const std::string venv_python = (venv / "bin" / "python").string();
    if (uv_) {
      const std::string uv = find_host_program("uv").value_or("uv").string();
      create.argv = {uv, "venv"};
      if (!python_.empty()) create.argv.insert(create.argv.end(), {"--python", python_});
      create.argv.push_back(venv.string());
      install.argv = {uv, "pip", "install", "--python", venv_python};
      freeze.argv = {uv, "pip", "freeze", "--python", venv_python};
    } else {
      const std::string base = find_host_program(python_).value_or(python_).string();
      if (base_pip_supports_python_option(base)) {
        // The base's pip installs into the venv (pip >= 22.3 --python): no ensurepip bootstrap,
        // which costs ~5 s and a pip copy per environment.
        create.argv = {base, "-m", "venv", "--without-pip", venv.string()};
        install.argv = {base, "-m", "pip", "--python", venv_python, "install", "--no-input", "--progress-bar", "off"};
        freeze.argv = {base, "-m", "pip", "--python", venv_python, "freeze", "--all"};
        pip_ = "base interpreter's pip with --python";
      } else {
        create.argv = {base, "-m", "venv", venv.string()};
        install.argv = {venv_python, "-m", "pip", "install", "--no-input", "--progress-bar", "off"};
        freeze.argv = {venv_python, "-m", "pip", "freeze", "--all"};
        pip_ = "pip bootstrapped into the venv by ensurepip";
      }
    }
    install.argv.insert(install.argv.end(), source.begin(), source.end());
    install.argv.insert(install.argv.end(), requirements.begin(), requirements.end());
    run_step(progress, uv_ ? "uv venv" : "python -m venv", venv.string(), create, logs / "venv.log");
    run_step(progress, uv_ ? "uv pip install" : "pip install", fmt::format("{}", fmt::join(requirements, " ")), install,
             logs / "install.log");
    freeze.stdout_path = logs / "freeze.txt";
    freeze.stderr_path = logs / "freeze.err";
    progress.stage("freeze");
    run_process(freeze);
    nlohmann::json installed = nlohmann::json::object();
    std::ifstream in(logs / "freeze.txt");
    std::string line;
    while (std::getline(in, line)) {
      const auto eq = line.find("==");
      if (eq != std::string::npos) installed[line.substr(0, eq)] = line.substr(eq + 2);
    }
    std::error_code ec;
    fs::remove_all(partial / "home", ec);
    fs::remove_all(partial / "tmp", ec);

    progress.stage("discover versions");
    Environment e = open(partial, nlohmann::json::object());
    discover_versions(e);
    progress.note("discovered: " + e.summary());
    return {{"installed", installed},       {"installer", uv_ ? "uv" : pip_},
            {"requirements", requirements}, {"source", source},
            {"versions", versions_json(e)}, {"layout", {{"venv", "venv"}, {"logs", "logs"}}}};
  }

  Environment open(const fs::path& dir, const nlohmann::json& manifest) const override {
    // A venv is not relocatable for its console scripts, but bin/python finds its pyvenv.cfg
    // and site-packages relative to itself, so moving .partial -> final is safe for `python`.
    Environment env;
    env.provider = kind();
    env.id = dir.filename().string();
    if (env.id.size() > 8 && env.id.compare(env.id.size() - 8, 8, ".partial") == 0) env.id.resize(env.id.size() - 8);
    env.root = dir;
    env.python_exe = dir / "venv" / "bin" / "python";
    env.path_var = (dir / "venv" / "bin").string() + ":/usr/local/bin:/usr/bin:/bin";
    env.manifest = manifest;
    apply_versions(env, manifest);
    return env;
  }

 private:
  std::string effective_index() const {
    if (!index_url_.empty()) return index_url_;
    if (const char* v = std::getenv(uv_ ? "UV_INDEX_URL" : "PIP_INDEX_URL"); v && *v) return v;
    return "https://pypi.org/simple";
  }

  static bool has_distribution(const fs::path& dir, const std::string& name, const std::string& version) {
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      const std::string f = e.path().filename().string();
      const bool archive = f.size() > 4 && (f.compare(f.size() - 4, 4, ".whl") == 0 ||
                                            (f.size() > 7 && f.compare(f.size() - 7, 7, ".tar.gz") == 0));
      if (!archive || f.rfind(name + "-", 0) != 0) continue;
      if (version.empty() || !std::isdigit(static_cast<unsigned char>(version[0]))) return true;
      const std::string rest = f.substr(name.size() + 1);
      if (rest.rfind(version + "-", 0) == 0 || rest.rfind(version + "+", 0) == 0 ||
          rest.rfind(version + ".tar.gz", 0) == 0)
        return true;
    }
    return false;
  }

  // pip >= 22.3 importable by `python` (it can then install into another interpreter).
  static bool base_pip_supports_python_option(const fs::path& python) {
    char templ[] = "/tmp/opensci-pip-check-XXXXXX";
    const int fd = ::mkstemp(templ);
    if (fd >= 0) ::close(fd);
    ProcessSpec check;
    check.argv = {python.string(), "-c", "import pip; print(pip.__version__)"};
    check.env = {{"PATH", "/usr/local/bin:/usr/bin:/bin"}, {"LANG", "C.UTF-8"}, {"PYTHONNOUSERSITE", "1"}};
    check.timeout = std::chrono::seconds(30);
    check.stdout_path = templ;
    check.stderr_path = "/dev/null";
    const bool ran = run_process(check).ok();
    std::ifstream in(templ);
    int major = 0, minor = 0;
    char dot = 0;
    in >> major >> dot >> minor;
    ::unlink(templ);
    return ran && (major > 22 || (major == 22 && minor >= 3));
  }

  static std::string python_can_make_venvs(const fs::path& python) {
    char templ[] = "/tmp/opensci-venv-check-XXXXXX";
    const int fd = ::mkstemp(templ);
    if (fd >= 0) ::close(fd);
    ProcessSpec check;
    check.argv = {python.string(), "-c", "import venv, ensurepip"};
    check.env = {{"PATH", "/usr/local/bin:/usr/bin:/bin"}, {"LANG", "C.UTF-8"}, {"PYTHONNOUSERSITE", "1"}};
    check.timeout = std::chrono::seconds(30);
    check.stderr_path = templ;
    const auto r = run_process(check);
    ::unlink(templ);
    if (r.ok()) return "";
    return fmt::format(
        "{} cannot create venvs with pip (`import venv, ensurepip`: {}; {}) — on Debian: apt-get install python3-venv",
        python.string(), r.describe(), r.stderr_tail);
  }

  bool uv_;
  std::string pip_;
  std::string transformers_, torch_, python_, index_url_, find_links_;
  std::string resolved_on_;  // UTC day for "latest", else empty
  std::vector<std::string> packages_;
};

}  // namespace

std::unique_ptr<EnvironmentProvider> make_pip_provider(const nlohmann::json& spec, const fs::path& cache_root,
                                                       bool use_uv) {
  return std::make_unique<PipProvider>(spec, cache_root, use_uv);
}

}  // namespace opensci::harness::detail
