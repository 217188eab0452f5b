// debian-rootfs: a Debian rootfs (debootstrap minbase + apt packages, e.g. python3-torch and
// python3-transformers from sid) built once into the cache and run chrooted in a private mount
// namespace.
#include <fmt/core.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

#include "opensci/error.hpp"
#include "providers.hpp"

namespace opensci::harness::detail {
namespace fs = std::filesystem;
namespace {

// Bump when the build recipe changes in a way that changes the result: new cache entries.
constexpr int kRecipe = 1;
const std::vector<std::string> kDefaultPackages = {"python3-transformers", "python3-torch", "libopenblas0-pthread"};
const char* kInsidePath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

class DebianRootfsProvider final : public CachedProvider {
 public:
  DebianRootfsProvider(const nlohmann::json& spec, fs::path cache_root) : CachedProvider(std::move(cache_root)) {
    SpecReader r(spec, "debian-rootfs");
    r.check_keys({"suite", "packages", "mirror"});
    suite_ = r.str("suite", "sid");
    if (!std::regex_match(suite_, std::regex("[a-z0-9][a-z0-9.-]*")))
      fail("debian-rootfs environment spec: \"suite\" must be a Debian suite name like sid or trixie, found \"{}\"",
           suite_);
    auto packages = r.str_list("packages", kDefaultPackages);
    for (const auto& p : packages)
      if (!std::regex_match(p, std::regex("[a-z0-9][a-z0-9+.:~=-]*")))
        fail("debian-rootfs environment spec: \"{}\" in \"packages\" is not a Debian package name", p);
    // torch without the pthread OpenBLAS falls back to the reference BLAS (~16x slower).
    if (std::find(packages.begin(), packages.end(), "python3-torch") != packages.end())
      packages.push_back("libopenblas0-pthread");
    std::set<std::string> unique(packages.begin(), packages.end());
    packages_.assign(unique.begin(), unique.end());
    mirror_ = r.str("mirror");
  }

  std::string kind() const override { return "debian-rootfs"; }
  std::string id() const override { return "debian-" + suite_; }
  nlohmann::json request() const override {
    // The mirror is not part of the identity: the same suite + packages from any mirror.
    return {{"provider", "debian-rootfs"},
            {"suite", suite_},
            {"variant", "minbase"},
            {"packages", packages_},
            {"recipe", kRecipe}};
  }

  Availability probe() const override {
    const std::string runtime = rootfs_runtime_problem();
    if (is_ready()) {
      if (!runtime.empty())
        return Availability::no(fmt::format("cached at {} but cannot run it: {}", cache_dir().string(), runtime));
      return Availability::yes(fmt::format("ready at {}", cache_dir().string()), true);
    }
    if (!runtime.empty()) return Availability::no(runtime);
    std::string tool_note;
    if (!find_host_program("debootstrap")) {
      if (!find_host_program("apt-get"))
        return Availability::no(
            "debootstrap not found (looked in PATH and /usr/sbin) and there is no apt-get to install it");
      tool_note = "; debootstrap will be installed with apt-get";
    }
    std::string why;
    const std::string mirror = this->mirror(why);
    if (mirror.empty()) return Availability::no(why);
    if (const auto problem = check_url_reachable(mirror); !problem.empty())
      return Availability::offline(fmt::format("Debian mirror {} is not reachable: {}", mirror, problem));
    return Availability::yes(fmt::format("will build {} ({}: {}) from {} into {} (about 2.5 GB){}", id(), suite_,
                                         fmt::join(packages_, " "), mirror, cache_dir().string(), tool_note));
  }

 protected:
  nlohmann::json build(const fs::path& partial, Progress& progress) override {
    progress.set_label("env " + id());
    const fs::path logs = partial / "logs";
    const fs::path root = partial / "rootfs";
    std::string why;
    const std::string mirror = this->mirror(why);
    if (mirror.empty()) fail("{}", why);

    auto debootstrap = find_host_program("debootstrap");
    if (!debootstrap) {
      ProcessSpec install;
      install.argv = {"apt-get", "install", "-y", "--no-install-recommends", "debootstrap"};
      install.env = host_tool_env();
      install.env["DEBIAN_FRONTEND"] = "noninteractive";
      install.timeout = std::chrono::minutes(10);
      run_step(progress, "install debootstrap", "apt-get install debootstrap on the host", install,
               logs / "host-apt-install-debootstrap.log");
      debootstrap = find_host_program("debootstrap");
      if (!debootstrap) fail("apt-get installed debootstrap but it is still not found in PATH or /usr/sbin");
    }

    // debootstrap mounts /proc and /sys in the target itself: run it in a private mount
    // namespace so a killed build leaves no mounts behind.
    ProcessSpec boot;
    boot.argv = {"unshare",
                 "--mount",
                 "--propagation",
                 "private",
                 debootstrap->string(),
                 "--variant=minbase",
                 "--include=ca-certificates",
                 suite_,
                 root.string(),
                 mirror};
    boot.env = host_tool_env();
    boot.timeout = std::chrono::minutes(30);
    run_step(progress, "debootstrap", fmt::format("{} minbase from {}", suite_, mirror), boot,
             logs / "debootstrap.log");

    progress.stage("configure apt", "host apt.conf.d (the mirror may be a frozen snapshot), resolv.conf, policy-rc.d");
    std::vector<std::string> copied;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator("/etc/apt/apt.conf.d", ec)) {
      if (!e.is_regular_file()) continue;
      fs::copy_file(e.path(), root / "etc/apt/apt.conf.d" / e.path().filename(), fs::copy_options::overwrite_existing,
                    ec);
      if (ec) fail("copying {} into {}: {}", e.path().string(), (root / "etc/apt/apt.conf.d").string(), ec.message());
      copied.push_back(e.path().filename().string());
    }
    std::sort(copied.begin(), copied.end());
    if (!fs::exists(root / "etc/resolv.conf") && fs::exists("/etc/resolv.conf"))
      fs::copy_file("/etc/resolv.conf", root / "etc/resolv.conf", ec);
    {
      std::ofstream policy(root / "usr/sbin/policy-rc.d");
      policy << "#!/bin/sh\n# opensci-compat: no services start inside this rootfs\nexit 101\n";
    }
    fs::permissions(root / "usr/sbin/policy-rc.d", fs::perms::owner_all | fs::perms::group_read |
                                                       fs::perms::group_exec | fs::perms::others_read |
                                                       fs::perms::others_exec);

    std::map<std::string, std::string> apt_env = host_tool_env();
    apt_env["PATH"] = kInsidePath;
    apt_env["DEBIAN_FRONTEND"] = "noninteractive";
    apt_env["HOME"] = "/root";
    auto in_root = [&](std::vector<std::string> argv, std::chrono::minutes timeout) {
      ProcessSpec spec = rootfs_spec(root, argv, apt_env, {});
      spec.cwd = "/";
      spec.timeout = timeout;
      return spec;
    };
    run_step(progress, "apt-get update", "", in_root({"apt-get", "update"}, std::chrono::minutes(10)),
             logs / "apt-update.log");
    std::vector<std::string> install = {"apt-get", "install", "-y", "--no-install-recommends"};
    install.insert(install.end(), packages_.begin(), packages_.end());
    run_step(progress, "apt-get install", fmt::format("{}", fmt::join(packages_, " ")),
             in_root(install, std::chrono::minutes(60)), logs / "apt-install.log");
    run_step(progress, "apt-get clean", "", in_root({"apt-get", "clean"}, std::chrono::minutes(5)),
             logs / "apt-clean.log");

    // What was installed, as dpkg records it.
    std::vector<std::string> query = {"dpkg-query",
                                      "-W",
                                      "-f",
                                      "${Package}\\t${Version}\\t${db:Status-Abbrev}\\n",
                                      "python3",
                                      "python3-torch",
                                      "python3-transformers",
                                      "libopenblas0-pthread"};
    for (const auto& p : packages_) query.push_back(p.substr(0, p.find('=')));
    const fs::path dpkg_log = logs / "dpkg-query.log";
    ProcessSpec q = in_root(query, std::chrono::minutes(2));
    q.stdout_path = dpkg_log;
    q.stderr_path = logs / "dpkg-query.err";
    progress.stage("dpkg versions");
    run_process(q);  // exits 1 when a listed package is unknown; the known ones are still printed
    nlohmann::json installed = nlohmann::json::object();
    std::ifstream in(dpkg_log);
    std::string line;
    while (std::getline(in, line)) {
      std::istringstream ls(line);
      std::string name, version, status;
      if (std::getline(ls, name, '\t') && std::getline(ls, version, '\t') && std::getline(ls, status) &&
          status.rfind("ii", 0) == 0)
        installed[name] = version;
    }
    if (!installed.contains("python3"))
      fail("python3 is not installed in {} (see {})", root.string(), dpkg_log.string());

    progress.stage("discover versions", "import torch, transformers inside the rootfs");
    fs::create_directories(partial / "run");
    Environment env = open(partial, nlohmann::json::object());
    discover_versions(env);
    progress.note("discovered: " + env.summary());
    return {{"suite", suite_},
            {"mirror", mirror},
            {"packages", packages_},
            {"installed", installed},
            {"apt_conf_copied", copied},
            {"versions", versions_json(env)},
            {"layout", {{"rootfs", "rootfs"}, {"run_mountpoint", "run"}, {"logs", "logs"}}}};
  }

  Environment open(const fs::path& dir, const nlohmann::json& manifest) const override {
    Environment env;
    env.provider = kind();
    env.id = dir.filename().string();
    if (env.id.size() > 8 && env.id.compare(env.id.size() - 8, 8, ".partial") == 0) env.id.resize(env.id.size() - 8);
    env.root = dir;
    env.rootfs = dir / "rootfs";
    env.python_exe = "/usr/bin/python3";
    env.path_var = "/usr/local/bin:/usr/bin:/bin";
    env.manifest = manifest;
    apply_versions(env, manifest);
    return env;
  }

 private:
  std::string mirror(std::string& why) const {
    if (!mirror_.empty()) return mirror_;
    return debian_mirror(why);
  }

  std::string suite_;
  std::vector<std::string> packages_;
  std::string mirror_;
};

}  // namespace

std::unique_ptr<EnvironmentProvider> make_debian_rootfs_provider(const nlohmann::json& spec,
                                                                 const fs::path& cache_root) {
  return std::make_unique<DebianRootfsProvider>(spec, cache_root);
}

}  // namespace opensci::harness::detail
