// The sp/ep hook of a matrix cell (harness/src/cell.cpp calls it once): for a cell with
// sp * ep > 1 the reference is the sharded forward, run as real ranks by the launcher, and it
// must first agree with the unsharded (sp1/ep1) reference of the same backend and precision:
//   fp64 (golden): bit for bit, logits and every hidden state (no reduction crosses ranks, see
//                  sharded_forward.hpp); one differing bit fails the cell, naming the tensor and
//                  the [row, position, index] of the first difference;
//   fp32 (fast):   within the tolerance "fp32-sharded" of matrix/tolerances.json (sgemm blocking
//                  may depend on the number of rows a rank holds).
// Then the cell compares the capture with the sharded reference as usual. MoE checkpoints stored
// per expert are converted to the fused v5 layout first (reference/src/convert), and every rank
// reads its expert block from the converted checkpoint.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "opensci/checkpoint.hpp"
#include "opensci/forward.hpp"
#include "opensci/harness/cell.hpp"

namespace opensci::parallel {

struct ParallelReference {
  enum class Status { Unused, Ok, Failed, NotRun };
  Status status = Status::Unused;  // Unused: sp1/ep1, the caller runs its own reference
  std::string summary;             // Failed / NotRun: the cell's summary line
  ForwardResult reference;         // Ok: the sharded forward (logits + hidden states)
};

// Writes what it did under result["parallel"] (layout, ranks, engine, per-rank status and
// traffic, the comparison with the unsharded reference).
ParallelReference run_parallel_reference(const harness::CellOptions& cell, const Checkpoint& checkpoint,
                                         const TokenBatch& tokens, nlohmann::json& result);

// TokenBatch -> {"input_ids", "attention_mask", "position_ids"} (positions explicit, so every
// rank uses the batch's own).
void write_tokens_json(const TokenBatch& tokens, const std::filesystem::path& path);

// Reads a forward output file (logits + hidden states) back into a ForwardResult.
ForwardResult read_forward_output(const std::filesystem::path& path);

}  // namespace opensci::parallel
