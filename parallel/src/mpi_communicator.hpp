// Internal: the MPI world communicator and the engine registry (engines.cpp).
#pragma once

#include <memory>
#include <string>

#include "opensci/parallel/communicator.hpp"

namespace opensci::parallel {

std::unique_ptr<Communicator> make_mpi_world();  // MPI_COMM_WORLD; MPI must be initialised
std::string mpi_library_version();               // "mpi: Open MPI v4.1.4"
// NCCL (or RCCL) world over the same ranks, bootstrapped with MPI_Bcast of the unique id;
// device < 0: the node-local rank modulo the visible devices.
std::unique_ptr<Communicator> make_nccl_world(int device);

}  // namespace opensci::parallel
