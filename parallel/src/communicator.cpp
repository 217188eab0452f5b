#include "opensci/parallel/communicator.hpp"

#include "opensci/error.hpp"

namespace opensci::parallel {

size_t elem_size(Elem e) {
  switch (e) {
    case Elem::F64: return 8;
    case Elem::F32: return 4;
    case Elem::I64: return 8;
  }
  return 0;
}

void Traffic::add(const std::string& cls, uint64_t to_peers, uint64_t to_self) {
  auto& c = by_class[cls];
  c.to_peers += to_peers;
  c.to_self += to_self;
  c.calls += 1;
}

uint64_t Traffic::total_to_peers() const {
  uint64_t t = 0;
  for (const auto& [_, c] : by_class) t += c.to_peers;
  return t;
}

void Communicator::count_alltoallv(const std::vector<int64_t>& send_counts, Elem elem, const std::string& cls) {
  if (static_cast<int>(send_counts.size()) != size())
    fail("alltoallv ({}): {} send counts for {} ranks", cls, send_counts.size(), size());
  uint64_t peers = 0, self = 0;
  for (int r = 0; r < size(); ++r) {
    const auto bytes = static_cast<uint64_t>(send_counts[static_cast<size_t>(r)]) * elem_size(elem);
    (r == rank() ? self : peers) += bytes;
  }
  traffic_->add(cls, peers, self);
}

std::vector<int64_t> Communicator::alltoall_counts(const std::vector<int64_t>& send_counts) {
  const std::vector<int64_t> ones(static_cast<size_t>(size()), 1);
  std::vector<int64_t> recv(static_cast<size_t>(size()));
  alltoallv(send_counts.data(), ones, recv.data(), ones, Elem::I64, "counts");
  return recv;
}

}  // namespace opensci::parallel
