// The ranks of a sharded forward talk only through a distributed engine behind this interface:
//   MpiCommunicator   MPI (Open MPI on Debian): CPU ranks, host buffers (mpi_communicator.cpp);
//   NcclCommunicator  NCCL (RCCL on ROCm): GPU ranks, bootstrapped over MPI (nccl_communicator.cpp).
// There is no transport of our own: every byte between ranks goes through MPI_Alltoallv,
// MPI_Gatherv, ncclSend/ncclRecv, ... The only thing implemented here is the bookkeeping: every
// communicator counts the bytes it sends to other ranks (a rank's message to itself is a local
// copy and is counted apart), per traffic class, so benchmarks compare them with the analytic
// all-to-all minimum.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace opensci::parallel {

enum class Elem { F64, F32, I64 };
size_t elem_size(Elem e);
template <typename T>
constexpr Elem elem_of();
template <>
constexpr Elem elem_of<double>() { return Elem::F64; }
template <>
constexpr Elem elem_of<float>() { return Elem::F32; }
template <>
constexpr Elem elem_of<int64_t>() { return Elem::I64; }

// Bytes a rank sent, by traffic class ("sp.qkv", "sp.out", "ep.dispatch", "ep.combine", "ep.index",
// "counts", "gather"). `to_peers` crosses ranks; `to_self` is the rank's own share (a memcpy in
// the engine, never on a wire).
struct Traffic {
  struct Counter {
    uint64_t to_peers = 0, to_self = 0, calls = 0;
  };
  std::map<std::string, Counter> by_class;
  void add(const std::string& cls, uint64_t to_peers, uint64_t to_self);
  uint64_t total_to_peers() const;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // "mpi: Open MPI v4.1.4", "nccl 2.28.9 (host-staged)".
  virtual std::string engine() const = 0;

  // A sub-communicator of the ranks passing the same color, ordered by key (MPI_Comm_split).
  // It shares this communicator's traffic counters.
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  // All-to-all with counts (MPI_Alltoallv). send holds the blocks for ranks 0..size-1 back to
  // back, send_counts[r] elements for rank r; recv receives recv_counts[r] elements from rank r,
  // back to back. recv_counts must be what the peers send (exchange them with alltoall_counts).
  virtual void alltoallv(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                         const std::vector<int64_t>& recv_counts, Elem elem, const std::string& cls) = 0;
  // counts[r] for rank r -> what each rank r has for this one (MPI_Alltoall of one int64 each).
  std::vector<int64_t> alltoall_counts(const std::vector<int64_t>& send_counts);
  // Gathers `count` elements of every rank on `root`, rank after rank (MPI_Gatherv); counts are
  // exchanged first. Returns the per-rank counts on root (empty elsewhere).
  virtual std::vector<int64_t> gatherv(const void* send, int64_t count, std::vector<std::byte>& recv_on_root,
                                       Elem elem, int root, const std::string& cls) = 0;
  virtual void barrier() = 0;
  // Ends every rank of the job at once (MPI_Abort): a rank that cannot go on must not leave the
  // others waiting in a collective.
  [[noreturn]] virtual void abort(int code) = 0;

  Traffic& traffic() { return *traffic_; }
  const Traffic& traffic() const { return *traffic_; }

 protected:
  explicit Communicator(std::shared_ptr<Traffic> traffic) : traffic_(std::move(traffic)) {}
  void count_alltoallv(const std::vector<int64_t>& send_counts, Elem elem, const std::string& cls);
  std::shared_ptr<Traffic> traffic_;
};

// Typed conveniences.
template <typename T>
void alltoallv(Communicator& comm, const std::vector<T>& send, const std::vector<int64_t>& send_counts,
               std::vector<T>& recv, const std::vector<int64_t>& recv_counts, const std::string& cls) {
  int64_t total = 0;
  for (auto c : recv_counts) total += c;
  recv.resize(static_cast<size_t>(total));
  comm.alltoallv(send.data(), send_counts, recv.data(), recv_counts, elem_of<T>(), cls);
}

// Engines compiled into this build ("mpi", "nccl"); `make_world` builds the world communicator
// of one of them (MPI must be initialised first, see MpiSession).
std::vector<std::string> available_engines();
std::unique_ptr<Communicator> make_world(const std::string& engine, int device);

// MPI_Init_thread / MPI_Finalize for the process (the NCCL communicator bootstraps over MPI too).
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  static bool built();  // false: this binary has no MPI (configured without OPENSCI_WITH_MPI)
};

}  // namespace opensci::parallel
