#include "opensci/parallel/launcher.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <unistd.h>

#include <csignal>
#include <fstream>
#include <regex>
#include <set>
#include <thread>

#include "opensci/error.hpp"
#include "opensci/harness/process.hpp"

namespace opensci::parallel {
namespace fs = std::filesystem;
using nlohmann::json;

bool is_collective_stage(const std::string& stage) {
  return stage.find("all-to-all") != std::string::npos || stage.starts_with("gather") || stage == "finished";
}

namespace {

std::string mpiexec_path() {
#if defined(OPENSCI_MPIEXEC)
  return OPENSCI_MPIEXEC;
#else
  return "";
#endif
}

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

json read_json_file(const fs::path& p) {
  std::ifstream in(p);
  if (!in) return json();
  try {
    return json::parse(in);
  } catch (const json::exception&) {
    return json();
  }
}

// Pids of live processes in session `sid` (from /proc/<pid>/stat, field 6), zombies excluded.
std::vector<int> session_members(int sid) {
  std::vector<int> pids;
  for (const auto& entry : fs::directory_iterator("/proc")) {
    const auto name = entry.path().filename().string();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    const auto stat = read_text(entry.path() / "stat");
    const auto close = stat.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream rest(stat.substr(close + 2));
    std::string state;
    int ppid = 0, pgrp = 0, session = 0;
    rest >> state >> ppid >> pgrp >> session;
    if (session == sid && state != "Z") pids.push_back(std::stoi(name));
  }
  return pids;
}

std::string tail_lines(const std::string& text, size_t max_lines) {
  size_t at = text.size(), lines = 0;
  while (at > 0 && lines <= max_lines) {
    at = text.rfind('\n', at - 1);
    if (at == std::string::npos) {
      at = 0;
      break;
    }
    ++lines;
  }
  auto out = text.substr(at == 0 ? 0 : at + 1);
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}

// What mpiexec said about a rank ("process rank 1 ... exited on signal 11 (Segmentation fault)").
struct MpiexecVerdict {
  std::map<int, std::string> crashed, improper, aborted, nonzero;
};

MpiexecVerdict parse_mpiexec(const std::string& log) {
  MpiexecVerdict v;
  // Open MPI 4.1 wording; messages are wrapped over lines, so match across whitespace.
  std::string flat = std::regex_replace(log, std::regex(R"(\s+)"), " ");
  std::smatch m;
  static const std::regex signal_re(R"(process rank (\d+) with PID \d+ on node \S+ exited on signal (\d+) \(([^)]*)\))");
  for (auto it = std::sregex_iterator(flat.begin(), flat.end(), signal_re); it != std::sregex_iterator(); ++it)
    v.crashed[std::stoi((*it)[1])] = fmt::format("killed by signal {} ({})", (*it)[2].str(), (*it)[3].str());
  static const std::regex improper_re(R"(due to process rank (\d+) with PID \d+ on node \S+ exiting improperly)");
  for (auto it = std::sregex_iterator(flat.begin(), flat.end(), improper_re); it != std::sregex_iterator(); ++it)
    v.improper[std::stoi((*it)[1])] = "exited without MPI_Finalize while the others were still running";
  static const std::regex abort_re(R"(MPI_ABORT was invoked on rank (\d+) in communicator \S+ with errorcode (\d+))");
  for (auto it = std::sregex_iterator(flat.begin(), flat.end(), abort_re); it != std::sregex_iterator(); ++it)
    v.aborted[std::stoi((*it)[1])] = fmt::format("called MPI_Abort (error code {})", (*it)[2].str());
  static const std::regex nonzero_re(R"(Process name: \[\[\d+,\d+\],(\d+)\] Exit code: (\d+))");
  for (auto it = std::sregex_iterator(flat.begin(), flat.end(), nonzero_re); it != std::sregex_iterator(); ++it)
    v.nonzero[std::stoi((*it)[1])] = fmt::format("exit code {}", (*it)[2].str());
  return v;
}

std::string join_ranks(const std::vector<int>& ranks) {
  return fmt::format("{} {}", ranks.size() == 1 ? "rank" : "ranks", fmt::join(ranks, ", "));
}

}  // namespace

int kill_job_session(int sid) {
  if (sid <= 1 || sid == ::getsid(0)) return 0;  // never our own session
  auto pids = session_members(sid);
  const int found = static_cast<int>(pids.size());
  for (int pid : pids) ::kill(pid, SIGKILL);
  for (int i = 0; i < 100 && !session_members(sid).empty(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  return found;
}

bool launcher_available(std::string* reason) {
#if !defined(OPENSCI_HAVE_MPI)
  if (reason) *reason = "this build has no MPI (configure with -DOPENSCI_WITH_MPI=ON; Debian: libopenmpi-dev openmpi-bin)";
  return false;
#else
  if (::access(mpiexec_path().c_str(), X_OK) != 0) {
    if (reason) *reason = fmt::format("mpiexec {} is not executable here (Debian: openmpi-bin)", mpiexec_path());
    return false;
  }
  return true;
#endif
}

json LaunchResult::to_json() const {
  json r = json::array();
  for (const auto& k : ranks)
    r.push_back({{"rank", k.rank},
                 {"state", k.state},
                 {"stage", k.stage},
                 {"in_collective", k.in_collective},
                 {"detail", k.detail},
                 {"stderr_tail", k.stderr_tail}});
  return {{"ok", ok},           {"summary", summary},           {"world", world},
          {"ranks", r},         {"rank_status", rank_status},   {"output", output.string()},
          {"wall_seconds", wall_seconds}, {"strays_killed", strays_killed}, {"command", command}};
}

LaunchResult launch_sharded(const LaunchOptions& o) {
  LaunchResult res;
  std::string why;
  if (!launcher_available(&why)) fail("cannot launch sharded ranks: {}", why);
  const int W = o.world > 0 ? o.world : o.sp * o.ep;
  res.world = W;
  const fs::path program = o.program.empty() ? fs::read_symlink("/proc/self/exe") : o.program;
  fs::create_directories(o.work);
  for (const auto& entry : fs::directory_iterator(o.work))
    if (entry.path().filename().string().starts_with("rank.") || entry.path().filename() == "output.safetensors")
      fs::remove(entry.path());
  fs::remove_all(o.work / "logs");
  res.output = o.work / "output.safetensors";
  const auto session_file = o.work / "session.pid";
  fs::remove(session_file);

  std::vector<std::string> mpiexec = {mpiexec_path(), "--oversubscribe", "--bind-to", "none", "-n", std::to_string(W),
                                      "--output-filename", (o.work / "logs").string()};
  std::vector<std::string> rank_args = {program.string(), "forward-sharded", "--model", fs::absolute(o.model).string(),
                                        "--tokens-file", fs::absolute(o.tokens_file).string(), "--dtype", o.precision,
                                        "--sp", std::to_string(o.sp), "--ep", std::to_string(o.ep), "--engine", o.engine,
                                        "--out", res.output.string(), "--status-dir", o.work.string(),
                                        "--repeats", std::to_string(o.repeats)};
  if (o.hidden_states) rank_args.push_back("--hidden-states");
  if (!o.inject_fault.empty()) rank_args.insert(rank_args.end(), {"--inject-fault", o.inject_fault});
  harness::ProcessSpec spec;
  // The shell is the session leader (run_process starts a new session): its pid names the session
  // every rank lives in, whatever process groups mpiexec gives them.
  spec.argv = {"/bin/sh", "-c", "echo $$ > " + harness::shell_quote(session_file.string()) + " && exec \"$@\"", "sh"};
  spec.argv.insert(spec.argv.end(), mpiexec.begin(), mpiexec.end());
  spec.argv.insert(spec.argv.end(), rank_args.begin(), rank_args.end());
  for (size_t i = 4; i < spec.argv.size(); ++i) res.command += (i > 4 ? " " : "") + harness::shell_quote(spec.argv[i]);
  const auto threads = std::to_string(std::max(1, o.threads_per_rank));
  spec.env = {{"PATH", "/usr/local/bin:/usr/bin:/bin"},
              {"HOME", o.work.string()},
              {"TMPDIR", "/tmp"},  // Open MPI's session directory holds unix sockets: keep the path short
              {"LANG", "C.UTF-8"},
              {"OMP_NUM_THREADS", threads},
              {"OPENBLAS_NUM_THREADS", threads},
              {"OMPI_MCA_mpi_yield_when_idle", "1"}};
  if (::geteuid() == 0) {
    spec.env["OMPI_ALLOW_RUN_AS_ROOT"] = "1";
    spec.env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1";
  }
  for (const char* pass : {"LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "NCCL_DEBUG"})
    if (const char* v = std::getenv(pass)) spec.env[pass] = v;
  spec.timeout = o.timeout;
  spec.kill_grace = std::chrono::milliseconds(3000);
  spec.stdout_path = spec.stderr_path = o.work / "mpiexec.log";
  const auto proc = harness::run_process(spec);
  res.wall_seconds = proc.wall_seconds;

  int sid = 0;
  try {
    sid = std::stoi(read_text(session_file));
  } catch (const std::exception&) {
    sid = 0;
  }
  res.strays_killed = kill_job_session(sid) + proc.strays_killed;

  const auto log = read_text(o.work / "mpiexec.log");
  const auto said = parse_mpiexec(log);
  std::vector<int> unfinished;
  for (int r = 0; r < W; ++r) {
    RankReport k;
    k.rank = r;
    const auto st = read_json_file(o.work / fmt::format("rank.{}.json", r));
    res.rank_status.push_back(st);
    k.stderr_tail = tail_lines(read_text(o.work / "logs" / "1" / fmt::format("rank.{}", r) / "stderr"), 6);
    if (st.is_null()) {
      k.state = "never started";
    } else {
      k.stage = st.value("stage", "");
      k.in_collective = st.value("collective", false);
      k.state = st.value("state", "");
      if (k.state == "error") k.detail = st.value("error", "");
    }
    if (k.state != "finished" && k.state != "error") {
      if (said.crashed.count(r)) {
        k.state = "crashed";
        k.detail = said.crashed.at(r);
      } else if (said.improper.count(r) && !said.aborted.count(r)) {
        k.state = "exited early";
        k.detail = said.improper.at(r);
      } else if (proc.timed_out) {
        k.state = k.in_collective ? "waiting" : "hung";
        k.detail = k.in_collective ? "waiting for its peers in a collective" : "not in a collective";
      } else if (said.nonzero.count(r)) {
        k.state = "exited early";
        k.detail = said.nonzero.at(r);
      } else if (k.state != "never started") {
        k.state = "killed";
        k.detail = "ended by mpiexec after another rank failed";
      }
    }
    if (k.state != "finished") unfinished.push_back(r);
    res.ranks.push_back(k);
  }

  res.ok = proc.ok() && unfinished.empty() && fs::exists(res.output);
  if (res.ok) {
    res.summary = fmt::format("{} ranks (sp {}, ep {}) finished in {:.2f} s", W, o.sp, o.ep, proc.wall_seconds);
    return res;
  }
  // Name the culprit(s): ranks that failed by themselves, not those taken down with the job.
  std::vector<std::string> parts;
  std::vector<int> waiting;
  std::string waiting_stage;
  for (const auto& k : res.ranks) {
    const auto during = k.stage.empty() ? std::string() : fmt::format(" during '{}'", k.stage);
    if (k.state == "error")
      parts.push_back(fmt::format("rank {} of {} failed: {}{}", k.rank, W, k.detail, during));
    else if (k.state == "crashed")
      parts.push_back(fmt::format("rank {} of {} crashed: {}{}", k.rank, W, k.detail, during));
    else if (k.state == "exited early")
      parts.push_back(fmt::format("rank {} of {} exited early: {}{}", k.rank, W, k.detail, during));
    else if (k.state == "hung")
      parts.push_back(fmt::format("rank {} of {} hung: {} after {:.1f} s at '{}' (not in a collective)", k.rank, W,
                                  "timed out", proc.wall_seconds, k.stage));
    else if (k.state == "never started")
      parts.push_back(fmt::format("rank {} of {} never started (no status file)", k.rank, W));
    else if (k.state == "waiting") {
      waiting.push_back(k.rank);
      waiting_stage = k.stage;
    }
  }
  if (!waiting.empty()) {
    if (parts.empty())
      parts.push_back(fmt::format("timed out after {:.1f} s with {} waiting in '{}'", proc.wall_seconds,
                                  join_ranks(waiting), waiting_stage));
    else
      parts.back() += fmt::format(" while {} waited in '{}'", join_ranks(waiting), waiting_stage);
  }
  if (parts.empty()) {
    parts.push_back(proc.ok() && !fs::exists(res.output)
                        ? fmt::format("every rank finished but rank 0 wrote no {}", res.output.string())
                        : fmt::format("mpiexec {}: {}", proc.describe(), tail_lines(log, 3)));
  }
  res.summary = fmt::format("{}", fmt::join(parts, "; "));
  if (res.strays_killed > 0) res.summary += fmt::format(" ({} leftover processes of the job killed)", res.strays_killed);
  return res;
}

}  // namespace opensci::parallel
