// The Hub client against a Hub-speaking server on loopback (tests/usermodel/fake_hub.py, started
// by each test: real sockets, real HTTP), with faults injected: a storage redirect to another
// host, 401 / 404, 429 + Retry-After, 500, a connection dropped mid-file, a wrong checksum, a
// full disk, two processes downloading the same file.
#include <fcntl.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "opensci/error.hpp"
#include "opensci/harness/hub.hpp"
#include "opensci/harness/toyify.hpp"
#include "test_helpers.hpp"

using namespace opensci::harness;
using nlohmann::json;
using opensci::test::read_text;
using opensci::test::ScratchDir;
using opensci::test::write_text;
namespace fs = std::filesystem;

namespace {

pid_t spawn(const std::vector<std::string>& argv, const std::map<std::string, std::string>& env, const fs::path& out) {
  const pid_t pid = fork();
  if (pid == 0) {
    const int fd = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, 1);
    dup2(fd, 2);
    for (const auto& [k, v] : env) setenv(k.c_str(), v.c_str(), 1);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execvp(args[0], args.data());
    _exit(127);
  }
  return pid;
}

int wait_exit(pid_t pid) {
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::string random_bytes(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::string s(n, '\0');
  for (auto& c : s) c = static_cast<char>(gen() & 0xff);
  return s;
}

// The fake Hub serving `repos` (id -> dir), its request log and fault file.
class FakeHub {
 public:
  FakeHub(const fs::path& work, const std::map<std::string, fs::path>& repos, std::vector<std::string> extra = {})
      : work_(work) {
    std::vector<std::string> argv = {"python3", (opensci::test::source_dir() / "tests/usermodel/fake_hub.py").string(),
                                     "--port-file", (work / "port").string(), "--log", log_file().string(),
                                     "--faults", (work / "faults.json").string()};
    for (const auto& [id, dir] : repos) argv.insert(argv.end(), {"--repo", id + "=" + dir.string()});
    argv.insert(argv.end(), extra.begin(), extra.end());
    pid_ = spawn(argv, {}, work / "server.out");
    for (int i = 0; i < 1200 && !fs::exists(work / "port"); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(25));
    INFO(read_text(work / "server.out"));
    REQUIRE(fs::exists(work / "port"));
    port_ = std::stoi(read_text(work / "port"));
  }
  ~FakeHub() {
    kill(pid_, SIGTERM);
    wait_exit(pid_);
  }
  std::string endpoint() const { return "http://127.0.0.1:" + std::to_string(port_); }
  fs::path log_file() const { return work_ / "requests.jsonl"; }
  // The server logs a request when it has sent its last byte, which can be just after the client
  // has it: read until the log stops growing.
  std::vector<json> log() const {
    std::vector<json> out;
    for (size_t last = SIZE_MAX;;) {
      out.clear();
      std::ifstream in(log_file());
      for (std::string l; std::getline(in, l);) out.push_back(json::parse(l));
      if (out.size() == last) return out;
      last = out.size();
      std::this_thread::sleep_for(std::chrono::milliseconds(150));
    }
  }
  std::vector<json> log(const std::string& kind) const {
    std::vector<json> out;
    for (auto& e : log())
      if (e["kind"] == kind) out.push_back(e);
    return out;
  }
  void clear_log() const { fs::remove(log_file()); }
  void faults(const json& rules) const {
    write_text(work_ / "faults.json.tmp", rules.dump());
    fs::rename(work_ / "faults.json.tmp", work_ / "faults.json");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // a new mtime for the server to see
  }

 private:
  fs::path work_;
  pid_t pid_ = -1;
  int port_ = 0;
};

const size_t kWeights = 3u << 20;

// A small model repo: config (a plain git file), 3 MB of weights (an LFS file), a nested file.
fs::path make_repo(const fs::path& dir) {
  fs::create_directories(dir / "sub");
  write_text(dir / "config.json", R"({"model_type": "opensci"})");
  write_text(dir / "model.safetensors", random_bytes(kWeights, 7));
  write_text(dir / "sub/notes.txt", "hello\n");
  return dir;
}

HubConfig config_for(const FakeHub& hub, const fs::path& cache) {
  HubConfig c;
  c.endpoint = hub.endpoint();
  c.cache = cache;
  c.backoff_initial_s = 0.01;  // retries without waiting; Retry-After is honoured regardless
  c.progress = false;
  c.parallel = 4;
  return c;
}

std::string blob_sha256(const fs::path& repo_dir) {
  for (const auto& e : fs::directory_iterator(repo_dir / "blobs"))
    if (e.path().filename().string().size() == 64) return e.path().filename().string();
  return "";
}

}  // namespace

TEST_CASE("download writes huggingface_hub's cache layout, and a second run reads the cache") {
  ScratchDir dir("hub-layout");
  const auto repo = make_repo(dir / "repo");
  FakeHub hub(dir.path(), {{"org/model", repo}});
  hub.faults(json::array({{{"kind", "head"}, {"delay", 0.3}}}));  // slow answers: parallel requests overlap
  HubClient client(config_for(hub, dir / "cache"));
  DownloadStats stats;
  const auto snap = client.download("org/model", "main", {}, &stats);
  const auto rd = client.repo_dir("org/model");
  CHECK(rd == dir / "cache/models--org--model");
  const auto commit = read_text(rd / "refs/main");
  CHECK(snap == rd / "snapshots" / commit);
  for (const char* f : {"config.json", "model.safetensors", "sub/notes.txt"}) {
    INFO(f);
    REQUIRE(fs::is_symlink(snap / f));
    CHECK(fs::read_symlink(snap / f).is_relative());
    CHECK(fs::canonical(snap / f).parent_path() == fs::canonical(rd / "blobs"));
    CHECK(read_text(snap / f) == read_text(repo / f));
  }
  CHECK(stats.downloaded == 3);
  CHECK(stats.bytes == static_cast<int64_t>(kWeights + 6 + read_text(repo / "config.json").size()));
  for (const auto& e : fs::recursive_directory_iterator(rd)) CHECK(e.path().extension() != ".incomplete");
  // `download --out`: a plain directory (hard links), what a rootfs environment can bind.
  materialise_snapshot(snap, dir / "plain");
  CHECK_FALSE(fs::is_symlink(dir / "plain/sub/notes.txt"));
  CHECK(read_text(dir / "plain/model.safetensors") == read_text(repo / "model.safetensors"));
  // Files download in parallel.
  size_t most = 0;
  for (const auto& e : hub.log()) most = std::max(most, e["inflight"].get<size_t>());
  CHECK(most > 1);
  // Everything cached: the second run lists the repo and downloads nothing.
  hub.clear_log();
  DownloadStats again;
  client.download("org/model", "main", {}, &again);
  CHECK(again.cached == 3);
  CHECK(again.bytes == 0);
  CHECK(hub.log().size() == 1);
  CHECK(hub.log()[0]["kind"] == "listing");
  // --include: fnmatch over repo paths.
  ScratchDir other("hub-include");
  HubClient c2(config_for(hub, other / "cache"));
  const auto s2 = c2.download("org/model", "main", {"*.json"});
  CHECK(fs::exists(s2 / "config.json"));
  CHECK_FALSE(fs::exists(s2 / "model.safetensors"));
}

TEST_CASE("HF_HUB_OFFLINE reads the cache without the network, and not cached is Not Run") {
  ScratchDir dir("hub-offline");
  const auto repo = make_repo(dir / "repo");
  FakeHub hub(dir.path(), {{"org/model", repo}});
  auto cfg = config_for(hub, dir / "cache");
  HubClient(cfg).download("org/model", "main", {"config.json"});
  hub.clear_log();
  cfg.offline = true;
  HubClient offline(cfg);
  const auto snap = offline.download("org/model", "main", {"config.json"});
  CHECK(fs::exists(snap / "config.json"));
  CHECK(hub.log().empty());
  REQUIRE_THROWS_AS(offline.download_file("org/model", read_text(offline.repo_dir("org/model") / "refs/main"),
                                          "model.safetensors"),
                    HubUnavailable);
  REQUIRE_THROWS_AS(offline.list("org/other", "main"), HubUnavailable);
  // Nothing listening at all: the CLI says why and exits 77 (CTest: Not Run).
  const auto out = dir / "cli.out";
  const int rc = wait_exit(spawn({OPENSCI_CLI, "download", "org/model", "--quiet"},
                                 {{"HF_ENDPOINT", "http://127.0.0.1:1"}, {"HF_HUB_CACHE", (dir / "empty").string()},
                                  {"OPENSCI_HUB_BACKOFF_S", "0.01"}},
                                 out));
  INFO(read_text(out));
  CHECK(rc == 77);
  CHECK(read_text(out).find("cannot reach the Hub") != std::string::npos);
}

TEST_CASE("LFS files come from the storage redirect, and the token never goes to the storage host") {
  ScratchDir dir("hub-redirect");
  const auto repo = make_repo(dir / "repo");
  FakeHub hub(dir.path(), {{"org/private", repo}},
              {"--private", "org/private", "--token", "hf_secret", "--storage-host", "127.0.0.2"});
  auto cfg = config_for(hub, dir / "cache");
  SECTION("with the right token") {
    cfg.token = "hf_secret";
    cfg.token_source = "HF_TOKEN";
    HubClient(cfg).download("org/private", "main", {});
    const auto storage = hub.log("storage");
    REQUIRE(storage.size() == 1);
    CHECK(storage[0]["auth"] == false);
    CHECK(storage[0]["status"] == 200);
    for (const auto& e : hub.log("head")) CHECK(e["auth"] == true);
  }
  SECTION("401: no token, a wrong token") {
    REQUIRE_ERROR_MENTIONS(HubClient(cfg).download("org/private", "main", {}), "HTTP 401", "'org/private'",
                           "private or gated", "no token was sent (set HF_TOKEN)");
    cfg.token = "hf_wrong";
    cfg.token_source = "HF_TOKEN";
    REQUIRE_ERROR_MENTIONS(HubClient(cfg).download("org/private", "main", {}), "HTTP 401",
                           "the token from HF_TOKEN was refused");
  }
}

TEST_CASE("404: repository, revision and file are told apart") {
  ScratchDir dir("hub-404");
  FakeHub hub(dir.path(), {{"org/model", make_repo(dir / "repo")}});
  HubClient client(config_for(hub, dir / "cache"));
  REQUIRE_ERROR_MENTIONS(client.download("org/nope", "main", {}), "HTTP 404", "repository 'org/nope' not found");
  REQUIRE_ERROR_MENTIONS(client.download("org/model", "v9", {}), "HTTP 404", "revision not found");
  const auto commit = client.list("org/model", "main").commit;
  REQUIRE_ERROR_MENTIONS(client.download_file("org/model", commit, "missing.bin"), "HTTP 404", "has no file 'missing.bin'");
}

TEST_CASE("429 waits Retry-After, 500 and a dropped connection are retried, a download resumes and does not restart") {
  ScratchDir dir("hub-retry");
  FakeHub hub(dir.path(), {{"org/model", make_repo(dir / "repo")}});
  auto cfg = config_for(hub, dir / "cache");
  SECTION("429 + Retry-After") {
    hub.faults(json::array({{{"kind", "listing"}, {"times", 1}, {"status", 429}, {"headers", {{"Retry-After", "2"}}}}}));
    const auto t0 = std::chrono::steady_clock::now();
    HubClient(cfg).download("org/model", "main", {"config.json"});
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    CHECK(s >= 1.9);  // backoff is 0.01 s here: only Retry-After explains the wait
    CHECK(hub.log("listing").size() == 2);
  }
  SECTION("500 twice on the file") {
    hub.faults(json::array({{{"kind", "storage"}, {"times", 2}, {"status", 500}}}));
    HubClient(cfg).download("org/model", "main", {"model.safetensors"});
    CHECK(hub.log("storage").size() == 3);
  }
  SECTION("500 for ever: the error says so") {
    hub.faults(json::array({{{"kind", "storage"}, {"status", 503}}}));
    cfg.max_attempts = 3;
    REQUIRE_ERROR_MENTIONS(HubClient(cfg).download("org/model", "main", {"model.safetensors"}), "HTTP 503");
    CHECK(hub.log("storage").size() == 3);
  }
  SECTION("dropped mid-file: the next request asks for the rest") {
    hub.faults(json::array({{{"kind", "storage"}, {"times", 1}, {"drop_after", 1 << 20}}}));
    HubClient client(cfg);
    const auto snap = client.download("org/model", "main", {"model.safetensors"});
    const auto gets = hub.log("storage");
    REQUIRE(gets.size() == 2);
    CHECK(gets[0]["bytes"] == 1 << 20);
    CHECK(gets[1]["range"] == "bytes=1048576-");
    CHECK(gets[0]["bytes"].get<size_t>() + gets[1]["bytes"].get<size_t>() == kWeights);  // nothing sent twice
    CHECK(read_text(snap / "model.safetensors") == read_text(dir / "repo/model.safetensors"));
  }
  SECTION("a partial file left by an earlier process is resumed") {
    hub.faults(json::array({{{"kind", "storage"}, {"times", 1}, {"drop_after", 1 << 20}}}));
    cfg.max_attempts = 1;
    REQUIRE_ERROR_MENTIONS(HubClient(cfg).download("org/model", "main", {"model.safetensors"}),
                           "the partial file is kept for a resume");
    cfg.max_attempts = 6;
    HubClient(cfg).download("org/model", "main", {"model.safetensors"});
    const auto gets = hub.log("storage");
    REQUIRE(gets.size() == 2);
    CHECK(gets[1]["range"] == "bytes=1048576-");
    CHECK(gets[0]["bytes"].get<size_t>() + gets[1]["bytes"].get<size_t>() == kWeights);
  }
}

TEST_CASE("a wrong checksum is rejected and leaves the cache as it was") {
  ScratchDir dir("hub-sha");
  FakeHub hub(dir.path(), {{"org/model", make_repo(dir / "repo")}});
  hub.faults(json::array({{{"kind", "storage"}, {"corrupt", true}}}));
  HubClient client(config_for(hub, dir / "cache"));
  REQUIRE_ERROR_MENTIONS(client.download("org/model", "main", {"model.safetensors"}), "sha256", "does not match",
                         "rejected");
  const auto rd = client.repo_dir("org/model");
  for (const auto& e : fs::directory_iterator(rd / "blobs")) FAIL("left in blobs/: " << e.path());  // nor .incomplete
  const auto commit = read_text(rd / "refs/main");
  CHECK_FALSE(fs::exists(fs::symlink_status(rd / "snapshots" / commit / "model.safetensors")));
}

TEST_CASE("a full disk fails the download with the reason and leaves no partial blob") {
  ScratchDir dir("hub-enospc");
  FakeHub hub(dir.path(), {{"org/model", make_repo(dir / "repo")}});
  fs::create_directories(dir / "small");
  if (geteuid() != 0 || mount("tmpfs", (dir / "small").c_str(), "tmpfs", 0, "size=1m") != 0) {
    WARN("OPENSCI-SKIPPED: mounting a 1 MB tmpfs needs root and mount rights here ("
         << std::strerror(errno) << "); the full-disk case was not run");
    return;
  }
  struct Unmount {
    fs::path p;
    ~Unmount() { umount2(p.c_str(), MNT_DETACH); }
  } unmount{dir / "small"};
  HubClient client(config_for(hub, dir / "small/cache"));
  REQUIRE_ERROR_MENTIONS(client.download("org/model", "main", {"model.safetensors"}), "No space left on device",
                         "model.safetensors");
  const auto rd = client.repo_dir("org/model");
  for (const auto& e : fs::directory_iterator(rd / "blobs")) FAIL("left in blobs/: " << e.path());
}

TEST_CASE("two processes downloading the same file at once: one download, an intact cache") {
  ScratchDir dir("hub-race");
  FakeHub hub(dir.path(), {{"org/model", make_repo(dir / "repo")}});
  hub.faults(json::array({{{"kind", "storage"}, {"rate", 4 << 20}}}));  // ~0.75 s per copy: they overlap
  const std::map<std::string, std::string> env = {{"HF_ENDPOINT", hub.endpoint()},
                                                  {"HF_HUB_CACHE", (dir / "cache").string()}};
  const auto a = spawn({OPENSCI_CLI, "download", "org/model", "--include", "model.safetensors"}, env, dir / "a.out");
  const auto b = spawn({OPENSCI_CLI, "download", "org/model", "--include", "model.safetensors"}, env, dir / "b.out");
  CHECK(wait_exit(a) == 0);
  CHECK(wait_exit(b) == 0);
  INFO(read_text(dir / "a.out") << read_text(dir / "b.out"));
  CHECK(hub.log("storage").size() == 1);
  CHECK(hub.log("head").size() == 2);  // both asked, the second waited on the lock and found the blob
  const auto rd = dir / "cache/models--org--model";
  const auto sha = blob_sha256(rd);
  CHECK(read_text(rd / "blobs" / sha) == read_text(dir / "repo/model.safetensors"));
  const auto snapshot = (rd / "snapshots" / read_text(rd / "refs/main")).string();
  CHECK(read_text(dir / "a.out").find(snapshot) != std::string::npos);
  CHECK(read_text(dir / "b.out").find(snapshot) != std::string::npos);
}

TEST_CASE("toyify from a Hub repo reads headers with Range requests, never the weights") {
  ScratchDir dir("hub-toyify");
  // A sharded published-shape model, 2 of its 24 layers (sparse payloads: 0.6 GB described, none stored).
  const auto src = dir / "published";
  REQUIRE(std::system(("python3 '" + (opensci::test::source_dir() / "tests/usermodel/make_published_like.py").string() +
                       "' --layers 2 --out '" + src.string() + "' >/dev/null")
                          .c_str()) == 0);
  FakeHub hub(dir.path(), {{"open-sci/ref-1.7b", src}});
  HubClient client(config_for(hub, dir / "cache"));
  const auto source = read_hub_source("open-sci/ref-1.7b", client);
  CHECK(source.description.starts_with("open-sci/ref-1.7b@"));
  CHECK(source.sharded);
  CHECK(source.tensors.size() == 2 + 2 * 18);
  int64_t weight_bytes = 0;
  for (const auto& e : hub.log("storage")) {
    CHECK(e["range"].is_string());  // only ranged reads of the shards
    weight_bytes += e["bytes"].get<int64_t>();
  }
  CHECK(weight_bytes < 100000);  // two headers (8 bytes + JSON each), not 0.6 GB
  ToyifyOptions o;
  o.out = dir / "toy";
  const auto r = toyify(source, o);
  CHECK(r.warnings.empty());
  CHECK(read_text(dir / "toy/modeling_opensci.py") == read_text(src / "modeling_opensci.py"));
  CHECK(json::parse(read_text(dir / "toy/config.json"))["_toyified_from"]["source"] == source.description);
}
