// Which engines this build has: MPI (OPENSCI_WITH_MPI) and NCCL/RCCL (OPENSCI_WITH_NCCL), and
// the stand-ins that say why when one is missing.
#include <fmt/format.h>

#include "opensci/error.hpp"
#include "opensci/parallel/communicator.hpp"
#if defined(OPENSCI_HAVE_MPI)
#include "mpi_communicator.hpp"
#endif

namespace opensci::parallel {

std::vector<std::string> available_engines() {
  std::vector<std::string> e;
#if defined(OPENSCI_HAVE_MPI)
  e.push_back("mpi");
#endif
#if defined(OPENSCI_HAVE_NCCL)
  e.push_back("nccl");
#endif
  return e;
}

std::unique_ptr<Communicator> make_world(const std::string& engine, [[maybe_unused]] int device) {
#if defined(OPENSCI_HAVE_MPI)
  if (engine == "mpi") return make_mpi_world();
#endif
#if defined(OPENSCI_HAVE_NCCL)
  if (engine == "nccl") return make_nccl_world(device);
#endif
  const std::string hint = engine == "mpi"    ? " (configure with -DOPENSCI_WITH_MPI=ON; Debian: libopenmpi-dev openmpi-bin)"
                           : engine == "nccl" ? " (configure a CUDA build with -DOPENSCI_WITH_NCCL=ON)"
                                              : "";
  fail("communication engine '{}' is not built into this binary{}", engine, hint);
}

#if !defined(OPENSCI_HAVE_MPI)
MpiSession::MpiSession(int*, char***) {}
MpiSession::~MpiSession() = default;
bool MpiSession::built() { return false; }
#endif

}  // namespace opensci::parallel
