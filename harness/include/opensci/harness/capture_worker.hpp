// The capture worker: one long-lived python per environment (harness/python/worker.py) that
// imports torch and transformers once and forks a fresh child per capture, so a capture costs
// the capture, not the interpreter start (~4 s of imports on the Debian sid rootfs).
//
// Design (see worker.py for the child's side):
//  - Identity: a worker serves exactly one (environment, interpreter environment, worker.py
//    version) combination; its key hashes the environment id and build, the complete
//    environment a capture gets minus its private per-run directories (so OMP_NUM_THREADS etc.,
//    which torch/OpenMP/OpenBLAS read at import, always match), worker.py's content, the
//    protocol. Socket, lock, log and info file are <dir>/<key>.{sock,lock,log,json}; a changed
//    environment or worker.py is a new key, hence a new worker (the old one idles out).
//  - <dir> defaults to <cache root>/workers and is bind-mounted into a rootfs environment at the
//    same path, so the socket works from inside the chroot and from the host alike.
//  - Start: connect; when nothing listens, flock(<key>.lock), re-check, remove a stale socket
//    file, start the worker detached (spawn_detached: own session, output to its log, none of
//    our descriptors, so CTest never waits for it) and wait until it listens (it binds only
//    after its imports: connectable = ready). Two harnesses racing start one worker.
//  - A capture: the harness opens stdout/stderr itself and passes them with SCM_RIGHTS; for a
//    rootfs it also passes a detached clone (open_tree(2)) of each directory the capture must
//    see (model, tokens, output, scripts), which the child attaches at the same path inside a
//    mount namespace of its own. The worker reports the child's pid (= its process group) and
//    later its exit; the harness keeps the timeout: it asks the worker to SIGTERM, then SIGKILL
//    the group (the worker holds the unreaped leader, so the group id cannot be reused), and
//    kills the group itself when the worker does not answer.
//  - Dying: the harness gone (connection closed) -> the worker kills the capture's group; the
//    worker gone -> the child dies by PR_SET_PDEATHSIG, the harness kills what is left of the
//    group and reports a crash (never a pass).
//  - Meaning: a child checks that the state it inherited is the worker's pristine post-import
//    state (no transformers_modules.*, no shim markers, unchanged transformers globals) and
//    refuses to run otherwise; outcome.json "runner" and provenance.json "runner" record worker
//    pid, start, captures served, fork-to-exit seconds and that check.
#pragma once

#include <chrono>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "opensci/harness/environment.hpp"
#include "opensci/harness/process.hpp"

namespace opensci::harness {

struct WorkerSettings {
  std::filesystem::path dir;  // sockets, locks, logs, info files; empty = default_worker_dir()
  // A worker started by this call exits after this long without a connection
  // (OPENSCI_WORKER_IDLE_SECONDS overrides).
  std::chrono::seconds idle{180};
  // Longest wait for a worker to become ready (its imports), including waiting for another
  // harness that is starting it.
  std::chrono::milliseconds start_timeout{std::chrono::minutes(10)};
  // Tests only: comma-separated shims the worker applies to ITSELF after recording its pristine
  // state (a worker of its own key), so that the children's clean-start check must fire.
  std::string pollute_for_test;
};

// One `python script args...` for the worker; the fields mean what they mean for
// Environment::python (extra_env must set the private HOME/TMPDIR/HF_HOME/...).
struct WorkerJob {
  std::filesystem::path script;
  std::vector<std::string> args;
  std::vector<std::filesystem::path> host_dirs;
  std::map<std::string, std::string> extra_env;
  std::filesystem::path stdout_path, stderr_path;
  std::chrono::milliseconds timeout{0};  // <= 0: none
  std::chrono::milliseconds kill_grace{2000};
};

struct WorkerRun {
  // True: the job ran in a worker and `proc` says how it ended. False: nothing was started and
  // fallback_reason says why (the caller runs it cold).
  bool used = false;
  std::string fallback_reason;
  ProcessResult proc;
  bool worker_lost = false;   // the worker died (or stopped answering) while the capture ran
  bool unclean = false;       // the child found a non-pristine state and refused to run
  bool setup_failed = false;  // the child could not set the capture up; the script never ran
  std::string detail;         // for worker_lost / unclean / setup_failed: what happened
  nlohmann::json record;      // outcome.json "runner": mode, worker pid, started_at, served, ...
};

WorkerRun run_in_worker(const Environment& env, const WorkerJob& job, const WorkerSettings& settings = {});

// $OPENSCI_WORKER_DIR, else <cache root>/workers
std::filesystem::path default_worker_dir();

struct WorkerInfo {
  std::string key;
  std::filesystem::path socket;
  int pid = 0;
  std::string state;      // "ready", "unresponsive", "dead"
  nlohmann::json status;  // what the worker says about itself (or its info file)
};

// The workers under `dir` (from their info files and sockets).
std::vector<WorkerInfo> list_workers(const std::filesystem::path& dir);

// Stops every worker under `dir` (running captures are killed) and removes stale sockets and
// info files. Returns one line per worker handled.
std::vector<std::string> stop_workers(const std::filesystem::path& dir);

}  // namespace opensci::harness
