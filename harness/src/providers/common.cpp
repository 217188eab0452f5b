// Helpers shared by the providers: spec parsing, host tool lookup, reachability checks,
// rootfs command lines and logged build steps.
#include <fcntl.h>
#include <fmt/core.h>
#include <fmt/format.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <fstream>
#include <set>
#include <sstream>
#include <system_error>

#include "opensci/error.hpp"
#include "providers.hpp"

namespace opensci::harness::detail {
namespace fs = std::filesystem;

// ---------------------------------------------------------------- SpecReader

SpecReader::SpecReader(const nlohmann::json& spec, std::string kind) : spec_(spec), kind_(std::move(kind)) {}

std::string SpecReader::str(const std::string& key, const std::string& fallback) const {
  if (!spec_.contains(key) || spec_.at(key).is_null()) return fallback;
  if (!spec_.at(key).is_string())
    fail("{} environment spec: \"{}\" must be a string, found {}: {}", kind_, key, spec_.at(key).type_name(),
         spec_.at(key).dump());
  return spec_.at(key).get<std::string>();
}

std::string SpecReader::required_str(const std::string& key) const {
  const std::string value = str(key);
  if (value.empty()) fail("{} environment spec: missing \"{}\" in {}", kind_, key, spec_.dump());
  return value;
}

std::vector<std::string> SpecReader::str_list(const std::string& key, const std::vector<std::string>& fallback) const {
  if (!spec_.contains(key)) return fallback;
  const auto& v = spec_.at(key);
  if (!v.is_array() || !std::all_of(v.begin(), v.end(), [](const auto& e) { return e.is_string(); }))
    fail("{} environment spec: \"{}\" must be a list of strings, found {}", kind_, key, v.dump());
  return v.get<std::vector<std::string>>();
}

const nlohmann::json& SpecReader::object(const std::string& key) const {
  if (!spec_.contains(key) || !spec_.at(key).is_object())
    fail("{} environment spec: \"{}\" must be a JSON object (an environment spec), found {}", kind_, key,
         spec_.contains(key) ? spec_.at(key).dump() : std::string("nothing"));
  return spec_.at(key);
}

void SpecReader::check_keys(const std::vector<std::string>& allowed) const {
  for (const auto& [key, value] : spec_.items()) {
    if (key == "provider" || key == "name" || key == "description" || (!key.empty() && key[0] == '_')) continue;
    if (std::find(allowed.begin(), allowed.end(), key) == allowed.end())
      fail("{} environment spec: unknown key \"{}\" (allowed: provider, {})", kind_, key, fmt::join(allowed, ", "));
  }
}

// ---------------------------------------------------------------- host helpers

std::optional<fs::path> find_host_program(const std::string& name) {
  auto executable = [](const fs::path& p) {
    struct stat st {};
    return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(p.c_str(), X_OK) == 0;
  };
  if (name.find('/') != std::string::npos) {
    if (executable(name)) return fs::path(name);
    return std::nullopt;
  }
  std::string dirs;
  if (const char* path = std::getenv("PATH")) dirs = path;
  dirs += ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
  std::stringstream ss(dirs);
  std::string dir;
  while (std::getline(ss, dir, ':')) {
    if (dir.empty()) continue;
    const fs::path candidate = fs::path(dir) / name;
    if (executable(candidate)) return candidate;
  }
  return std::nullopt;
}

std::string check_url_reachable(const std::string& url, std::chrono::milliseconds timeout) {
  const auto scheme_end = url.find("://");
  if (scheme_end == std::string::npos) return fmt::format("'{}' is not a URL (expected scheme://host/...)", url);
  const std::string scheme = url.substr(0, scheme_end);
  std::string rest = url.substr(scheme_end + 3);
  if (scheme == "file") {
    std::error_code ec;
    return fs::is_directory(rest, ec) ? "" : fmt::format("{} is not a directory", rest);
  }
  std::string hostport = rest.substr(0, rest.find('/'));
  if (const auto at = hostport.rfind('@'); at != std::string::npos) hostport = hostport.substr(at + 1);
  std::string host = hostport, port = scheme == "https" ? "443" : "80";
  if (!hostport.empty() && hostport[0] == '[') {
    const auto close = hostport.find(']');
    host = hostport.substr(1, close - 1);
    if (close + 1 < hostport.size() && hostport[close + 1] == ':') port = hostport.substr(close + 2);
  } else if (const auto colon = hostport.rfind(':'); colon != std::string::npos) {
    host = hostport.substr(0, colon);
    port = hostport.substr(colon + 1);
  }
  if (host.empty()) return fmt::format("no host in URL '{}'", url);
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (const int rc = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &res); rc != 0)
    return fmt::format("cannot resolve {}: {}", host, ::gai_strerror(rc));
  std::string last_error = "no address";
  for (addrinfo* ai = res; ai; ai = ai->ai_next) {
    const int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) continue;
    int rc = ::connect(fd, ai->ai_addr, ai->ai_addrlen);
    if (rc != 0 && errno == EINPROGRESS) {
      pollfd p{fd, POLLOUT, 0};
      int n;
      do n = ::poll(&p, 1, static_cast<int>(timeout.count()));
      while (n < 0 && errno == EINTR);
      if (n == 1) {
        int err = 0;
        socklen_t len = sizeof err;
        ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
        rc = err == 0 ? 0 : -1;
        if (err) last_error = std::error_code(err, std::generic_category()).message();
      } else {
        last_error = fmt::format("no answer within {} ms", timeout.count());
      }
    } else if (rc != 0) {
      last_error = std::error_code(errno, std::generic_category()).message();
    }
    ::close(fd);
    if (rc == 0) {
      ::freeaddrinfo(res);
      return "";
    }
  }
  ::freeaddrinfo(res);
  return fmt::format("cannot connect to {}:{}: {}", host, port, last_error);
}

std::map<std::string, std::string> host_tool_env() {
  std::map<std::string, std::string> env{{"PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
                                         {"LANG", "C.UTF-8"}};
  for (const char* key : {"http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"})
    if (const char* v = std::getenv(key)) env[key] = v;
  return env;
}

std::map<std::string, std::string> index_tool_env() {
  auto env = host_tool_env();
  // Trust and index configuration of the user's installers (a TLS-intercepting proxy's CA, a
  // private index) travel with them; everything else of the parent's environment stays out.
  for (const char* key : {"SSL_CERT_FILE", "SSL_CERT_DIR", "PIP_CERT", "REQUESTS_CA_BUNDLE", "PIP_INDEX_URL",
                          "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_DEFAULT_TIMEOUT", "UV_INDEX_URL",
                          "UV_DEFAULT_INDEX", "UV_INDEX", "UV_EXTRA_INDEX_URL", "UV_NATIVE_TLS", "UV_INSECURE_HOST",
                          "UV_HTTP_TIMEOUT"})
    if (const char* v = std::getenv(key); v && *v) env[key] = v;
  // Without explicit settings, the machine's own trust store: pip in a fresh venv (how uv itself is
  // installed) would otherwise use its vendored certifi and refuse a CA the machine trusts (a
  // TLS-intercepting proxy's, added with update-ca-certificates); uv honours SSL_CERT_FILE too.
  if (const auto ca = host_ca_bundle(); !ca.empty()) {
    env.emplace("SSL_CERT_FILE", ca);
    env.emplace("PIP_CERT", ca);
  }
  return env;
}

std::string host_ca_bundle() {
  if (const char* v = std::getenv("SSL_CERT_FILE"); v && *v && fs::is_regular_file(v)) return v;
  for (const char* candidate : {"/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"}) {
    std::error_code ec;
    if (fs::is_regular_file(candidate, ec)) return candidate;
  }
  return "";
}

std::string sanitize_id(const std::string& text) {
  std::string out;
  for (char c : text) {
    const bool ok = std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '+';
    if (ok)
      out += c;
    else if (!out.empty() && out.back() != '-')
      out += '-';
  }
  while (!out.empty() && out.back() == '-') out.pop_back();
  return out.empty() ? "env" : out;
}

// ---------------------------------------------------------------- rootfs

ProcessSpec rootfs_spec(const fs::path& rootfs, const std::vector<std::string>& argv,
                        const std::map<std::string, std::string>& env, const std::vector<fs::path>& host_dirs,
                        const fs::path& scratch_mountpoint) {
  if (argv.empty()) fail("rootfs_spec: empty argv");
  // Mount targets: absolute, normalised, plus the canonical form when it differs; parents first.
  std::set<std::string> targets;
  for (const auto& d : host_dirs) {
    if (d.empty()) continue;
    std::string s = fs::absolute(d).lexically_normal().string();
    while (s.size() > 1 && s.back() == '/') s.pop_back();
    if (s == "/")
      fail("rootfs_spec: cannot make the host's / visible inside the rootfs {} (host_dirs)", rootfs.string());
    targets.insert(s);
    std::error_code ec;
    const auto canonical = fs::canonical(d, ec);
    if (!ec && canonical.string() != s) targets.insert(canonical.string());
  }
  std::vector<std::string> ordered(targets.begin(), targets.end());
  std::stable_sort(ordered.begin(), ordered.end(), [](const auto& a, const auto& b) { return a.size() < b.size(); });

  std::string s = "set -e\nR=" + shell_quote(rootfs.string()) + "\n";
  if (!scratch_mountpoint.empty()) {
    // Copy-on-write view of the rootfs: the cached tree stays pristine (no mountpoint dirs, no
    // files written by a run); falls back to the rootfs itself when overlayfs is unavailable.
    const std::string w = shell_quote(scratch_mountpoint.string());
    s += "if [ -d " + w + " ] && mount -t tmpfs -o mode=0755 opensci-run " + w + " 2>/dev/null && mkdir " + w +
         "/upper " + w + "/work " + w + "/root && mount -t overlay overlay -o \"lowerdir=$R,upperdir=\"" + w +
         "\"/upper,workdir=\"" + w + "\"/work\" " + w + "/root 2>/dev/null; then R=" + w + "/root; fi\n";
  }
  s += "mount -t proc proc \"$R/proc\"\n";
  s += "mount --rbind /dev \"$R/dev\"\n";
  s += "mount -t sysfs -o ro sysfs \"$R/sys\" 2>/dev/null || mount --rbind /sys \"$R/sys\" 2>/dev/null || true\n";
  for (const auto& t : ordered) {
    const std::string q = shell_quote(t);
    s += "mkdir -p \"$R\"" + q + " && mount --rbind " + q + " \"$R\"" + q + "\n";
  }
  s += "D=$(pwd -P)\n";
  s += "[ -d \"$R$D\" ] || { echo \"opensci: the working directory $D is not visible inside the rootfs " +
       rootfs.string() + " (add it to host_dirs)\" >&2; exit 125; }\n";
  s += "exec chroot \"$R\" /usr/bin/env -i -C \"$D\"";
  for (const auto& [key, value] : env) s += " " + shell_quote(key + "=" + value);
  for (const auto& a : argv) s += " " + shell_quote(a);
  s += "\n";

  ProcessSpec spec;
  spec.argv = {"unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", s};
  spec.env = {{"PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}, {"LANG", "C"}};
  return spec;
}

std::string rootfs_runtime_problem() {
  if (::geteuid() != 0)
    return fmt::format("needs root for mount namespaces and chroot (running as uid {})", ::geteuid());
  for (const char* tool : {"unshare", "chroot", "mount"})
    if (!find_host_program(tool)) return fmt::format("'{}' not found on the host (util-linux / coreutils)", tool);
  ProcessSpec check;
  check.argv = {"unshare", "--mount", "--propagation", "private", "true"};
  check.env = {{"PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}};
  check.timeout = std::chrono::seconds(10);
  char templ[] = "/tmp/opensci-unshare-check-XXXXXX";
  const int fd = ::mkstemp(templ);
  if (fd >= 0) ::close(fd);
  check.stderr_path = templ;
  const auto r = run_process(check);
  ::unlink(templ);
  if (!r.ok()) return fmt::format("'unshare --mount' does not work here ({}): {}", r.describe(), r.stderr_tail);
  return "";
}

// ---------------------------------------------------------------- build steps

ProcessResult run_step(Progress& progress, const std::string& stage, const std::string& detail, ProcessSpec spec,
                       const fs::path& log) {
  progress.stage(stage, detail.empty() ? "log: " + log.string() : detail + " (log: " + log.string() + ")");
  spec.stdout_path = log;
  spec.stderr_path = log;
  spec.heartbeat_interval = std::chrono::seconds(15);
  spec.heartbeat = progress.heartbeat();
  if (const int lock_fd = current_build_lock_fd(); lock_fd >= 0) spec.inherit_fds.push_back(lock_fd);
  auto result = run_process(spec);
  if (!result.ok())
    fail("stage '{}' failed: {}; last lines of {}:\n{}", stage, result.describe(), log.string(), file_tail(log, 2048));
  return result;
}

// ---------------------------------------------------------------- Debian mirror

std::string debian_mirror(std::string& why_not) {
  if (const char* m = std::getenv("OPENSCI_DEBIAN_MIRROR"); m && *m) return m;
  std::vector<std::string> uris;  // in file order, security archives skipped
  std::vector<fs::path> files;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/etc/apt/sources.list.d", ec)) files.push_back(e.path());
  std::sort(files.begin(), files.end());
  files.insert(files.begin(), "/etc/apt/sources.list");
  for (const auto& f : files) {
    std::ifstream in(f);
    if (!in) continue;
    std::string line;
    const bool deb822 = f.extension() == ".sources";
    std::vector<std::string> stanza_uris;
    std::string stanza_suites;
    auto flush = [&] {
      if (stanza_suites.find("security") == std::string::npos)
        for (const auto& u : stanza_uris) uris.push_back(u);
      stanza_uris.clear();
      stanza_suites.clear();
    };
    while (std::getline(in, line)) {
      if (deb822) {
        if (line.find_first_not_of(" \t\r") == std::string::npos) {
          flush();
          continue;
        }
        std::istringstream ls(line);
        std::string key;
        ls >> key;
        std::string value;
        if (key == "URIs:") {
          while (ls >> value) stanza_uris.push_back(value);
        } else if (key == "Suites:") {
          std::getline(ls, stanza_suites);
        }
      } else {
        std::istringstream ls(line);
        std::string type, word;
        ls >> type;
        if (type != "deb") continue;
        std::vector<std::string> words;
        while (ls >> word) words.push_back(word);
        size_t i = 0;  // skip "[arch=amd64 signed-by=...]"
        if (!words.empty() && words[0].front() == '[') {
          while (i < words.size() && words[i].back() != ']') ++i;
          ++i;
        }
        if (i + 1 < words.size() && words[i + 1].find("security") == std::string::npos) uris.push_back(words[i]);
      }
    }
    if (deb822) flush();
  }
  for (const auto& u : uris) {
    if (u.find("security") != std::string::npos) continue;
    if (u.find("debian") != std::string::npos) return u;
  }
  why_not = uris.empty()
                ? "no apt source found in /etc/apt/sources.list or /etc/apt/sources.list.d/; set OPENSCI_DEBIAN_MIRROR"
                : fmt::format("no Debian archive among the host's apt sources ({}); set OPENSCI_DEBIAN_MIRROR",
                              fmt::join(uris, ", "));
  return "";
}

}  // namespace opensci::harness::detail
