// The NCCL engine (RCCL on ROCm: the same API, OPENSCI_PARALLEL_RCCL): ncclSend/ncclRecv in a
// group for all-to-all and gather, ncclCommSplit, ncclCommAbort. Bootstrapped over MPI (rank 0's
// ncclUniqueId goes to the others by MPI_Bcast), one GPU per rank.
//
// Host-staged: the sharded reference computes on the host, so each collective copies its host
// send buffer to the rank's device, runs NCCL between the devices and copies the result back.
// Traffic is counted as for MPI (bytes handed to NCCL for other ranks).
#include <mpi.h>

#include <fmt/format.h>

#include <cstring>

#if defined(OPENSCI_PARALLEL_RCCL)
#include <hip/hip_runtime.h>
#include <rccl/rccl.h>
#define gpuError_t hipError_t
#define gpuSuccess hipSuccess
#define gpuGetErrorString hipGetErrorString
#define gpuSetDevice hipSetDevice
#define gpuGetDeviceCount hipGetDeviceCount
#define gpuMalloc hipMalloc
#define gpuFree hipFree
#define gpuMemcpyAsync hipMemcpyAsync
#define gpuMemcpyHostToDevice hipMemcpyHostToDevice
#define gpuMemcpyDeviceToHost hipMemcpyDeviceToHost
#define gpuStream_t hipStream_t
#define gpuStreamCreate hipStreamCreate
#define gpuStreamDestroy hipStreamDestroy
#define gpuStreamSynchronize hipStreamSynchronize
#define OPENSCI_GPU_RUNTIME "HIP"
#else
#include <cuda_runtime.h>
#include <nccl.h>
#define gpuError_t cudaError_t
#define gpuSuccess cudaSuccess
#define gpuGetErrorString cudaGetErrorString
#define gpuSetDevice cudaSetDevice
#define gpuGetDeviceCount cudaGetDeviceCount
#define gpuMalloc cudaMalloc
#define gpuFree cudaFree
#define gpuMemcpyAsync cudaMemcpyAsync
#define gpuMemcpyHostToDevice cudaMemcpyHostToDevice
#define gpuMemcpyDeviceToHost cudaMemcpyDeviceToHost
#define gpuStream_t cudaStream_t
#define gpuStreamCreate cudaStreamCreate
#define gpuStreamDestroy cudaStreamDestroy
#define gpuStreamSynchronize cudaStreamSynchronize
#define OPENSCI_GPU_RUNTIME "CUDA"
#endif

#include "mpi_communicator.hpp"
#include "opensci/error.hpp"

namespace opensci::parallel {
namespace {

void gpu_check(gpuError_t rc, const char* what) {
  if (rc != gpuSuccess) fail("{} failed: {} ({})", what, gpuGetErrorString(rc), OPENSCI_GPU_RUNTIME);
}
void nccl_check(ncclResult_t rc, const char* what) {
  if (rc != ncclSuccess) fail("{} failed: {}", what, ncclGetErrorString(rc));
}

ncclDataType_t nccl_type(Elem e) {
  switch (e) {
    case Elem::F64: return ncclFloat64;
    case Elem::F32: return ncclFloat32;
    case Elem::I64: return ncclInt64;
  }
  return ncclUint8;
}

// A device buffer that grows to the largest request.
class DeviceBuffer {
 public:
  ~DeviceBuffer() {
    if (ptr_) gpuFree(ptr_);
  }
  std::byte* get(size_t bytes) {
    if (bytes > capacity_) {
      if (ptr_) gpu_check(gpuFree(ptr_), "device free");
      ptr_ = nullptr;
      gpu_check(gpuMalloc(reinterpret_cast<void**>(&ptr_), bytes), "device malloc (NCCL staging)");
      capacity_ = bytes;
    }
    return ptr_;
  }

 private:
  std::byte* ptr_ = nullptr;
  size_t capacity_ = 0;
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, std::shared_ptr<Traffic> traffic) : Communicator(std::move(traffic)), comm_(comm) {
    nccl_check(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank");
    nccl_check(ncclCommCount(comm_, &size_), "ncclCommCount");
    gpu_check(gpuStreamCreate(&stream_), "stream create");
  }
  ~NcclCommunicator() override {
    gpuStreamDestroy(stream_);
    ncclCommDestroy(comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string engine() const override {
    int v = 0;
    ncclGetVersion(&v);
    return fmt::format("nccl {}.{}.{} (host-staged)", v / 10000, (v / 100) % 100, v % 100);
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    ncclComm_t sub;
    nccl_check(ncclCommSplit(comm_, color, key, &sub, nullptr), "ncclCommSplit");
    return std::make_unique<NcclCommunicator>(sub, traffic_);
  }

  void alltoallv(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                 const std::vector<int64_t>& recv_counts, Elem elem, const std::string& cls) override {
    count_alltoallv(send_counts, elem, cls);
    const size_t es = elem_size(elem);
    int64_t send_total = 0, recv_total = 0;
    for (auto c : send_counts) send_total += c;
    for (auto c : recv_counts) recv_total += c;
    auto* sdev = send_dev_.get(static_cast<size_t>(send_total) * es + 1);
    auto* rdev = recv_dev_.get(static_cast<size_t>(recv_total) * es + 1);
    gpu_check(gpuMemcpyAsync(sdev, send, static_cast<size_t>(send_total) * es, gpuMemcpyHostToDevice, stream_),
              "copy to device");
    nccl_check(ncclGroupStart(), "ncclGroupStart");
    int64_t so = 0, ro = 0;
    for (int p = 0; p < size_; ++p) {
      const auto sc = static_cast<size_t>(send_counts[static_cast<size_t>(p)]);
      const auto rc = static_cast<size_t>(recv_counts[static_cast<size_t>(p)]);
      if (sc) nccl_check(ncclSend(sdev + so * static_cast<int64_t>(es), sc, nccl_type(elem), p, comm_, stream_), "ncclSend");
      if (rc) nccl_check(ncclRecv(rdev + ro * static_cast<int64_t>(es), rc, nccl_type(elem), p, comm_, stream_), "ncclRecv");
      so += static_cast<int64_t>(sc);
      ro += static_cast<int64_t>(rc);
    }
    nccl_check(ncclGroupEnd(), "ncclGroupEnd");
    gpu_check(gpuMemcpyAsync(recv, rdev, static_cast<size_t>(recv_total) * es, gpuMemcpyDeviceToHost, stream_),
              "copy to host");
    gpu_check(gpuStreamSynchronize(stream_), "stream synchronize (alltoallv)");
  }

  std::vector<int64_t> gatherv(const void* send, int64_t count, std::vector<std::byte>& recv_on_root, Elem elem,
                               int root, const std::string& cls) override {
    // Counts: every rank sends its count to root only (an all-to-all with zero elsewhere).
    std::vector<int64_t> one(static_cast<size_t>(size_), 0), got(static_cast<size_t>(size_), 0);
    one[static_cast<size_t>(root)] = 1;
    if (rank_ == root) std::fill(got.begin(), got.end(), 1);
    std::vector<int64_t> counts(static_cast<size_t>(rank_ == root ? size_ : 0));
    alltoallv(&count, one, counts.data(), got, Elem::I64, "counts");
    std::vector<int64_t> sc(static_cast<size_t>(size_), 0), rc(static_cast<size_t>(size_), 0);
    sc[static_cast<size_t>(root)] = count;
    int64_t total = 0;
    if (rank_ == root) {
      rc = counts;
      for (auto c : counts) total += c;
    }
    recv_on_root.resize(static_cast<size_t>(total) * elem_size(elem));
    alltoallv(send, sc, recv_on_root.data(), rc, elem, cls);
    return counts;
  }

  void barrier() override {
    int64_t token = 0;
    std::vector<int64_t> ones(static_cast<size_t>(size_), 1), back(static_cast<size_t>(size_));
    std::vector<int64_t> all(static_cast<size_t>(size_), token);
    alltoallv(all.data(), ones, back.data(), ones, Elem::I64, "barrier");
  }
  [[noreturn]] void abort(int code) override {
    ncclCommAbort(comm_);
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);
  }

 private:
  ncclComm_t comm_;
  gpuStream_t stream_{};
  int rank_ = 0, size_ = 1;
  DeviceBuffer send_dev_, recv_dev_;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_world(int device) {
  int initialised = 0, rank = 0, size = 1;
  MPI_Initialized(&initialised);
  if (!initialised) fail("the NCCL communicator bootstraps over MPI: initialise MPI first (MpiSession)");
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  int devices = 0;
  gpu_check(gpuGetDeviceCount(&devices), "device count");
  if (devices == 0) fail("rank {}: no {} device for the NCCL communicator", rank, OPENSCI_GPU_RUNTIME);
  if (device < 0) {
    MPI_Comm node;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node);
    int local = 0;
    MPI_Comm_rank(node, &local);
    MPI_Comm_free(&node);
    device = local % devices;
  }
  gpu_check(gpuSetDevice(device), "set device");
  ncclUniqueId id;
  if (rank == 0) nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId");
  MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD);
  ncclComm_t comm;
  nccl_check(ncclCommInitRank(&comm, size, id, rank), "ncclCommInitRank");
  return std::make_unique<NcclCommunicator>(comm, std::make_shared<Traffic>());
}

}  // namespace opensci::parallel
