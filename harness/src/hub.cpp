#include "opensci/harness/hub.hpp"

#include <curl/curl.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <fnmatch.h>
#include <openssl/evp.h>
#include <sys/file.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <functional>
#include <set>
#include <chrono>
#include <cmath>
#include <cstring>
#include <ctime>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <thread>

namespace opensci::harness {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// --- environment ---------------------------------------------------------------------------------

std::string env_or(const char* name, const std::string& fallback = "") {
  const char* v = std::getenv(name);
  return v && *v ? std::string(v) : fallback;
}

bool env_true(const char* name) {
  auto v = env_or(name);
  std::transform(v.begin(), v.end(), v.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return v == "1" || v == "true" || v == "yes" || v == "on";
}

std::string trim(std::string s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  size_t b = 0;
  while (b < s.size() && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  return s.substr(b);
}

// --- HTTP ------------------------------------------------------------------------------------------

struct CurlGlobal {
  CurlGlobal() { curl_global_init(CURL_GLOBAL_DEFAULT); }
  ~CurlGlobal() { curl_global_cleanup(); }
};
void curl_global() { static CurlGlobal g; }

class Curl {
 public:
  Curl() {
    curl_global();
    h_ = curl_easy_init();
    if (!h_) fail("libcurl: curl_easy_init failed");
  }
  ~Curl() { curl_easy_cleanup(h_); }
  Curl(const Curl&) = delete;
  Curl& operator=(const Curl&) = delete;
  CURL* get() const { return h_; }

 private:
  CURL* h_;
};

struct Response {
  long status = 0;
  std::map<std::string, std::string> headers;  // lower-case names, of the final response
  std::string body;
  CURLcode code = CURLE_OK;
  std::string error;       // curl's message
  std::string url;         // effective URL
  int sink_errno = 0;      // errno of a failed write into the sink
  std::string header(const std::string& name) const {
    auto it = headers.find(name);
    return it == headers.end() ? std::string() : it->second;
  }
};

struct Request {
  std::string method = "GET", url;
  std::vector<std::string> headers;
  bool follow = false;
  // Body sink: returns false to abort (errno kept in Response::sink_errno). Default: into body.
  std::function<bool(const char*, size_t)> sink;
};

struct Transfer {
  Response* r;
  const Request* q;
};

size_t on_header(char* data, size_t size, size_t n, void* user) {
  auto* r = static_cast<Response*>(user);
  std::string line(data, size * n);
  if (line.starts_with("HTTP/")) r->headers.clear();  // a new response of a redirect chain
  const auto colon = line.find(':');
  if (colon != std::string::npos) {
    auto name = line.substr(0, colon);
    std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    r->headers[name] = trim(line.substr(colon + 1));
  }
  return size * n;
}

size_t on_body(char* data, size_t size, size_t n, void* user) {
  auto* t = static_cast<Transfer*>(user);
  if (t->q->sink) {
    if (!t->q->sink(data, size * n)) {
      t->r->sink_errno = errno;
      return 0;  // aborts the transfer (CURLE_WRITE_ERROR)
    }
    return size * n;
  }
  t->r->body.append(data, size * n);
  return size * n;
}

Response perform(const Curl& curl, const HubConfig& cfg, const Request& q) {
  CURL* h = curl.get();
  curl_easy_reset(h);
  Response r;
  Transfer t{&r, &q};
  curl_easy_setopt(h, CURLOPT_URL, q.url.c_str());
  if (q.method == "HEAD") curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
  curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, q.follow ? 1L : 0L);
  curl_easy_setopt(h, CURLOPT_MAXREDIRS, 10L);
  curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, cfg.connect_timeout_s);
  // A transfer that moves less than 1 byte/s for stall_timeout_s is dropped (then resumed).
  curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, 1L);
  curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, cfg.stall_timeout_s);
  curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(h, CURLOPT_HEADERDATA, &r);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &t);
  curl_easy_setopt(h, CURLOPT_USERAGENT, "opensci-compat/0.1 (libcurl)");
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_BUFFERSIZE, 512L * 1024);  // fewer, larger writes (and hash updates) per file
  // Identity: sizes and Range offsets are of the file itself (as huggingface_hub asks).
  struct curl_slist* list = curl_slist_append(nullptr, "Accept-Encoding: identity");
  for (const auto& hd : q.headers) list = curl_slist_append(list, hd.c_str());
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, list);
  r.code = curl_easy_perform(h);
  curl_slist_free_all(list);
  curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &r.status);
  char* eff = nullptr;
  curl_easy_getinfo(h, CURLINFO_EFFECTIVE_URL, &eff);
  if (eff) r.url = eff;
  if (r.code != CURLE_OK) r.error = curl_easy_strerror(r.code);
  return r;
}

bool unreachable(CURLcode c) {
  return c == CURLE_COULDNT_RESOLVE_HOST || c == CURLE_COULDNT_RESOLVE_PROXY || c == CURLE_COULDNT_CONNECT;
}

// Transport failures worth another attempt (the connection dropped, stalled or never answered).
bool transient(CURLcode c) {
  return c == CURLE_PARTIAL_FILE || c == CURLE_RECV_ERROR || c == CURLE_SEND_ERROR || c == CURLE_GOT_NOTHING ||
         c == CURLE_OPERATION_TIMEDOUT || c == CURLE_COULDNT_CONNECT || c == CURLE_SSL_CONNECT_ERROR ||
         c == CURLE_HTTP2 || c == CURLE_HTTP2_STREAM;
}

bool retry_status(long s) { return s == 408 || s == 429 || (s >= 500 && s <= 599); }

// Seconds to wait: Retry-After (delta seconds or an HTTP date) when the server says, else backoff.
double wait_seconds(const Response& r, const HubConfig& cfg, int attempt) {
  const auto ra = r.header("retry-after");
  if (!ra.empty()) {
    char* end = nullptr;
    const double s = std::strtod(ra.c_str(), &end);
    if (end && *end == '\0' && s >= 0) return std::min(s, 300.0);
    std::tm tm{};
    if (strptime(ra.c_str(), "%a, %d %b %Y %H:%M:%S GMT", &tm)) {
      const auto when = timegm(&tm);
      return std::clamp(static_cast<double>(when - std::time(nullptr)), 0.0, 300.0);
    }
  }
  return std::min(cfg.backoff_max_s, cfg.backoff_initial_s * std::pow(2.0, attempt - 1));
}

void sleep_for(double s) { std::this_thread::sleep_for(std::chrono::duration<double>(s)); }

std::string host_of(const std::string& url) {
  static const std::regex re(R"(^[a-zA-Z][a-zA-Z0-9+.-]*://([^/?#]*))");
  std::smatch m;
  return std::regex_search(url, m, re) ? m[1].str() : "";
}

std::string url_encode_path(const std::string& path) {
  std::string out;
  for (unsigned char c : path) {
    if (std::isalnum(c) || c == '/' || c == '-' || c == '_' || c == '.' || c == '~')
      out += static_cast<char>(c);
    else
      out += fmt::format("%{:02X}", c);
  }
  return out;
}

std::string url_encode_all(const std::string& s) {
  std::string out;
  for (unsigned char c : s)
    out += std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~' ? std::string(1, static_cast<char>(c))
                                                                             : fmt::format("%{:02X}", c);
  return out;
}

std::string normalize_etag(std::string e) {
  if (e.starts_with("W/")) e = e.substr(2);
  if (e.size() >= 2 && e.front() == '"' && e.back() == '"') e = e.substr(1, e.size() - 2);
  return e;
}

bool is_sha256(const std::string& s) {
  static const std::regex re("^[0-9a-f]{64}$");
  return std::regex_match(s, re);
}

bool is_commit(const std::string& s) {
  static const std::regex re("^[0-9a-f]{40}$");
  return std::regex_match(s, re);
}

// --- errors ----------------------------------------------------------------------------------------

[[noreturn]] void http_fail(const HubConfig& cfg, const std::string& what, const Response& r, const std::string& repo,
                            const std::string& path) {
  const auto code = r.header("x-error-code");
  const auto server = trim(r.header("x-error-message").empty() ? r.body.substr(0, 300) : r.header("x-error-message"));
  const auto said = server.empty() ? std::string() : fmt::format(" (server: {})", server);
  if (r.status == 401 || r.status == 403 || code == "GatedRepo") {
    const auto token = cfg.token.empty() ? std::string("no token was sent (set HF_TOKEN)")
                                         : fmt::format("the token from {} was refused", cfg.token_source);
    fail("{} {}: HTTP {}: '{}' is private or gated and {}{}", what, r.url, r.status, repo, token, said);
  }
  if (r.status == 404) {
    if (code == "RevisionNotFound") fail("{} {}: HTTP 404: revision not found in '{}'{}", what, r.url, repo, said);
    if (code == "EntryNotFound" || !path.empty())
      fail("{} {}: HTTP 404: '{}' has no file '{}'{}", what, r.url, repo, path, said);
    fail("{} {}: HTTP 404: repository '{}' not found at {}{}", what, r.url, repo, cfg.endpoint, said);
  }
  fail("{} {}: HTTP {}{}", what, r.url, r.status, said);
}

// Performs `q`, retrying 408/429/5xx and transient transport errors. Unreachable hosts throw
// HubUnavailable at once (a fast Not Run where there is no network).
Response request_with_retries(const Curl& curl, const HubConfig& cfg, const Request& q, const std::string& what) {
  for (int attempt = 1;; ++attempt) {
    auto r = perform(curl, cfg, q);
    if (r.code == CURLE_COULDNT_RESOLVE_HOST || r.code == CURLE_COULDNT_RESOLVE_PROXY ||
        (r.code == CURLE_COULDNT_CONNECT && attempt >= 2))
      throw HubUnavailable(fmt::format("{} {}: cannot reach the Hub: {}", what, q.url, r.error));
    const bool again = r.code != CURLE_OK ? transient(r.code) : retry_status(r.status);
    if (!again || attempt >= cfg.max_attempts) {
      if (r.code != CURLE_OK) fail("{} {}: {} (after {} attempts)", what, q.url, r.error, attempt);
      return r;
    }
    sleep_for(wait_seconds(r, cfg, attempt));
  }
}

// --- files -----------------------------------------------------------------------------------------

class FileLock {
 public:
  explicit FileLock(const fs::path& p) {
    fs::create_directories(p.parent_path());
    fd_ = ::open(p.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0) fail("{}: cannot open lock file: {}", p.string(), std::strerror(errno));
    while (::flock(fd_, LOCK_EX) != 0)
      if (errno != EINTR) fail("{}: flock: {}", p.string(), std::strerror(errno));
  }
  ~FileLock() {
    ::flock(fd_, LOCK_UN);
    ::close(fd_);
  }
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;

 private:
  int fd_ = -1;
};

void write_atomically(const fs::path& p, const std::string& text) {
  fs::create_directories(p.parent_path());
  const auto tmp = p.string() + fmt::format(".{}.tmp", getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << text;
    if (!out) fail("{}: cannot write", tmp);
  }
  fs::rename(tmp, p);
}

void link_pointer(const fs::path& blob, const fs::path& pointer) {
  fs::create_directories(pointer.parent_path());
  const auto target = fs::relative(blob, pointer.parent_path());
  const auto tmp = pointer.string() + fmt::format(".{}.{}.lnk", getpid(), std::hash<std::thread::id>{}(std::this_thread::get_id()));
  fs::remove(tmp);
  fs::create_symlink(target, tmp);
  fs::rename(tmp, pointer);  // atomic: a reader sees the old link or the new one
}

class Sha256 {
 public:
  Sha256() : ctx_(EVP_MD_CTX_new()) { reset(); }
  ~Sha256() { EVP_MD_CTX_free(ctx_); }
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void reset() { EVP_DigestInit_ex(ctx_, EVP_sha256(), nullptr); }
  void update(const void* data, size_t n) { EVP_DigestUpdate(ctx_, data, n); }
  std::string hex() {
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    EVP_DigestFinal_ex(ctx_, md, &len);
    std::string out;
    for (unsigned i = 0; i < len; ++i) out += fmt::format("{:02x}", md[i]);
    return out;
  }

 private:
  EVP_MD_CTX* ctx_;
};

struct FileMeta {
  std::string etag, commit, location;
  int64_t size = -1;
};

std::string progress_bytes(double b) {
  const char* units[] = {"B", "kB", "MB", "GB", "TB"};
  int u = 0;
  while (b >= 1000 && u < 4) b /= 1000, ++u;
  return fmt::format("{:.1f} {}", b, units[u]);
}

}  // namespace

// --- configuration -------------------------------------------------------------------------------------

HubConfig HubConfig::from_environment() {
  HubConfig c;
  c.endpoint = env_or("HF_ENDPOINT", c.endpoint);
  while (c.endpoint.ends_with("/")) c.endpoint.pop_back();
  const fs::path home = env_or("HOME", "/root");
  const fs::path hf_home = env_or("HF_HOME", (fs::path(env_or("XDG_CACHE_HOME", (home / ".cache").string())) / "huggingface").string());
  c.cache = env_or("HF_HUB_CACHE", env_or("HUGGINGFACE_HUB_CACHE", (hf_home / "hub").string()));
  c.token = env_or("HF_TOKEN", env_or("HUGGING_FACE_HUB_TOKEN"));
  if (!c.token.empty()) {
    c.token_source = std::getenv("HF_TOKEN") ? "HF_TOKEN" : "HUGGING_FACE_HUB_TOKEN";
  } else {
    const fs::path file = env_or("HF_TOKEN_PATH", (hf_home / "token").string());
    std::ifstream in(file);
    if (in) {
      std::getline(in, c.token);
      c.token = trim(c.token);
      c.token_source = file.string();
    }
  }
  c.offline = env_true("HF_HUB_OFFLINE") || env_true("TRANSFORMERS_OFFLINE");
  if (auto b = env_or("OPENSCI_HUB_BACKOFF_S"); !b.empty()) c.backoff_initial_s = std::stod(b);
  if (auto p = env_or("OPENSCI_HUB_PARALLEL"); !p.empty()) c.parallel = std::max(1, std::stoi(p));
  c.progress = isatty(STDERR_FILENO) != 0;
  return c;
}

std::pair<std::string, std::string> parse_repo_spec(const std::string& spec) {
  static const std::regex re(R"(^([A-Za-z0-9][A-Za-z0-9._-]*)/([A-Za-z0-9][A-Za-z0-9._-]*)(?:@(.+))?$)");
  std::smatch m;
  if (!std::regex_match(spec, m, re)) fail("'{}' is not a Hub repo id (ORG/NAME or ORG/NAME@REVISION)", spec);
  return {m[1].str() + "/" + m[2].str(), m[3].matched ? m[3].str() : std::string("main")};
}

bool looks_like_repo_spec(const std::string& spec) {
  try {
    parse_repo_spec(spec);
    return !fs::exists(spec);
  } catch (const Error&) {
    return false;
  }
}

HubClient::HubClient(HubConfig config) : config_(std::move(config)) {}

fs::path HubClient::repo_dir(const std::string& repo) const {
  const auto slash = repo.find('/');
  return config_.cache / ("models--" + repo.substr(0, slash) + "--" + repo.substr(slash + 1));
}

namespace {

std::vector<std::string> auth_headers(const HubConfig& cfg) {
  if (cfg.token.empty()) return {};
  return {"Authorization: Bearer " + cfg.token};
}

RepoListing listing_from_cache(const fs::path& dir, const std::string& repo, const std::string& revision) {
  RepoListing l{repo, revision, "", {}, true};
  if (is_commit(revision)) {
    l.commit = revision;
  } else if (std::ifstream in(dir / "refs" / revision); in) {
    std::getline(in, l.commit);
    l.commit = trim(l.commit);
  }
  const auto snap = dir / "snapshots" / l.commit;
  if (l.commit.empty() || !fs::is_directory(snap)) return {};
  for (const auto& e : fs::recursive_directory_iterator(snap))
    if (!e.is_directory()) l.files.push_back({e.path().lexically_relative(snap).string(), -1, "", ""});
  std::sort(l.files.begin(), l.files.end(), [](const auto& a, const auto& b) { return a.path < b.path; });
  return l;
}

}  // namespace

RepoListing HubClient::list(const std::string& repo, const std::string& revision) {
  const auto dir = repo_dir(repo);
  if (config_.offline) {
    auto l = listing_from_cache(dir, repo, revision);
    if (l.commit.empty())
      throw HubUnavailable(fmt::format("HF_HUB_OFFLINE is set and {}@{} is not in the cache {}", repo, revision, dir.string()));
    return l;
  }
  Curl curl;
  Request q;
  q.url = fmt::format("{}/api/models/{}/revision/{}?blobs=true", config_.endpoint, repo, url_encode_all(revision));
  q.headers = auth_headers(config_);
  q.follow = true;
  Response r;
  try {
    r = request_with_retries(curl, config_, q, "listing");
  } catch (const HubUnavailable& e) {
    auto l = listing_from_cache(dir, repo, revision);
    if (l.commit.empty()) throw HubUnavailable(fmt::format("{}; {}@{} is not in the cache {}", e.what(), repo, revision, dir.string()));
    return l;
  }
  if (r.status != 200) http_fail(config_, "listing", r, repo, "");
  json j;
  try {
    j = json::parse(r.body);
  } catch (const json::exception& e) {
    fail("listing {}: not JSON ({}): is HF_ENDPOINT={} a Hub?", r.url, e.what(), config_.endpoint);
  }
  RepoListing l{repo, revision, j.value("sha", std::string()), {}, false};
  if (!is_commit(l.commit)) fail("listing {}: no commit 'sha' in the answer", r.url);
  for (const auto& s : j.value("siblings", json::array())) {
    RepoFile f;
    f.path = s.value("rfilename", std::string());
    f.size = s.value("size", int64_t{-1});
    f.blob_id = s.value("blobId", std::string());
    if (s.contains("lfs") && s["lfs"].is_object()) {
      f.lfs_sha256 = s["lfs"].value("sha256", s["lfs"].value("oid", std::string()));
      f.size = s["lfs"].value("size", f.size);
    }
    if (!f.path.empty()) l.files.push_back(f);
  }
  if (revision != l.commit) write_atomically(dir / "refs" / revision, l.commit);
  return l;
}

namespace {

FileMeta head_file(const Curl& curl, const HubConfig& cfg, const std::string& repo, const std::string& commit,
                   const std::string& path) {
  auto url = fmt::format("{}/{}/resolve/{}/{}", cfg.endpoint, repo, commit, url_encode_path(path));
  for (int hop = 0;; ++hop) {
    Request q;
    q.method = "HEAD";
    q.url = url;
    q.headers = auth_headers(cfg);
    const auto r = request_with_retries(curl, cfg, q, "metadata");
    if (r.status >= 300 && r.status < 400) {
      const auto loc = r.header("location");
      // A relative redirect stays on the Hub (a renamed repo): follow it. An absolute one is the
      // file's storage location, fetched by the GET.
      if (loc.starts_with("/") && hop < 5) {
        const auto origin = cfg.endpoint.substr(0, cfg.endpoint.find('/', cfg.endpoint.find("://") + 3));
        url = origin + loc;
        continue;
      }
      FileMeta m{normalize_etag(r.header("x-linked-etag").empty() ? r.header("etag") : r.header("x-linked-etag")),
                 r.header("x-repo-commit"), loc, -1};
      if (auto s = r.header("x-linked-size"); !s.empty()) m.size = std::stoll(s);
      if (m.commit.empty()) fail("metadata {}: no X-Repo-Commit header: HF_ENDPOINT={} does not look like a Hub", url, cfg.endpoint);
      if (m.etag.empty()) fail("metadata {}: no ETag: cannot name the blob", url);
      return m;
    }
    if (r.status != 200) http_fail(cfg, "metadata", r, repo, path);
    FileMeta m{normalize_etag(r.header("x-linked-etag").empty() ? r.header("etag") : r.header("x-linked-etag")),
               r.header("x-repo-commit"), url, -1};
    const auto size = r.header("x-linked-size").empty() ? r.header("content-length") : r.header("x-linked-size");
    if (!size.empty()) m.size = std::stoll(size);
    if (m.commit.empty()) fail("metadata {}: no X-Repo-Commit header: HF_ENDPOINT={} does not look like a Hub", url, cfg.endpoint);
    if (m.etag.empty()) fail("metadata {}: no ETag: cannot name the blob", url);
    return m;
  }
}

// Downloads `meta.location` into `incomplete`, resuming from what it holds; returns when the file
// is complete and verified. Errors leave `incomplete` for a later resume, except a checksum
// mismatch or a full disk (removed: it cannot become right by continuing).
void fetch_blob(const Curl& curl, const HubConfig& cfg, const FileMeta& meta, const fs::path& incomplete,
                const std::string& what, DownloadStats* stats) {
  const bool lfs = is_sha256(meta.etag);
  Sha256 sha;
  int64_t have = fs::exists(incomplete) ? static_cast<int64_t>(fs::file_size(incomplete)) : 0;
  if (meta.size >= 0 && have > meta.size) {
    fs::remove(incomplete);
    have = 0;
  }
  if (lfs && have > 0) {  // the hash covers exactly the bytes on disk
    std::ifstream in(incomplete, std::ios::binary);
    std::vector<char> buf(1 << 20);
    while (in.read(buf.data(), static_cast<std::streamsize>(buf.size())) || in.gcount() > 0)
      sha.update(buf.data(), static_cast<size_t>(in.gcount()));
  }
  if (meta.size >= 0) {
    struct statvfs vfs {};
    if (statvfs(incomplete.parent_path().c_str(), &vfs) == 0) {
      const auto free_bytes = static_cast<int64_t>(vfs.f_bavail) * static_cast<int64_t>(vfs.f_frsize);
      if (free_bytes < meta.size - have)
        fmt::print(stderr, "warning: {}: needs {} more, {} free in {}\n", what, progress_bytes(static_cast<double>(meta.size - have)),
                   progress_bytes(static_cast<double>(free_bytes)), incomplete.parent_path().string());
    }
  }
  const bool same_host = host_of(meta.location) == host_of(cfg.endpoint);
  for (int attempt = 1;; ++attempt) {
    const int fd = ::open(incomplete.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) fail("{}: cannot open {}: {}", what, incomplete.string(), std::strerror(errno));
    bool first_chunk = true;
    Request q;
    q.url = meta.location;
    q.follow = true;
    if (same_host) q.headers = auth_headers(cfg);  // never the token to a storage host
    if (have > 0) q.headers.push_back(fmt::format("Range: bytes={}-", have));
    std::string error_body;
    q.sink = [&](const char* data, size_t n) {
      long status = 0;
      curl_easy_getinfo(curl.get(), CURLINFO_RESPONSE_CODE, &status);
      if (status < 200 || status >= 300) {  // an error page: kept for the message, not written
        error_body.append(data, n);
        return true;
      }
      if (first_chunk && have > 0 && status == 200) {  // the server ignored the Range: start over
        if (::ftruncate(fd, 0) != 0) return false;
        sha.reset();
        have = 0;
      }
      first_chunk = false;
      size_t done = 0;
      while (done < n) {
        const auto w = ::write(fd, data + done, n - done);
        if (w < 0) {
          if (errno == EINTR) continue;
          return false;
        }
        done += static_cast<size_t>(w);
      }
      if (lfs) sha.update(data, n);
      have += static_cast<int64_t>(n);
      if (stats) stats->bytes += static_cast<int64_t>(n);
      return true;
    };
    auto r = perform(curl, cfg, q);
    ::close(fd);
    r.body = error_body;
    if (r.sink_errno != 0) {
      const auto reason = std::strerror(r.sink_errno);
      fs::remove(incomplete);
      fail("{}: writing {} failed after {} of {} bytes: {}", what, incomplete.string(), have, meta.size, reason);
    }
    if (unreachable(r.code) && attempt >= 2)
      throw HubUnavailable(fmt::format("{} {}: cannot reach the storage host: {}", what, q.url, r.error));
    if (r.code == CURLE_OK && r.status == 416 && meta.size >= 0 && have == meta.size) break;  // already complete
    if (r.code == CURLE_OK && r.status == 416) {
      ::truncate(incomplete.c_str(), 0);
      sha.reset();
      have = 0;
      continue;
    }
    const bool ok = r.code == CURLE_OK && (r.status == 200 || r.status == 206);
    if (ok && (meta.size < 0 || have == meta.size)) break;
    const bool again = r.code != CURLE_OK ? (transient(r.code) || unreachable(r.code))
                                          : (ok || retry_status(r.status));  // ok but short: dropped
    if (!again || attempt >= cfg.max_attempts) {
      if (r.code != CURLE_OK) fail("{} {}: {} after {} of {} bytes ({} attempts; the partial file is kept for a resume)", what, q.url, r.error, have, meta.size, attempt);
      if (!ok) http_fail(cfg, "download", r, what, "");
      fail("{} {}: got {} of {} bytes ({} attempts)", what, q.url, have, meta.size, attempt);
    }
    sleep_for(r.code == CURLE_OK && !ok ? wait_seconds(r, cfg, attempt) : std::min(cfg.backoff_max_s, cfg.backoff_initial_s * std::pow(2.0, attempt - 1)));
  }
  if (lfs) {
    const auto got = sha.hex();
    if (got != meta.etag) {
      fs::remove(incomplete);
      fail("{}: sha256 {} does not match the Hub's {} ({} bytes from {}): the file was rejected and the cache left "
           "as it was",
           what, got, meta.etag, have, meta.location);
    }
  }
}

}  // namespace

fs::path HubClient::download_file(const std::string& repo, const std::string& commit, const std::string& path,
                                  DownloadStats* stats) {
  const auto dir = repo_dir(repo);
  const auto pointer = dir / "snapshots" / commit / path;
  const auto what = fmt::format("{}@{}: {}", repo, commit.substr(0, 12), path);
  if (fs::exists(pointer)) {
    if (stats) ++stats->cached;
    return pointer;
  }
  if (config_.offline) throw HubUnavailable(fmt::format("HF_HUB_OFFLINE is set and {} is not in the cache {}", what, dir.string()));
  Curl curl;
  const auto meta = head_file(curl, config_, repo, commit, path);
  if (is_commit(commit) && meta.commit != commit)
    fail("{}: the Hub answered for commit {}, not {}", what, meta.commit, commit);
  const auto blob = dir / "blobs" / meta.etag;
  fs::create_directories(blob.parent_path());
  const auto lock = config_.cache / ".locks" / dir.filename() / (meta.etag + ".lock");
  FileLock held(lock);
  if (!fs::exists(blob)) {
    const auto incomplete = fs::path(blob.string() + ".incomplete");
    fetch_blob(curl, config_, meta, incomplete, what, stats);
    fs::rename(incomplete, blob);
    if (stats) ++stats->downloaded;
  } else if (stats) {
    ++stats->cached;
  }
  link_pointer(blob, pointer);
  return pointer;
}

fs::path HubClient::download(const std::string& repo, const std::string& revision, const std::vector<std::string>& include,
                             DownloadStats* stats) {
  const auto t0 = std::chrono::steady_clock::now();
  const auto listing = list(repo, revision);
  std::vector<RepoFile> files;
  for (const auto& f : listing.files) {
    bool take = include.empty();
    for (const auto& g : include) take |= fnmatch(g.c_str(), f.path.c_str(), 0) == 0;
    if (take) files.push_back(f);
  }
  if (files.empty())
    fail("{}@{} ({}, {} files{}): no file matches {}", repo, revision, listing.commit, listing.files.size(), listing.from_cache ? ", from the cache" : "",
         include.empty() ? std::string("(the repo is empty)") : fmt::format("--include {}", fmt::join(include, " ")));
  DownloadStats local;
  DownloadStats& st = stats ? *stats : local;
  int64_t total = 0;
  for (const auto& f : files) total += std::max<int64_t>(0, f.size);

  std::atomic<size_t> next{0};
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::exception_ptr first_error;
  auto worker = [&] {
    for (size_t i; !stop && (i = next++) < files.size();) {
      try {
        download_file(repo, listing.commit, files[i].path, &st);
      } catch (...) {
        std::lock_guard<std::mutex> g(mu);
        if (!first_error) first_error = std::current_exception();
        stop = true;
      }
    }
  };
  std::thread progress;
  std::atomic<bool> done{false};
  if (config_.progress) {
    progress = std::thread([&] {
      while (!done) {
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        fmt::print(stderr, "\r{}: {}/{} files, {} / {}, {}/s   ", repo, st.downloaded + st.cached, files.size(),
                   progress_bytes(static_cast<double>(st.bytes)), progress_bytes(static_cast<double>(total)),
                   progress_bytes(s > 0 ? static_cast<double>(st.bytes) / s : 0));
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
      }
      fmt::print(stderr, "\n");
    });
  }
  {
    std::vector<std::thread> pool;
    const auto n = std::min<size_t>(static_cast<size_t>(config_.parallel), files.size());
    for (size_t k = 0; k < n; ++k) pool.emplace_back(worker);
    for (auto& t : pool) t.join();
  }
  done = true;
  if (progress.joinable()) progress.join();
  st.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (first_error) std::rethrow_exception(first_error);
  return repo_dir(repo) / "snapshots" / listing.commit;
}

std::string HubClient::read_range(const std::string& repo, const std::string& commit, const std::string& path,
                                  int64_t begin, int64_t length) {
  const auto what = fmt::format("{}@{}: {} bytes {}..{}", repo, commit.substr(0, 12), path, begin, begin + length);
  // A cached copy answers without the network (and is the only answer offline).
  const auto pointer = repo_dir(repo) / "snapshots" / commit / path;
  if (fs::exists(pointer)) {
    std::ifstream in(pointer, std::ios::binary);
    in.seekg(begin);
    std::string out(static_cast<size_t>(length), '\0');
    if (!in.read(out.data(), length)) fail("{}: the cached file is shorter", what);
    return out;
  }
  if (config_.offline) throw HubUnavailable(fmt::format("HF_HUB_OFFLINE is set and {} is not cached", what));
  Curl curl;
  const auto meta = head_file(curl, config_, repo, commit, path);
  Request q;
  q.url = meta.location;
  q.follow = true;
  if (host_of(meta.location) == host_of(config_.endpoint)) q.headers = auth_headers(config_);
  q.headers.push_back(fmt::format("Range: bytes={}-{}", begin, begin + length - 1));
  const auto r = request_with_retries(curl, config_, q, "range");
  if (r.status != 206 && r.status != 200) http_fail(config_, "range", r, repo, path);
  auto body = r.status == 200 ? r.body.substr(static_cast<size_t>(std::min<int64_t>(begin, static_cast<int64_t>(r.body.size())))) : r.body;
  if (static_cast<int64_t>(body.size()) < length) fail("{}: got {} bytes", what, body.size());
  return body.substr(0, static_cast<size_t>(length));
}

void materialise_snapshot(const fs::path& snapshot, const fs::path& out) {
  const auto tmp = out.string() + fmt::format(".{}.tmp", getpid());
  fs::remove_all(tmp);
  for (const auto& e : fs::recursive_directory_iterator(snapshot)) {
    const auto rel = e.path().lexically_relative(snapshot);
    if (e.is_directory()) {
      fs::create_directories(fs::path(tmp) / rel);
      continue;
    }
    const auto real = fs::canonical(e.path());
    fs::create_directories((fs::path(tmp) / rel).parent_path());
    std::error_code ec;
    fs::create_hard_link(real, fs::path(tmp) / rel, ec);
    if (ec) fs::copy_file(real, fs::path(tmp) / rel);
  }
  fs::remove_all(out);
  fs::rename(tmp, out);
}

ModelSource read_hub_source(const std::string& spec, HubClient& client) {
  const auto [repo, revision] = parse_repo_spec(spec);
  const auto listing = client.list(repo, revision);
  ModelSource s;
  s.description = fmt::format("{}@{}", repo, listing.commit);
  std::vector<std::string> shards;
  bool has_config = false;
  for (const auto& f : listing.files) {
    if (f.path == "config.json") has_config = true;
    if (f.path == "model.safetensors.index.json") s.sharded = true;
  }
  if (!has_config) fail("{}: the repo has no config.json", s.description);
  s.config = json::parse(std::ifstream(client.download_file(repo, listing.commit, "config.json")));
  for (const auto& f : listing.files)
    if (f.path.ends_with(".py") && f.path.find('/') == std::string::npos)
      s.code_files[f.path] = client.download_file(repo, listing.commit, f.path);
  if (s.sharded) {
    const auto index = json::parse(std::ifstream(client.download_file(repo, listing.commit, "model.safetensors.index.json")));
    std::set<std::string> unique;
    for (const auto& [tensor, file] : index.at("weight_map").items()) unique.insert(file.get<std::string>());
    shards.assign(unique.begin(), unique.end());
  } else {
    shards.push_back("model.safetensors");
  }
  for (const auto& shard : shards) {
    const auto head = client.read_range(repo, listing.commit, shard, 0, 8);
    uint64_t n = 0;
    std::memcpy(&n, head.data(), 8);
    if (n > (100u << 20)) fail("{}: {}: safetensors header claims {} bytes", s.description, shard, n);
    const auto text = client.read_range(repo, listing.commit, shard, 8, static_cast<int64_t>(n));
    auto t = parse_safetensors_header(json::parse(text), shard, s.description + "/" + shard);
    s.tensors.insert(s.tensors.end(), t.begin(), t.end());
  }
  return s;
}

}  // namespace opensci::harness
