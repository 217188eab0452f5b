// A Hugging Face Hub client on libcurl that shares huggingface_hub's cache, so a model fetched by
// Python is found by C++ and the other way round:
//   <cache>/models--<org>--<name>/blobs/<etag>                 file contents (etag = sha256 for LFS files)
//                                /snapshots/<commit>/<path>    relative symlinks into blobs/
//                                /refs/<revision>              the commit a branch or tag resolved to
//   <cache>/.locks/models--<org>--<name>/<etag>.lock           flock: one download per blob at a time
// Endpoints (as huggingface_hub uses them):
//   GET  {endpoint}/api/models/{repo}/revision/{revision}?blobs=true   commit sha + siblings (size, lfs sha256)
//   HEAD {endpoint}/{repo}/resolve/{commit}/{path}   X-Repo-Commit, X-Linked-Etag / ETag, X-Linked-Size /
//                                                    Content-Length; LFS files answer 302 to a storage URL
//   GET  the resolve URL or the storage URL (Range: bytes=N- to resume)
// Environment: HF_ENDPOINT, HF_TOKEN (else $HF_HOME/token), HF_HUB_CACHE / HF_HOME, HF_HUB_OFFLINE.
// Behaviour: partial files resume from blobs/<etag>.incomplete (Range); 429 waits Retry-After,
// 5xx / 408 / dropped connections retry with exponential backoff; an LFS file whose sha256 is not
// its etag is rejected and the cache left as it was; the token never goes to a storage host;
// files download in parallel; a progress line on a terminal, quiet otherwise.
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "opensci/error.hpp"
#include "opensci/harness/toyify.hpp"

namespace opensci::harness {

struct HubConfig {
  std::string endpoint = "https://huggingface.co";  // no trailing slash
  std::string token;                                // empty: anonymous
  std::string token_source;                         // "HF_TOKEN", "<file>" or "" (for messages)
  std::filesystem::path cache;
  bool offline = false;
  int parallel = 8;                 // files at a time
  int max_attempts = 6;             // per request, retries included
  double backoff_initial_s = 1.0;   // doubled per retry, capped at backoff_max_s (OPENSCI_HUB_BACKOFF_S overrides)
  double backoff_max_s = 16.0;
  long connect_timeout_s = 10;
  long stall_timeout_s = 60;        // a transfer that moves no byte this long is dropped and resumed
  bool progress = false;            // a progress line on stderr (default: when stderr is a terminal)
  static HubConfig from_environment();
};

// The Hub cannot be reached (name resolution, connection) and the cache does not hold what was
// asked, or HF_HUB_OFFLINE is set and it is not cached: the matrix reports Not Run with this
// message, never a failure of the model.
class HubUnavailable : public Error {
 public:
  using Error::Error;
};

struct RepoFile {
  std::string path;
  int64_t size = -1;
  std::string blob_id, lfs_sha256;
};

struct RepoListing {
  std::string repo, revision, commit;
  std::vector<RepoFile> files;
  bool from_cache = false;
};

struct DownloadStats {
  std::atomic<int64_t> bytes{0};  // received from the network
  std::atomic<int> downloaded{0}, cached{0};
  double seconds = 0;
};

class HubClient {
 public:
  explicit HubClient(HubConfig config = HubConfig::from_environment());
  const HubConfig& config() const { return config_; }
  std::filesystem::path repo_dir(const std::string& repo) const;

  RepoListing list(const std::string& repo, const std::string& revision);
  // Every file matching one of `include` (fnmatch, like huggingface_hub's allow_patterns; all
  // files when empty) in the cache; returns the snapshot directory.
  std::filesystem::path download(const std::string& repo, const std::string& revision,
                                 const std::vector<std::string>& include, DownloadStats* stats = nullptr);
  std::filesystem::path download_file(const std::string& repo, const std::string& commit, const std::string& path,
                                      DownloadStats* stats = nullptr);
  // Bytes [begin, begin + length) of a file (e.g. a safetensors header), not cached.
  std::string read_range(const std::string& repo, const std::string& commit, const std::string& path, int64_t begin,
                         int64_t length);

 private:
  HubConfig config_;
};

// "org/name" or "org/name@revision" -> {repo, revision ("main" when absent)}.
std::pair<std::string, std::string> parse_repo_spec(const std::string& spec);
bool looks_like_repo_spec(const std::string& spec);

// A snapshot as a plain directory (hard links to the blobs, copies across filesystems): rootfs
// environments bind the model directory and cannot follow the cache's symlinks out of it.
void materialise_snapshot(const std::filesystem::path& snapshot, const std::filesystem::path& out);

// What toyify needs of a Hub repo: config, *.py and the index downloaded into the cache; the
// safetensors headers read with Range requests (the weights themselves are never downloaded).
ModelSource read_hub_source(const std::string& spec, HubClient& client);

}  // namespace opensci::harness
