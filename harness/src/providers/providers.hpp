// Internal: the concrete environment providers and the helpers they share
// (host tool lookup, reachability checks, rootfs command lines, logged build steps, spec parsing).
#pragma once

#include <chrono>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "opensci/harness/environment.hpp"

namespace opensci::harness::detail {

// ---- spec parsing (messages name the provider and the key) ----
class SpecReader {
 public:
  SpecReader(const nlohmann::json& spec, std::string kind);
  std::string str(const std::string& key, const std::string& fallback = {}) const;
  std::string required_str(const std::string& key) const;
  std::vector<std::string> str_list(const std::string& key, const std::vector<std::string>& fallback = {}) const;
  const nlohmann::json& object(const std::string& key) const;  // required object
  bool has(const std::string& key) const { return spec_.contains(key); }
  // Fails on keys outside `allowed` (keys starting with '_' and "name"/"description" are notes).
  void check_keys(const std::vector<std::string>& allowed) const;

 private:
  const nlohmann::json& spec_;
  std::string kind_;
};

// ---- host helpers ----
// A program on the host: a path as-is, or looked up in $PATH then the sbin/bin dirs.
std::optional<std::filesystem::path> find_host_program(const std::string& name);
// "" when a TCP connection to the URL's host:port succeeds within `timeout` (file:// URLs: the
// directory must exist), else the reason.
std::string check_url_reachable(const std::string& url, std::chrono::milliseconds timeout = std::chrono::seconds(4));
// Minimal env for host tools (debootstrap, apt-get, pip, uv): PATH, LANG plus the parent's
// proxy variables (http_proxy, https_proxy, no_proxy and upper-case forms).
std::map<std::string, std::string> host_tool_env();
// host_tool_env() plus the installers' trust and index settings of the parent (SSL_CERT_FILE,
// PIP_CERT, PIP_INDEX_URL, UV_INDEX_URL, UV_DEFAULT_INDEX, ...).
std::map<std::string, std::string> index_tool_env();
// The host's CA bundle ($SSL_CERT_FILE, else the distribution's); "" when none exists. Copied
// into builds that run an installer inside a rootfs, whose own CA store lacks the host's CAs.
std::string host_ca_bundle();
// "/usr/bin/python3" -> "usr-bin-python3"
std::string sanitize_id(const std::string& text);

// ---- rootfs ----
// `argv` run chrooted into `rootfs` in a private mount namespace (unshare -m): /proc, /dev, /sys
// mounted, each of `host_dirs` rbind-mounted at its own absolute path, the outer cwd kept
// (exit 125 with a message when it is not visible inside). With `scratch_mountpoint` set, the
// rootfs is seen through an overlay whose upper layer is a tmpfs at that (existing, empty) dir,
// so runs never modify the cached rootfs; without it (builds) changes go to the rootfs itself.
ProcessSpec rootfs_spec(const std::filesystem::path& rootfs, const std::vector<std::string>& argv,
                        const std::map<std::string, std::string>& env,
                        const std::vector<std::filesystem::path>& host_dirs,
                        const std::filesystem::path& scratch_mountpoint = {});
// Runtime requirements of rootfs environments; "" when satisfied, else the reason.
std::string rootfs_runtime_problem();

// ---- logged build steps ----
// (run_step hands current_build_lock_fd() to the step's processes.)

// Runs `spec` with stdout+stderr to `log` as stage `stage`, printing heartbeats; throws
// opensci::Error naming the stage, the outcome, the log and its last lines on failure.
ProcessResult run_step(Progress& progress, const std::string& stage, const std::string& detail, ProcessSpec spec,
                       const std::filesystem::path& log);

// Versions recorded in a manifest by record_versions() -> env fields.
nlohmann::json versions_json(const Environment& env);
void apply_versions(Environment& env, const nlohmann::json& manifest);

// ---- providers ----
std::unique_ptr<EnvironmentProvider> make_debian_rootfs_provider(const nlohmann::json& spec,
                                                                 const std::filesystem::path& cache_root);
std::unique_ptr<EnvironmentProvider> make_system_provider(const nlohmann::json& spec);
std::unique_ptr<EnvironmentProvider> make_pip_provider(const nlohmann::json& spec,
                                                       const std::filesystem::path& cache_root, bool use_uv,
                                                       const ProviderOptions& options);

// ---- uv, from the index ----
// uv is never assumed installed: $OPENSCI_UV (a uv binary) when set, else a cache entry
// <cache root>/tools/uv-<hash>/ holding a venv of the host's python3 with `pip install uv`
// (built once under the cache lock, like an environment).
struct UvTool {
  std::filesystem::path exe;
  std::string version;  // "uv 0.13.9 (...)"
  std::string source;   // how it got here
};
// "" when uv is ready or can be fetched here, else why not (*unreachable: because the index
// it comes from did not answer).
std::string uv_tool_problem(const std::filesystem::path& cache_root, bool* unreachable = nullptr);
std::optional<UvTool> ready_uv_tool(const std::filesystem::path& cache_root);
UvTool ensure_uv_tool(const std::filesystem::path& cache_root, Progress& progress);
std::unique_ptr<EnvironmentProvider> make_overlay_provider(const nlohmann::json& spec,
                                                           const std::filesystem::path& cache_root,
                                                           const ProviderOptions& options);
// Resolves the Debian mirror: $OPENSCI_DEBIAN_MIRROR, else the host's apt sources; "" + reason.
std::string debian_mirror(std::string& why_not);

}  // namespace opensci::harness::detail
