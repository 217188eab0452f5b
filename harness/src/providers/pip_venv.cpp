// venv and uv: a virtual environment per transformers version, installed with pip or uv from an
// index (or an offline wheel directory). Two families:
//  - with "base" (a debian-rootfs spec): the venv is made by the base rootfs's /usr/bin/python3
//    with --system-site-packages and lives in this cache entry; builds and runs are chrooted into
//    the base (copy-on-write), the entry dir bind-mounted. torch is the base's Debian package (one
//    torch for every version); the index resolves transformers and whatever it requires.
//  - without: a venv of a host interpreter; torch comes from the index too (uv shares one copy of
//    its files between all environments by hardlinking them from its cache).
// uv itself comes from the index (uv_tool.cpp). Package caches: <cache root>/uv-cache and
// <cache root>/pip-cache; an unreachable index makes uv resolve offline from its cache.
#include <fmt/core.h>
#include <fmt/format.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <fstream>
#include <regex>

#include "opensci/error.hpp"
#include "providers.hpp"

namespace opensci::harness::detail {
namespace fs = std::filesystem;
namespace {

constexpr int kRecipe = 2;
const char* kInsidePath = "/usr/local/bin:/usr/bin:/bin";

std::string read_file(const fs::path& p) {
  std::ifstream in(p);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

class PipProvider final : public CachedProvider {
 public:
  PipProvider(const nlohmann::json& spec, fs::path cache_root, bool use_uv, const ProviderOptions& options)
      : CachedProvider(std::move(cache_root)), uv_(use_uv) {
    SpecReader r(spec, kind());
    r.check_keys({"transformers", "torch", "packages", "python", "index_url", "find_links", "base"});
    transformers_ = r.required_str("transformers");
    const std::regex version_re("[0-9A-Za-z.+!-]+");
    if (!std::regex_match(transformers_, version_re))
      fail("{} environment spec: \"transformers\" must be a version like 4.57.6, found \"{}\"", kind(), transformers_);
    torch_ = r.str("torch");
    packages_ = r.str_list("packages");
    python_ = r.str("python");
    index_url_ = r.str("index_url");
    find_links_ = r.str("find_links");
    if (r.has("base")) {
      const auto& base = r.object("base");
      base_ = make_provider(base, options);
      if (base_->kind() != "debian-rootfs")
        fail("{} environment spec: \"base\" must be a debian-rootfs spec (the rootfs the venv runs in), found provider "
             "\"{}\"",
             kind(), base_->kind());
      if (!torch_.empty())
        fail("{} environment spec: \"torch\" cannot be combined with \"base\": torch is the base rootfs's "
             "(python3-torch); remove one of them",
             kind());
      if (!python_.empty())
        fail("{} environment spec: \"python\" cannot be combined with \"base\": the venv uses the base's "
             "/usr/bin/python3",
             kind());
    } else if (python_.empty() && !uv_) {
      python_ = "/usr/bin/python3";
    }
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
  std::string id() const override {
    return kind() + (base_ ? "-" + base_->id() : std::string()) + "-transformers-" + sanitize_id(transformers_);
  }
  nlohmann::json request() const override {
    return {{"provider", kind()},
            {"transformers", transformers_},
            {"torch", torch_},
            {"packages", packages_},
            {"python", python_},
            {"index_url", index_url_},
            {"find_links", find_links_},
            {"base", base_ ? base_->request() : nlohmann::json()},
            {"recipe", kRecipe},
            {"resolved_on", resolved_on_}};
  }

  Availability probe() const override {
    if (is_ready()) {
      if (base_) {
        const auto b = base_->probe();
        if (!b.available || !b.ready)
          return Availability::no(fmt::format("cached at {} but its base {} is {}: {}", cache_dir().string(),
                                              base_->id(), b.available ? "not built" : "unusable", b.reason));
      }
      return Availability::yes(fmt::format("ready at {}", cache_dir().string()), true);
    }
    std::string plan;
    if (base_) {
      const auto b = base_->probe();
      if (!b) {
        auto no = Availability::no(fmt::format("base environment {}: {}", base_->id(), b.reason));
        no.unreachable = b.unreachable;  // its mirror did not answer
        return no;
      }
      plan = fmt::format("a venv in the base {} ({})", base_->id(), b.ready ? "ready" : "built first: " + b.reason);
    } else if (!uv_) {
      const auto base = find_host_program(python_);
      if (!base) return Availability::no(fmt::format("base interpreter {} not found or not executable", python_));
      if (const auto problem = python_can_make_venvs(*base); !problem.empty()) return Availability::no(problem);
      plan = "a venv of " + base->string();
    } else {
      plan = "a venv of " + (python_.empty() ? std::string("the host's python") : python_);
    }
    if (uv_) {
      bool unreachable = false;
      if (const auto problem = uv_tool_problem(cache_root(), &unreachable); !problem.empty())
        return unreachable ? Availability::offline(problem) : Availability::no(problem);
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
        if (!base_ && !has_distribution(find_links_, "torch", torch_))
          return Availability::no(fmt::format("find_links {} has no torch{}-*.whl and no index_url is given",
                                              find_links_, torch_.empty() ? "" : "-" + torch_));
        return Availability::yes(fmt::format("will build {} ({}) with {} offline from {} into {}", id(), plan, kind(),
                                             find_links_, cache_dir().string()));
      }
    }
    const std::string index = effective_index();
    if (const auto problem = check_url_reachable(index); !problem.empty()) {
      std::error_code ec;
      if (uv_ && fs::is_directory(cache_root() / "uv-cache", ec))
        return Availability::yes(
            fmt::format("package index {} is not reachable ({}): will build {} ({}) offline from the uv cache {}",
                        index, problem, id(), plan, (cache_root() / "uv-cache").string()));
      return Availability::offline(fmt::format(
          "package index {} is not reachable ({}) and no find_links wheel directory is given", index, problem));
    }
    return Availability::yes(
        fmt::format("will build {} ({}) with {} from {} into {}", id(), plan, kind(), index, cache_dir().string()));
  }

  Environment realise(Progress& progress) override {
    if (base_) base_env_ = base_->realise(progress);
    return CachedProvider::realise(progress);
  }

 protected:
  nlohmann::json build(const fs::path& partial, Progress& progress) override {
    progress.set_label("env " + id());
    const fs::path logs = partial / "logs";
    const fs::path venv = partial / "venv";
    fs::create_directories(partial / "home");
    fs::create_directories(partial / "tmp");

    std::map<std::string, std::string> env = index_tool_env();
    env["HOME"] = (partial / "home").string();
    env["TMPDIR"] = (partial / "tmp").string();
    env["PIP_CACHE_DIR"] = (cache_root() / "pip-cache").string();
    env["UV_CACHE_DIR"] = (cache_root() / "uv-cache").string();
    env["UV_PYTHON_DOWNLOADS"] = "never";
    env["UV_NO_PROGRESS"] = "1";
    env["NO_COLOR"] = "1";
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1";
    env["PYTHONNOUSERSITE"] = "1";
    std::optional<UvTool> uv;
    if (uv_) uv = ensure_uv_tool(cache_root(), progress);
    progress.set_label("env " + id());

    const bool offline_only = !find_links_.empty() && index_url_.empty();
    const std::string index = effective_index();
    const std::string unreachable = offline_only ? std::string() : check_url_reachable(index);
    const bool offline = !unreachable.empty();
    if (offline && !uv_) throw ProvisionError(fmt::format("package index {} is not reachable ({})", index, unreachable), "unavailable");
    if (offline) progress.note(fmt::format("index {} not reachable ({}): resolving offline from the uv cache", index, unreachable));

    std::vector<std::string> source;
    if (offline) source.push_back("--offline");
    if (!find_links_.empty()) {
      if (index_url_.empty()) source.push_back("--no-index");
      source.insert(source.end(), {"--find-links", find_links_});
    }
    if (!index_url_.empty()) source.insert(source.end(), {"--index-url", index_url_});
    std::vector<std::string> requirements = {transformers_ == "latest" ? "transformers"
                                                                       : "transformers==" + transformers_};
    if (!base_) {
      if (torch_.empty())
        requirements.push_back("torch");
      else if (std::isdigit(static_cast<unsigned char>(torch_[0])))
        requirements.push_back("torch==" + torch_);
      else
        requirements.push_back("torch" + torch_);
    }
    requirements.insert(requirements.end(), packages_.begin(), packages_.end());

    // The command lines; `run` turns one into a process on the host or inside the base rootfs.
    const std::string venv_python = (venv / "bin" / "python").string();
    std::vector<std::string> create, install, freeze;
    std::string installer;
    if (base_) {
      if (!base_env_ || base_env_->rootfs.empty()) fail("{}: the base environment is not realised", id());
      // The rootfs's CA store does not have the host's CAs (e.g. a TLS-intercepting proxy's).
      if (const auto ca = host_ca_bundle(); !ca.empty()) {
        fs::copy_file(ca, partial / "tmp" / "host-ca.pem", fs::copy_options::overwrite_existing);
        env["SSL_CERT_FILE"] = (partial / "tmp" / "host-ca.pem").string();
        env["PIP_CERT"] = env["SSL_CERT_FILE"];
      }
      env.erase("SSL_CERT_DIR");  // a host path; the bundle above replaces it
      env["PATH"] = kInsidePath;
    }
    if (uv_) {
      create = {uv->exe.string(), "venv", "--no-config"};
      if (base_)
        create.insert(create.end(), {"--system-site-packages", "--python", "/usr/bin/python3"});
      else if (!python_.empty())
        create.insert(create.end(), {"--python", python_});
      create.push_back(venv.string());
      install = {uv->exe.string(), "pip", "install", "--no-config", "--python", venv_python};
      freeze = {uv->exe.string(), "pip", "freeze", "--no-config", "--python", venv_python};
      installer = uv->version;
    } else if (base_) {
      // Debian's pip of the base (python3-pip), run by the venv: it honours the system site
      // packages (installs only what the base lacks or does not satisfy).
      create = {"/usr/bin/python3", "-m", "venv", "--system-site-packages", "--without-pip", venv.string()};
      install = {venv_python, "-m", "pip", "install", "--no-input", "--progress-bar", "off"};
      freeze = {venv_python, "-m", "pip", "freeze", "--local", "--all"};
      installer = "pip of the base rootfs (python3-pip), run by the venv";
    } else {
      const std::string base = find_host_program(python_).value_or(python_).string();
      if (base_pip_supports_python_option(base)) {
        // The base's pip installs into the venv (pip >= 22.3 --python): no ensurepip bootstrap,
        // which costs ~5 s and a pip copy per environment.
        create = {base, "-m", "venv", "--without-pip", venv.string()};
        install = {base, "-m", "pip", "--python", venv_python, "install", "--no-input", "--progress-bar", "off"};
        freeze = {base, "-m", "pip", "--python", venv_python, "freeze", "--all"};
        installer = "base interpreter's pip with --python";
      } else {
        create = {base, "-m", "venv", venv.string()};
        install = {venv_python, "-m", "pip", "install", "--no-input", "--progress-bar", "off"};
        freeze = {venv_python, "-m", "pip", "freeze", "--all"};
        installer = "pip bootstrapped into the venv by ensurepip";
      }
    }
    install.insert(install.end(), source.begin(), source.end());
    install.insert(install.end(), requirements.begin(), requirements.end());

    auto process = [&](const std::vector<std::string>& argv, std::chrono::minutes timeout) {
      ProcessSpec spec;
      if (base_) {
        // The whole cache root is visible (one mount): uv hardlinks from its cache into the venv.
        std::vector<fs::path> dirs = {cache_root()};
        if (!find_links_.empty()) dirs.push_back(fs::absolute(find_links_));
        if (uv && !uv->exe.string().starts_with(cache_root().string())) dirs.push_back(uv->exe.parent_path());
        spec = rootfs_spec(base_env_->rootfs, argv, env, dirs, base_env_->root / "run");
      } else {
        spec.argv = argv;
        spec.env = env;
      }
      spec.cwd = partial;
      spec.timeout = timeout;
      return spec;
    };
    run_step(progress, uv_ ? "uv venv" : "python -m venv", venv.string(), process(create, std::chrono::minutes(5)),
             logs / "venv.log");
    try {
      run_step(progress, uv_ ? "uv pip install" : "pip install", fmt::format("{}", fmt::join(requirements, " ")),
               process(install, std::chrono::minutes(60)), logs / "install.log");
    } catch (const Error& e) {
      const auto failure = parse_installer_failure(read_file(logs / "install.log"));
      const std::string what = failure ? failure->message : std::string(e.what());
      if (offline)
        throw ProvisionError(
            fmt::format("package index {} is not reachable ({}) and the uv cache {} cannot satisfy {} offline: {}",
                        index, unreachable, env["UV_CACHE_DIR"], fmt::join(requirements, " "), what),
            "unavailable", failure ? failure->package : "", what);
      throw ProvisionError(
          fmt::format("{} cannot install {}{}: {}", kind(), fmt::join(requirements, " "),
                      failure && !failure->package.empty() ? " (package " + failure->package + ")" : "", what),
          "env-error", failure ? failure->package : "", what);
    }
    {
      ProcessSpec f = process(freeze, std::chrono::minutes(2));
      f.stdout_path = logs / "freeze.txt";
      f.stderr_path = logs / "freeze.err";
      progress.stage("freeze");
      run_process(f);
    }
    nlohmann::json installed = nlohmann::json::object();
    {
      std::ifstream in(logs / "freeze.txt");
      std::string line;
      while (std::getline(in, line)) {
        const auto eq = line.find("==");
        if (eq != std::string::npos) installed[normalise_name(line.substr(0, eq))] = line.substr(eq + 2);
      }
    }
    if (!installed.contains("transformers"))
      throw ProvisionError(fmt::format("{} reported success but transformers is not among the installed packages of "
                                       "{} (see {})",
                                       kind(), venv.string(), (logs / "freeze.txt").string()),
                           "env-error", "transformers");
    if (base_ && installed.contains("torch"))
      throw ProvisionError(
          fmt::format("torch {} was installed into the venv from the index (a requirement pulled it in), although the "
                      "base {} provides torch; see {}",
                      installed.at("torch").get<std::string>(), base_env_->id, (logs / "install.log").string()),
          "env-error", "torch");
    std::error_code ec;
    fs::remove_all(partial / "home", ec);
    fs::remove_all(partial / "tmp", ec);

    progress.stage("discover versions");
    Environment e = open(partial, nlohmann::json::object());
    discover_versions(e);
    progress.note("discovered: " + e.summary());
    if (!e.has_torch())
      throw ProvisionError(fmt::format("torch is not importable in {}: {}", e.id,
                                       e.import_errors.count("torch") ? e.import_errors.at("torch") : "?"),
                           "env-error", "torch");
    std::string torch_source;
    const std::string torch_file = e.module_files.count("torch") ? e.module_files.at("torch") : "";
    if (base_) {
      if (torch_file.starts_with(venv.string()))
        throw ProvisionError(fmt::format("torch is imported from the venv ({}), not from the base {}", torch_file,
                                         base_env_->id),
                             "env-error", "torch");
      std::string debian = "?";
      if (base_env_->manifest.contains("installed") && base_env_->manifest.at("installed").contains("python3-torch"))
        debian = base_env_->manifest.at("installed").at("python3-torch").get<std::string>();
      torch_source = fmt::format("Debian python3-torch {} of the base rootfs {} ({})", debian, base_env_->id, torch_file);
    } else {
      torch_source = fmt::format("index: torch {} installed into the venv by {}{} ({})",
                                 installed.value("torch", std::string("?")), installer,
                                 uv_ ? ", files hardlinked from the uv cache " + env["UV_CACHE_DIR"] : "", torch_file);
    }
    nlohmann::json resolved = nlohmann::json::object();
    for (const char* name : {"transformers", "huggingface-hub", "tokenizers", "safetensors", "numpy", "torch"})
      if (installed.contains(name)) resolved[name] = installed.at(name);
    nlohmann::json fields = {{"installed", installed},
                             {"resolved", resolved},
                             {"installer", installer},
                             {"requirements", requirements},
                             {"source", source},
                             {"offline", offline},
                             {"versions", versions_json(e)},
                             {"torch_source", torch_source},
                             {"layout", {{"venv", "venv"}, {"logs", "logs"}}}};
    if (uv) fields["uv"] = {{"exe", uv->exe.string()}, {"version", uv->version}, {"source", uv->source}};
    if (base_) {
      fields["base"] = base_env_->id;
      fields["base_installed"] = base_env_->manifest.value("installed", nlohmann::json::object());
    }
    return fields;
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
    env.path_var = (dir / "venv" / "bin").string() + ":" + kInsidePath;
    env.manifest = manifest;
    if (base_) {
      if (!base_env_) fail("{}: the base environment is not realised", id());
      env.rootfs = base_env_->rootfs;
      env.mounts = {dir};
    }
    apply_versions(env, manifest);
    return env;
  }

 private:
  std::string effective_index() const {
    if (!index_url_.empty()) return index_url_;
    for (const char* var : uv_ ? std::vector<const char*>{"UV_DEFAULT_INDEX", "UV_INDEX_URL"}
                               : std::vector<const char*>{"PIP_INDEX_URL"})
      if (const char* v = std::getenv(var); v && *v) return v;
    return "https://pypi.org/simple";
  }

  // PEP 503 normalised name: "huggingface_hub" -> "huggingface-hub".
  static std::string normalise_name(std::string name) {
    std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) {
      return c == '_' || c == '.' ? '-' : static_cast<char>(std::tolower(c));
    });
    return name;
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
  std::string transformers_, torch_, python_, index_url_, find_links_;
  std::string resolved_on_;  // UTC day for "latest", else empty
  std::vector<std::string> packages_;
  std::unique_ptr<EnvironmentProvider> base_;
  std::optional<Environment> base_env_;
};

}  // namespace

std::unique_ptr<EnvironmentProvider> make_pip_provider(const nlohmann::json& spec, const fs::path& cache_root,
                                                       bool use_uv, const ProviderOptions& options) {
  return std::make_unique<PipProvider>(spec, cache_root, use_uv, options);
}

}  // namespace opensci::harness::detail
