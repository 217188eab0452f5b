// `env`: provision, inspect, list and use the isolated Python environments.
//   env provision [--spec JSON_OR_FILE]   exit 0 ready, 77 unavailable (reason printed), 1 failed
//   env status    [--spec JSON_OR_FILE]   exit 0 available (ready or buildable), 77 unavailable
//   env list                              cached entries with their manifest summary
//   env run       [--spec ...] [--dir D]... [--env K=V]... -- python args   (debug helper)
// Without --spec the embedded default {"provider": "debian-rootfs", "suite": "sid"} is used.
#include <fmt/core.h>
#include <stdlib.h>
#include <unistd.h>

#include <memory>
#include <sstream>

#include "commands.hpp"
#include "opensci/error.hpp"
#include "opensci/harness/environment.hpp"

namespace opensci::cli {
namespace {
namespace fs = std::filesystem;
using harness::Progress;

constexpr int kExitUnavailable = 77;

struct EnvArgs {
  std::string spec;
  std::string cache_dir;
  bool quiet = false;
  std::string name, required = "no";
};

// OPENSCI_OPTIONAL_ENVS: comma-separated environment names (or "all") a run may leave Not Run
// although the matrix requires them.
bool env_is_optional(const std::string& name) {
  const char* v = std::getenv("OPENSCI_OPTIONAL_ENVS");
  if (!v) return false;
  std::stringstream ss(v);
  for (std::string item; std::getline(ss, item, ',');)
    if (item == "all" || item == name) return true;
  return false;
}

void add_common(CLI::App* cmd, EnvArgs& a) {
  cmd->add_option("--spec", a.spec, "environment spec: JSON object or file (default: debian-rootfs sid)");
  cmd->add_option("--cache-dir", a.cache_dir, "cache root (default: $OPENSCI_CACHE_DIR or ~/.cache/opensci-compat)");
}

std::unique_ptr<harness::EnvironmentProvider> provider_from(const EnvArgs& a) {
  const auto spec = a.spec.empty() ? harness::default_environment_spec() : harness::load_spec(a.spec);
  return harness::make_provider(spec,
                                harness::ProviderOptions{a.cache_dir.empty() ? fs::path() : fs::path(a.cache_dir)});
}

fs::path cache_root_of(const EnvArgs& a) {
  return a.cache_dir.empty() ? harness::default_cache_root() : fs::absolute(a.cache_dir);
}

void print_environment(const harness::Environment& env) {
  fmt::print("ready: {}\n", env.summary());
  fmt::print("  root:   {}\n", env.root.string());
  if (!env.rootfs.empty()) fmt::print("  rootfs: {}\n", env.rootfs.string());
  fmt::print("  python: {}\n", env.python_exe.string());
  for (const auto& p : env.python_path) fmt::print("  PYTHONPATH: {}\n", p.string());
  if (env.manifest.is_object() && env.manifest.contains("built_at"))
    fmt::print("  built:  {} in {} s (manifest {})\n", env.manifest.value("built_at", "?"),
               env.manifest.value("build_seconds", 0.0), (env.root / "READY").string());
  if (env.manifest.is_object() && env.manifest.contains("installed"))
    for (const auto& [name, version] : env.manifest.at("installed").items())
      fmt::print("  installed: {} {}\n", name, version.get<std::string>());
}

}  // namespace

void add_env_command(CLI::App& app) {
  auto* env = app.add_subcommand("env", "Provision and inspect the isolated Python environments");
  env->require_subcommand(1);

  {
    auto a = std::make_shared<EnvArgs>();
    auto* cmd =
        env->add_subcommand("provision", "Build (or reuse) an environment; exit 0 ready, 77 unavailable, 1 failed");
    add_common(cmd, *a);
    cmd->add_flag("--quiet", a->quiet, "no progress lines");
    cmd->add_option("--name", a->name, "the matrix's name of the environment (for messages and OPENSCI_OPTIONAL_ENVS)");
    cmd->add_option("--required", a->required,
                    "no: unavailable = Not Run (77); always: unavailable = failure; when-reachable: failure unless "
                    "the index/mirror it needs did not answer. OPENSCI_OPTIONAL_ENVS=<name>,...|all relaxes it")
        ->check(CLI::IsMember({"no", "always", "when-reachable"}));
    cmd->callback([a] {
      auto provider = provider_from(*a);
      const auto availability = provider->probe();
      if (!availability) {
        const auto name = a->name.empty() ? provider->id() : a->name;
        const bool optional = env_is_optional(name);
        const bool must = !optional && (a->required == "always" || (a->required == "when-reachable" && !availability.unreachable));
        if (must) {
          fmt::print("unavailable: {}: {}\n", provider->id(), availability.reason);
          fmt::print(stderr,
                     "failed: the matrix requires environment '{}' ({}) and it cannot be provided here: {} — a run "
                     "that cannot build it would test nothing live. To let it be Not Run on this machine, set "
                     "OPENSCI_OPTIONAL_ENVS={} (or =all).\n",
                     name, a->required == "always" ? "required: always" : "required unless its index is unreachable",
                     availability.reason, name);
          throw CLI::RuntimeError(1);
        }
        fmt::print("unavailable: {}: {}{}\n", provider->id(), availability.reason,
                   a->required != "no" ? fmt::format(" (Not Run: {})", optional ? "listed in OPENSCI_OPTIONAL_ENVS"
                                                                              : "its index/mirror is unreachable")
                                      : std::string());
        throw CLI::RuntimeError(kExitUnavailable);
      }
      Progress progress("env " + provider->id(), a->quiet ? nullptr : stderr);
      if (!availability.ready) progress.note(availability.reason);
      try {
        const auto environment = provider->realise(progress);
        print_environment(environment);
        if (!a->quiet) progress.note(fmt::format("done in {:.1f} s", progress.elapsed()));
      } catch (const Error& e) {
        fmt::print(stderr, "failed: {}: {}\n", provider->id(), e.what());
        throw CLI::RuntimeError(1);
      }
    });
  }

  {
    auto a = std::make_shared<EnvArgs>();
    auto* cmd = env->add_subcommand("status", "Whether an environment is ready, buildable or unavailable (and why)");
    add_common(cmd, *a);
    cmd->callback([a] {
      auto provider = provider_from(*a);
      const auto availability = provider->probe();
      fmt::print("provider: {}\nid: {}\nrequest: {}\n", provider->kind(), provider->id(), provider->request().dump());
      if (const auto* cached = dynamic_cast<const harness::CachedProvider*>(provider.get()))
        fmt::print("cache entry: {}\n", cached->cache_dir().string());
      fmt::print("state: {}\nreason: {}\n",
                 !availability        ? "unavailable"
                 : availability.ready ? "ready"
                                      : "available (not provisioned yet)",
                 availability.reason);
      if (const auto* cached = dynamic_cast<const harness::CachedProvider*>(provider.get())) {
        if (const auto manifest = harness::read_ready_manifest(cached->cache_dir()))
          fmt::print("manifest: {}\n", manifest->dump(2));
      }
      if (!availability) throw CLI::RuntimeError(kExitUnavailable);
    });
  }

  {
    auto a = std::make_shared<EnvArgs>();
    auto* cmd = env->add_subcommand("list", "Cached environments with their manifest summary");
    cmd->add_option("--cache-dir", a->cache_dir, "cache root (default: $OPENSCI_CACHE_DIR or ~/.cache/opensci-compat)");
    cmd->callback([a] {
      const auto root = cache_root_of(*a);
      const auto entries = harness::list_cached_environments(root);
      fmt::print("cache: {}\n", (root / "envs").string());
      if (entries.empty()) fmt::print("(no environments)\n");
      for (const auto& e : entries) fmt::print("{:<14} {}\n{:<14}   {}\n", e.state, e.name, "", e.detail);
    });
  }

  {
    struct RunArgs : EnvArgs {
      std::vector<std::string> dirs, env_pairs, args;
      double timeout = 3600;
    };
    auto a = std::make_shared<RunArgs>();
    auto* cmd = env->add_subcommand("run", "Run python in an environment (debug helper): env run [opts] -- args...");
    add_common(cmd, *a);
    cmd->add_option("--dir", a->dirs, "host directory to make visible (the cwd always is)");
    cmd->add_option("--env", a->env_pairs, "extra KEY=VALUE for the child");
    cmd->add_option("--timeout", a->timeout, "seconds (default 3600)");
    cmd->add_option("args", a->args, "python arguments (after --)")->required();
    cmd->callback([a] {
      auto provider = provider_from(*a);
      const auto availability = provider->probe();
      if (!availability) {
        fmt::print(stderr, "unavailable: {}: {}\n", provider->id(), availability.reason);
        throw CLI::RuntimeError(kExitUnavailable);
      }
      Progress progress("env " + provider->id(), stderr);
      const auto environment = provider->realise(progress);
      const fs::path runs = cache_root_of(*a) / "runs";
      fs::create_directories(runs);
      std::string templ = (runs / "run-XXXXXX").string();
      if (!::mkdtemp(templ.data())) fail("env run: cannot create a run dir under {}", runs.string());
      const fs::path run_dir(templ);
      auto extra = harness::private_run_env(run_dir);
      for (const auto& kv : a->env_pairs) {
        const auto eq = kv.find('=');
        if (eq == std::string::npos || eq == 0) fail("env run: --env expects KEY=VALUE, found \"{}\"", kv);
        extra[kv.substr(0, eq)] = kv.substr(eq + 1);
      }
      std::vector<fs::path> dirs = {fs::current_path()};
      for (const auto& d : a->dirs) dirs.push_back(fs::absolute(d));
      auto spec = environment.python_args(a->args, dirs, extra,
                                          std::chrono::milliseconds(static_cast<int64_t>(a->timeout * 1000)));
      spec.cwd = fs::current_path();
      const auto result = harness::run_process(spec);
      std::error_code ec;
      fs::remove_all(run_dir, ec);
      if (!result.ok()) fmt::print(stderr, "env run: python {}\n", result.describe());
      if (!result.started) throw CLI::RuntimeError(1);
      if (result.signal != 0) throw CLI::RuntimeError(128 + result.signal);
      if (result.timed_out) throw CLI::RuntimeError(124);
      if (result.exit_code != 0) throw CLI::RuntimeError(result.exit_code);
    });
  }
}

}  // namespace opensci::cli
