// One matrix cell: the captured transformers run against a reference backend, judged by a
// tolerance and an expected outcome ("pass" or "xfail:<hazard>"). Writes a result JSON that
// `opensci-compat report` renders.
//
// A verdict cannot be right for the wrong reason:
//  - the cell owns its inputs: the capture must have run the cell's own prompt batch (ids, mask
//    and positions by the documented convention, TokenBatch::from_json_file), every non-pad
//    position is compared, and the reference runs on the cell's batch, not the capture's;
//  - versions are verified: the environment's and the capture's transformers version must be
//    the one the matrix declares for the environment;
//  - the dtype is part of the verdict: a capture that ran in another dtype than requested (H6)
//    fails even when its numbers are within tolerance;
//  - an expected failure is proven: an exception must match the hazard's signature and no other;
//    a numeric hazard must be the only hazard the evidence names, the failure must be consistent
//    with it, and — where the hazard table names a fix — the counterfactual capture (the same
//    run with the fix added) must pass. Two explanations = FAIL ("expected H3, also H5").
#pragma once

#include <filesystem>
#include <string>
#include <vector>

namespace opensci::harness {

struct CellOptions {
  std::string name;
  std::filesystem::path capture;  // capture dir: outcome.json, output.safetensors, provenance.json, SKIPPED
  std::filesystem::path model;    // model dir the capture loaded
  std::filesystem::path tokens_file;  // the cell's prompt batch (required: the cell owns its inputs)
  std::string dtype = "float32";      // dtype the cell asked transformers to run in
  std::string variant;                // "<model>/<patch set>" the cell asked for
  std::vector<std::string> shims;     // runtime shims the cell's patch set applies
  std::string transformers;           // version the matrix declares ("4.57.6", "5.17", "latest"; "" = unchecked)
  std::string backend = "cpu", precision = "fp64";
  std::filesystem::path tolerance_file;
  std::string tolerance;
  std::filesystem::path hazards_file;  // empty: HazardTable::default_file()
  std::string expect = "pass";
  std::filesystem::path counterfactual;  // capture dir of the same run + the expected hazard's fix
  std::filesystem::path result;          // result JSON
  std::string reference_defect;          // mutation tests only: a defect the reference commits (forward.hpp)
  std::vector<std::string> labels;
  // Sequence / expert parallel sizes: sp * ep > 1 runs the sharded reference on real ranks
  // (parallel/include/opensci/parallel/cell_parallel.hpp); the binary the ranks run (empty = this
  // executable) and the job's timeout.
  int sp = 1, ep = 1;
  std::filesystem::path rank_program;
  int parallel_timeout_s = 120;
};

// Exit code for CTest: 0 pass or expected failure, 1 failure or unexpected pass, 77 not run
// (the capture could not run here; the reason is printed).
int run_cell(const CellOptions& options);

// "5.12" matches "5.12.1" and "5.12"; "5.12.1" matches only itself; "latest" matches anything.
bool version_matches(const std::string& declared, const std::string& actual);

}  // namespace opensci::harness
