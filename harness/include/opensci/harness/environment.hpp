// Isolated Python environments in which transformers captures run.
//
// A provider turns a JSON spec (from matrix/matrix.json) into a realised Environment:
//   {"provider": "debian-rootfs", "suite": "sid", "packages": [...]}     (the embedded default)
//   {"provider": "system", "python": "/opt/torch/.venv/bin/python"}
//   {"provider": "venv", "transformers": "4.57.6", "find_links": "${OPENSCI_WHEELHOUSE}"}
//   {"provider": "uv", "transformers": "4.48.0"}
//   {"provider": "overlay", "base": {...}, "transformers_src": "${OPENSCI_TRANSFORMERS_SRC_4_57}"}
// Strings may use ${VAR} / ${VAR:-default}; an unset variable makes the provider unavailable
// with a reason naming it. Everything a provider builds lives in one cache entry
// <cache root>/envs/<id>-<request hash>/ built under a lock into a .partial dir and published
// by an atomic rename together with its READY manifest (see ensure_cache_entry).
#pragma once

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "opensci/harness/process.hpp"

namespace opensci::harness {

// Whether a provider can be used here, and why not.
struct Availability {
  bool available = false;
  bool ready = false;  // already realised (realise() will not build anything)
  std::string reason;  // unavailable: why; available: what realise() will use or do
  // Unavailable only because a network resource it needs (a package index, a mirror) did not
  // answer: a run that requires the environment "when-reachable" may then leave it Not Run.
  bool unreachable = false;

  static Availability yes(std::string note, bool ready = false) { return {true, ready, std::move(note), false}; }
  static Availability no(std::string why) { return {false, false, std::move(why), false}; }
  static Availability offline(std::string why) { return {false, false, std::move(why), true}; }
  explicit operator bool() const { return available; }
};

// Progress lines on a stream (stderr by default; nullptr = silent), e.g.
//   [env debian-sid] +12.3s stage 2 apt-get install: python3-torch ... (log: .../apt-install.log)
//   [env debian-sid] +42.3s   ... apt-get install still running (30 s)
// It also records stage durations (they go into the manifest).
class Progress {
 public:
  explicit Progress(std::string label, std::FILE* out = stderr);
  void stage(const std::string& name, const std::string& detail = {});
  void note(const std::string& text);
  double elapsed() const;
  // For ProcessSpec::heartbeat: prints "... <stage> still running (N s)".
  std::function<void(double)> heartbeat();
  nlohmann::json stages() const;  // [{"name", "seconds"}], the current stage counted up to now
  const std::string& label() const { return label_; }
  void set_label(std::string label) { label_ = std::move(label); }

 private:
  std::string label_;
  std::FILE* out_;
  std::chrono::steady_clock::time_point start_;
  struct Stage {
    std::string name;
    std::chrono::steady_clock::time_point begin;
  };
  std::vector<Stage> stages_;
};

// A realised environment. Versions are discovered by running its python, never assumed.
struct Environment {
  std::string provider;              // "debian-rootfs", "system", "venv", "uv", "overlay"
  std::string id;                    // cache entry name ("debian-sid-3f2a...") or "system-usr-bin-python3"
  std::string python_version;        // "3.14.8"
  std::string torch_version;         // "" = not importable (see import_errors)
  std::string transformers_version;  // "" = not importable (see import_errors)
  std::map<std::string, std::string> import_errors;  // module -> "ModuleNotFoundError: ..." etc.
  std::filesystem::path root;                        // the cache entry dir (or the interpreter's prefix for system)
  std::filesystem::path python_exe;                  // as seen inside the environment
  std::filesystem::path rootfs;  // non-empty: processes run chrooted here, in a private mount namespace
  std::vector<std::filesystem::path> python_path;  // put FIRST on PYTHONPATH (overlay)
  std::string path_var;                            // PATH inside the environment
  nlohmann::json manifest;                         // READY manifest of the cache entry (null when none)

  // A process running `python script args...` in this environment.
  //  - host_dirs are visible at the SAME absolute paths inside (rootfs: recursive bind mounts in a
  //    private mount namespace that vanishes with the process; plain interpreters: nothing to do).
  //    Existing absolute dirs named by HOME/TMPDIR/HF_HOME/HF_MODULES_CACHE are added automatically.
  //  - The environment is clean: LANG=C.UTF-8, PATH of the environment, HF_HUB_OFFLINE=1,
  //    TRANSFORMERS_OFFLINE=1, PYTHONDONTWRITEBYTECODE=1, PYTHONNOUSERSITE=1, PYTHONPATH (overlay),
  //    then extra_env, which must set HOME, TMPDIR and HF_HOME (a private per-run dir, see
  //    private_run_env()); OMP_NUM_THREADS etc. also go through extra_env.
  //  - cwd defaults to HOME; a caller may change it (for a rootfs it must be visible inside).
  //  - stdout/stderr paths are left for the caller to set.
  ProcessSpec python(const std::filesystem::path& script, std::vector<std::string> args,
                     const std::vector<std::filesystem::path>& host_dirs,
                     const std::map<std::string, std::string>& extra_env, std::chrono::milliseconds timeout) const;
  // `python args...` (e.g. {"-c", "print(1)"}).
  ProcessSpec python_args(std::vector<std::string> args, const std::vector<std::filesystem::path>& host_dirs,
                          const std::map<std::string, std::string>& extra_env, std::chrono::milliseconds timeout) const;
  // Any command; argv[0] is looked up in the environment's PATH (inside the rootfs for a rootfs).
  ProcessSpec command(std::vector<std::string> argv, const std::vector<std::filesystem::path>& host_dirs,
                      const std::map<std::string, std::string>& extra_env, std::chrono::milliseconds timeout) const;

  bool has_torch() const { return !torch_version.empty(); }
  bool has_transformers() const { return !transformers_version.empty(); }
  // "debian-sid-3f2a...: python 3.14.8, torch 2.14.1, transformers 5.12.1"
  std::string summary() const;
};

// HOME, TMPDIR, HF_HOME, HF_MODULES_CACHE, XDG_CACHE_HOME under run_dir (directories created).
std::map<std::string, std::string> private_run_env(const std::filesystem::path& run_dir);

// Runs the environment's python to fill python/torch/transformers versions and import_errors.
// Throws opensci::Error (with the stderr tail) when python itself cannot run.
void discover_versions(Environment& env, std::chrono::milliseconds timeout = std::chrono::minutes(3));

class EnvironmentProvider {
 public:
  virtual ~EnvironmentProvider() = default;
  virtual std::string kind() const = 0;                 // "debian-rootfs"
  virtual std::string id() const = 0;                   // "debian-sid"
  virtual nlohmann::json request() const = 0;           // the normalised, expanded spec (cache key)
  virtual Availability probe() const = 0;               // cheap; never builds
  virtual Environment realise(Progress& progress) = 0;  // builds when needed; throws opensci::Error on failure
};

// Providers whose environment is built once into the cache. Subclasses implement build() and
// open(); the cache entry, lock, .partial dir and READY manifest are handled here, once.
class CachedProvider : public EnvironmentProvider {
 public:
  explicit CachedProvider(std::filesystem::path cache_root);
  std::string cache_name() const;           // id() + "-" + request_hash(request())
  std::filesystem::path cache_dir() const;  // <cache root>/envs/<cache_name()>
  const std::filesystem::path& cache_root() const { return cache_root_; }
  bool is_ready() const;  // READY manifest present
  Environment realise(Progress& progress) override;

 protected:
  // Builds into `partial` (an existing empty dir); returns manifest fields to record
  // (e.g. "installed", "versions"). Logs belong in partial/"logs".
  virtual nlohmann::json build(const std::filesystem::path& partial, Progress& progress) = 0;
  // The environment of a READY entry at `dir` (which may be a .partial dir during build()).
  virtual Environment open(const std::filesystem::path& dir, const nlohmann::json& manifest) const = 0;

 private:
  std::filesystem::path cache_root_;
};

// ---- the cache machinery (shared by all cached providers) ----

struct CacheEntry {
  std::filesystem::path dir;
  nlohmann::json manifest;
  bool built_now = false;
};

// Returns the READY entry <envs_dir>/<name>, building it when missing:
//  1. READY present -> returned without locking (entries only appear complete, by rename).
//  2. Otherwise flock(<name>.lock) (waiting with progress notes while another process builds),
//     re-check READY, remove a leftover <name>.partial (refusing when /proc/self/mountinfo shows
//     anything mounted under it), build into a fresh <name>.partial, write READY.tmp, fsync,
//     rename to READY, rename <name>.partial -> <name>, fsync the dir.
//  3. A failed build keeps its logs in <name>.failed-logs and removes the partial dir.
// The manifest gets: schema, name, request, request_hash, built_at (UTC), build_seconds,
// stages, host, plus the fields returned by build.
CacheEntry ensure_cache_entry(
    const std::filesystem::path& envs_dir, const std::string& name, const nlohmann::json& request, Progress& progress,
    const std::function<nlohmann::json(const std::filesystem::path& partial, Progress&)>& build);

// The flock fd of the cache entry being built by ensure_cache_entry on this thread (-1 outside
// a build). Build steps pass it in ProcessSpec::inherit_fds, so a build orphaned by a killed
// harness keeps the entry locked until its last process is gone (nobody deletes a .partial
// that is still being written).
int current_build_lock_fd();

// The READY manifest of an entry dir, or nullopt when absent/unreadable.
std::optional<nlohmann::json> read_ready_manifest(const std::filesystem::path& dir);

// Mount points (from /proc/self/mountinfo) at or below `dir`.
std::vector<std::filesystem::path> mounts_under(const std::filesystem::path& dir);

// 16 hex digits (FNV-1a 64) of the canonical JSON dump.
std::string request_hash(const nlohmann::json& request);

// ${OPENSCI_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/opensci-compat}
std::filesystem::path default_cache_root();

struct CachedEnvironmentInfo {
  std::string name;
  std::filesystem::path dir;
  std::string state;  // "ready", "building", "stale-partial", "failed"
  std::string detail;
  std::optional<nlohmann::json> manifest;
};
std::vector<CachedEnvironmentInfo> list_cached_environments(const std::filesystem::path& cache_root);

// ---- specs ----

// Expands ${VAR} and ${VAR:-default} from the process environment; names of unset variables
// (without default) are appended to `missing` and expand to "".
std::string expand_vars(const std::string& text, std::vector<std::string>& missing);

struct ProviderOptions {
  std::filesystem::path cache_root;  // empty = default_cache_root()
};

// {"provider": "debian-rootfs", "suite": "sid"}
nlohmann::json default_environment_spec();

// Builds a provider from a spec. Throws opensci::Error for a malformed spec (unknown provider,
// unknown key, wrong type). A spec referring to an unset ${VAR} yields a provider whose probe()
// is unavailable with a reason naming the variable and whose realise() throws that reason.
std::unique_ptr<EnvironmentProvider> make_provider(const nlohmann::json& spec, const ProviderOptions& options = {});

// Parses --spec: a JSON object text, or a path to a file holding one.
nlohmann::json load_spec(const std::string& json_or_file);

}  // namespace opensci::harness
