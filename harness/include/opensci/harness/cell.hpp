// One matrix cell: the captured transformers run against a reference backend, judged by a
// tolerance and an expected outcome ("pass" or "xfail:<hazard>", strict: an unexpected pass
// fails the cell). Writes a result JSON that `opensci-compat report` renders.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

namespace opensci::harness {

struct CellOptions {
  std::string name;
  std::filesystem::path capture;  // capture dir: outcome.json, output.safetensors, provenance.json, SKIPPED
  std::filesystem::path model;    // model dir the capture loaded
  std::string backend = "cpu", precision = "fp64";
  std::filesystem::path tolerance_file;
  std::string tolerance;
  std::string expect = "pass";
  std::filesystem::path result;   // result JSON
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

}  // namespace opensci::harness
