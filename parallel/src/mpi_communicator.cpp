// The MPI engine: MPI_Alltoallv, MPI_Gatherv, MPI_Comm_split, MPI_Abort (Open MPI on Debian).
#include <mpi.h>

#include <climits>
#include <cstring>

#include "opensci/error.hpp"
#include "opensci/parallel/communicator.hpp"
#include "mpi_communicator.hpp"

namespace opensci::parallel {
namespace {

MPI_Datatype mpi_type(Elem e) {
  switch (e) {
    case Elem::F64: return MPI_DOUBLE;
    case Elem::F32: return MPI_FLOAT;
    case Elem::I64: return MPI_INT64_T;
  }
  return MPI_BYTE;
}

void check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  fail("{} failed: {}", what, std::string(text, static_cast<size_t>(len)));
}

// MPI counts and displacements are int: a message past INT_MAX elements is refused by name.
std::vector<int> to_int(const std::vector<int64_t>& v, const char* what) {
  std::vector<int> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if (v[i] < 0 || v[i] > INT_MAX) fail("{}: count {} for rank {} does not fit MPI's int counts", what, v[i], i);
    out[i] = static_cast<int>(v[i]);
  }
  return out;
}

std::vector<int> displacements(const std::vector<int>& counts, const char* what) {
  std::vector<int> d(counts.size());
  int64_t at = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    if (at > INT_MAX) fail("{}: displacement {} does not fit MPI's int displacements", what, at);
    d[i] = static_cast<int>(at);
    at += counts[i];
  }
  return d;
}

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(MPI_Comm comm, bool owned, std::shared_ptr<Traffic> traffic)
      : Communicator(std::move(traffic)), comm_(comm), owned_(owned) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~MpiCommunicator() override {
    if (owned_) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string engine() const override { return mpi_library_version(); }

  std::unique_ptr<Communicator> split(int color, int key) override {
    MPI_Comm sub;
    check(MPI_Comm_split(comm_, color, key, &sub), "MPI_Comm_split");
    return std::make_unique<MpiCommunicator>(sub, true, traffic_);
  }

  void alltoallv(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                 const std::vector<int64_t>& recv_counts, Elem elem, const std::string& cls) override {
    count_alltoallv(send_counts, elem, cls);
    const auto sc = to_int(send_counts, "MPI_Alltoallv send"), rc = to_int(recv_counts, "MPI_Alltoallv recv");
    const auto sd = displacements(sc, "MPI_Alltoallv send"), rd = displacements(rc, "MPI_Alltoallv recv");
    check(MPI_Alltoallv(send, sc.data(), sd.data(), mpi_type(elem), recv, rc.data(), rd.data(), mpi_type(elem), comm_),
          "MPI_Alltoallv");
  }

  std::vector<int64_t> gatherv(const void* send, int64_t count, std::vector<std::byte>& recv_on_root, Elem elem,
                               int root, const std::string& cls) override {
    std::vector<int64_t> counts(static_cast<size_t>(size_));
    check(MPI_Gather(&count, 1, MPI_INT64_T, counts.data(), 1, MPI_INT64_T, root, comm_), "MPI_Gather (counts)");
    traffic_->add("counts", rank_ == root ? 0 : sizeof(int64_t), rank_ == root ? sizeof(int64_t) : 0);
    const auto bytes = static_cast<uint64_t>(count) * elem_size(elem);
    traffic_->add(cls, rank_ == root ? 0 : bytes, rank_ == root ? bytes : 0);
    std::vector<int> rc, rd;
    if (rank_ == root) {
      rc = to_int(counts, "MPI_Gatherv");
      rd = displacements(rc, "MPI_Gatherv");
      int64_t total = 0;
      for (auto c : counts) total += c;
      recv_on_root.resize(static_cast<size_t>(total) * elem_size(elem));
    }
    check(MPI_Gatherv(send, to_int({count}, "MPI_Gatherv")[0], mpi_type(elem), recv_on_root.data(), rc.data(),
                      rd.data(), mpi_type(elem), root, comm_),
          "MPI_Gatherv");
    if (rank_ != root) counts.clear();
    return counts;
  }

  void barrier() override { check(MPI_Barrier(comm_), "MPI_Barrier"); }
  [[noreturn]] void abort(int code) override {
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);
  }

 private:
  MPI_Comm comm_;
  bool owned_;
  int rank_ = 0, size_ = 1;
};

}  // namespace

std::string mpi_library_version() {
  char text[MPI_MAX_LIBRARY_VERSION_STRING];
  int len = 0;
  MPI_Get_library_version(text, &len);
  std::string v(text, static_cast<size_t>(len));
  if (auto comma = v.find(','); comma != std::string::npos) v.resize(comma);  // "Open MPI v4.1.4"
  return "mpi: " + v;
}

std::unique_ptr<Communicator> make_mpi_world() {
  int initialised = 0;
  MPI_Initialized(&initialised);
  if (!initialised) fail("the MPI communicator needs MPI initialised first (MpiSession)");
  return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, false, std::make_shared<Traffic>());
}


MpiSession::MpiSession(int* argc, char*** argv) {
  int provided = 0;
  check(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
}

MpiSession::~MpiSession() {
  int finalised = 0;
  MPI_Finalized(&finalised);
  if (!finalised) MPI_Finalize();
}

bool MpiSession::built() { return true; }

}  // namespace opensci::parallel
