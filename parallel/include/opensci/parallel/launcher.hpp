// Runs the sharded forward as a job of real ranks: `mpiexec -n W opensci-compat forward-sharded`
// as a subprocess of the harness (harness/src/process.hpp: its own session, a timeout, the
// process group killed and reaped), and judges the job from mpiexec's exit, its per-rank logs
// (mpiexec --output-filename) and each rank's status file (rank.<r>.json: state, last stage,
// error). A rank that crashes, raises, exits early or hangs makes the launch fail with a
// summary naming that rank and what it did:
//   "rank 1 of 2 crashed: killed by signal 11 (Segmentation fault) during 'layer 0 attention'"
//   "rank 1 of 2 hung: timed out after 20.0 s at 'layer 0 attention' (not in a collective)
//    while ranks 0 waited in 'layer 0 attention all-to-all (sequence -> heads)'"
// Open MPI puts every rank in a process group of its own, so after the job the launcher also
// kills whatever is left of mpiexec's session (ranks, and their children) and says how many.
#pragma once

#include <chrono>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace opensci::parallel {

struct LaunchOptions {
  std::filesystem::path program;  // the opensci-compat binary; empty = this executable (/proc/self/exe)
  std::filesystem::path model, tokens_file;
  std::filesystem::path work;     // created: output.safetensors, rank.<r>.json, logs/
  std::string precision = "fp64";  // fp64 | fp32
  int sp = 1, ep = 1, world = 0;   // world 0 = sp * ep
  std::string engine = "mpi";
  bool hidden_states = true;
  int repeats = 1;
  int threads_per_rank = 1;  // OMP/OpenBLAS threads of each rank
  std::string inject_fault;  // forwarded to the ranks (fault tests)
  std::chrono::milliseconds timeout{std::chrono::seconds(120)};
};

struct RankReport {
  int rank = 0;
  std::string state;      // finished | error | crashed | exited early | hung | killed | never started
  std::string stage;      // the last stage it reported
  bool in_collective = false;
  std::string detail;     // error message, signal, exit
  std::string stderr_tail;
};

struct LaunchResult {
  bool ok = false;
  std::string summary;  // one line; on failure it names the failing rank(s) and their error
  int world = 0;
  std::vector<RankReport> ranks;
  nlohmann::json rank_status = nlohmann::json::array();  // every rank.<r>.json as written
  std::filesystem::path output;                          // output.safetensors (rank 0)
  double wall_seconds = 0;
  int strays_killed = 0;  // processes of mpiexec's session still alive after it ended
  std::string command;    // the mpiexec command line
  nlohmann::json to_json() const;
};

// False with the reason when this build or machine cannot launch ranks (no MPI built in, no mpiexec).
bool launcher_available(std::string* reason);

LaunchResult launch_sharded(const LaunchOptions& options);

// Kills every live process of session `sid` (SIGKILL) and waits for them to go; returns how many
// there were. The launcher calls it on mpiexec's session after every job: if mpiexec itself was
// killed (SIGKILL after the grace period), the ranks die with it (PR_SET_PDEATHSIG) but what they
// started lives on in process groups of its own.
int kill_job_session(int sid);

// Stage names the sharded forward reports while it waits for its peers in a collective.
bool is_collective_stage(const std::string& stage);

}  // namespace opensci::parallel
