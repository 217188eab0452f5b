// The NCCL (RCCL) communicator on real GPU ranks: all-to-all with uneven and empty counts,
// gather, split, and the sharded golden forward over it, bit-identical to the unsharded one.
//
// Run without arguments it probes the devices: none -> exit 77 with the runtime's reason (CTest
// Not Run); else it launches itself as min(devices, 2) ranks under mpiexec (one GPU per rank;
// NCCL refuses two ranks on one device) and returns their verdict.
#include <fmt/format.h>
#include <unistd.h>

#if defined(OPENSCI_PARALLEL_RCCL)
#include <hip/hip_runtime.h>
#define gpuGetDeviceCount hipGetDeviceCount
#define gpuGetErrorString hipGetErrorString
#define gpuSuccess hipSuccess
#else
#include <cuda_runtime.h>
#define gpuGetDeviceCount cudaGetDeviceCount
#define gpuGetErrorString cudaGetErrorString
#define gpuSuccess cudaSuccess
#endif

#include <cstring>
#include <filesystem>

#include "opensci/forward.hpp"
#include "opensci/harness/process.hpp"
#include "opensci/harness/toy.hpp"
#include "opensci/parallel/communicator.hpp"
#include "opensci/parallel/sharded_forward.hpp"

using namespace opensci;
using namespace opensci::parallel;
namespace fs = std::filesystem;

namespace {

int failures = 0;
void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    fmt::print(stderr, "FAILED: {}\n", what);
  }
}

int rank_main() {
  MpiSession mpi(nullptr, nullptr);
  auto world = make_world("nccl", -1);
  const int r = world->rank(), W = world->size();
  fmt::print("rank {} of {}: {}\n", r, W, world->engine());
  // Rank r sends r + p elements to rank p (none from rank 0 to itself): value 1000 r + 100 p + i.
  std::vector<int64_t> sc(static_cast<size_t>(W)), rc(static_cast<size_t>(W));
  std::vector<double> send;
  for (int p = 0; p < W; ++p) {
    sc[static_cast<size_t>(p)] = r + p;
    for (int i = 0; i < r + p; ++i) send.push_back(1000.0 * r + 100.0 * p + i);
  }
  rc = world->alltoall_counts(sc);
  std::vector<double> recv;
  alltoallv(*world, send, sc, recv, rc, "test");
  size_t at = 0;
  for (int q = 0; q < W; ++q) {
    check(rc[static_cast<size_t>(q)] == q + r, fmt::format("rank {}: count from {}", r, q));
    for (int i = 0; i < q + r; ++i, ++at)
      check(recv[at] == 1000.0 * q + 100.0 * r + i, fmt::format("rank {}: value {} from {}", r, i, q));
  }
  std::vector<std::byte> all;
  const float mine[2] = {static_cast<float>(r), static_cast<float>(r) + 0.5f};
  const auto counts = world->gatherv(mine, 2, all, Elem::F32, 0, "test");
  if (r == 0) check(counts.size() == static_cast<size_t>(W) && all.size() == static_cast<size_t>(W) * 8, "gatherv sizes");
  auto half = world->split(r % 2, r);
  check(half->size() == (W + 1 - r % 2) / 2, "split size");

  // The sharded golden forward over NCCL, ep = W on the MoE toy (sp = W on the same ranks too).
  const auto dir = fs::temp_directory_path() / fmt::format("opensci-nccl-test-{}-{}", getppid(), r);
  harness::ToyOptions t;
  t.config = fs::path(OPENSCI_SOURCE_DIR) / "toy_configs/opensci-moe.json";
  t.out = dir / "model";
  t.remote_code = fs::path(OPENSCI_SOURCE_DIR) / "fixtures/remote_code/opensci_moe";
  harness::build_toy(t);
  const Checkpoint ck(t.out);
  const auto tokens = TokenBatch::from_json_file(fs::path(OPENSCI_SOURCE_DIR) / "fixtures/tokens/padded-batch.json");
  ShardedOptions o;
  o.forward = {Precision::Golden, false};
  const auto sharded = sharded_forward(ck, tokens, Layout::make(W, W, W, r), *world, o);
  if (r == 0) {
    const auto ref = forward(ck, tokens, o.forward);
    check(sharded.result.logits.size() == ref.logits.size() &&
              std::memcmp(sharded.result.logits.data(), ref.logits.data(), ref.logits.size() * sizeof(float)) == 0,
          "sharded golden logits over NCCL are bit-identical to the unsharded forward");
  }
  fs::remove_all(dir);
  world->barrier();
  fmt::print("rank {}: {} failures\n", r, failures);
  return failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--rank") {
    try {
      return rank_main();
    } catch (const std::exception& e) {
      fmt::print(stderr, "rank error: {}\n", e.what());
      return 1;
    }
  }
  int devices = 0;
  const auto rc = gpuGetDeviceCount(&devices);
  if (rc != gpuSuccess || devices == 0) {
    fmt::print("not run: no GPU device for NCCL ranks ({})\n", rc != gpuSuccess ? gpuGetErrorString(rc) : "0 devices");
    return 77;
  }
  harness::ProcessSpec spec;
  spec.argv = {OPENSCI_MPIEXEC, "--oversubscribe", "-n", std::to_string(std::min(devices, 2)),
               fs::read_symlink("/proc/self/exe").string(), "--rank"};
  spec.env = {{"PATH", "/usr/local/bin:/usr/bin:/bin"}, {"HOME", fs::temp_directory_path().string()}, {"OMP_NUM_THREADS", "1"}};
  for (const char* pass : {"LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "NCCL_DEBUG"})
    if (const char* v = std::getenv(pass)) spec.env[pass] = v;
  if (::geteuid() == 0) spec.env["OMPI_ALLOW_RUN_AS_ROOT"] = spec.env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1";
  spec.timeout = std::chrono::seconds(300);
  const auto r = harness::run_process(spec);
  fmt::print("mpiexec: {}\n", r.describe());
  return r.ok() ? 0 : 1;
}
