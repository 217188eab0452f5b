// The reference forward (reference/src/forward.cpp) sharded over the ranks of a Communicator:
// sequence parallel (Ulysses) and expert parallel, alone or together (see layout.hpp).
//
// Every op is the reference's own (opensci::ops, the same loops on the golden path, the same
// sgemm on the fast path) applied to the tokens a rank holds; all reductions stay inside one
// rank: attention reduces over the whole sequence of one (row, head) on the rank holding that
// head, a token's MoE output is summed on the token's own rank in increasing expert index as the
// reference sums it, RMSNorm reduces over one token's hidden vector. So no reduction order
// depends on the number of ranks, and the golden (fp64) path is bit-identical to the unsharded
// reference at every sp/ep size (tests/parallel checks it). The fast path is too wherever
// OpenBLAS computes a row of sgemm independently of the number of rows (see
// matrix/tolerances.json "fp32-sharded" for the bound when it does not).
//
// Experts: each rank holds only its expert block, read from the fused v5 tensors
// (mlp.experts.gate_up_proj [E, 2I, H] rows e0..e1, down_proj [E, H, I]); a per-expert layer is
// assembled into the same fused block (gate rows then up rows, the converter's layout).
// Tokens go to the rank of each chosen expert once per rank (with the list of its experts
// there) and come back as one output per (token, expert) (all-to-all with counts; a rank may
// send or receive nothing).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "opensci/checkpoint.hpp"
#include "opensci/forward.hpp"
#include "opensci/parallel/communicator.hpp"
#include "opensci/parallel/layout.hpp"

namespace opensci::parallel {

// A fault a rank injects on purpose, for the fault tests: --inject-fault RANK:KIND[@LAYER].
//   crash     SIGSEGV (raise) in layer LAYER's attention
//   abort     std::abort() there
//   hang      sleeps forever there, with a grandchild `sleep 918273` in its process group
//   exit      std::_Exit(0) there (an early exit without MPI_Finalize)
//   error     throws an opensci::Error there (the rank reports it and aborts the job)
//   positions uses local instead of global positions for RoPE (a numeric fault: must fail the cell)
struct InjectedFault {
  int rank = -1;
  std::string kind;
  int64_t layer = 0;
  static InjectedFault parse(const std::string& spec);  // "" = none
  bool active_on(int r) const { return rank == r && !kind.empty(); }
};

struct ShardedOptions {
  ForwardOptions forward;
  InjectedFault fault;
  // Called at each stage ("layer 2 attention all-to-all"): the rank's progress file, so a
  // launcher that times out can say where each rank was.
  std::function<void(const std::string&)> progress;
};

// Per-layer figures of one rank, for benchmarks and the cell's report.
struct LayerTraffic {
  int64_t layer = 0;
  std::string kind;  // "attention" or "moe"
  uint64_t sent = 0, minimum = 0, to_self = 0;  // bytes to other ranks; analytic minimum; kept local
};

struct ShardedResult {
  ForwardResult result;  // logits and hidden states of the whole batch: on rank 0 only
  std::vector<LayerTraffic> layers;
  Traffic traffic;       // everything this rank sent, by class
  double seconds = 0;      // wall time of the forward on this rank (weights are mmapped: no load step)
  double cpu_seconds = 0;  // CPU time of this rank's process meanwhile (all its threads)
};

// Runs on every rank of `world` (collectively); `layout` must be Layout::make(world.size(), ...).
ShardedResult sharded_forward(const Checkpoint& checkpoint, const TokenBatch& tokens, const Layout& layout,
                              Communicator& world, const ShardedOptions& options);

}  // namespace opensci::parallel
