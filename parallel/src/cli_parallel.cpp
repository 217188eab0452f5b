// `forward-sharded`: one rank of the sharded reference forward (run it under mpiexec; the
// launcher in launcher.cpp does). Every rank keeps <status-dir>/rank.<r>.json up to date with its
// stage, so a launcher whose job fails or times out can say which rank did what; rank 0 writes
// the output (the same format as `forward`).
#include <fmt/core.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <csignal>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "../../harness/src/commands.hpp"
#include "opensci/error.hpp"
#include "opensci/harness/matrix.hpp"
#include "opensci/parallel/capture_distributed.hpp"
#include "opensci/parallel/communicator.hpp"
#include "opensci/parallel/launcher.hpp"
#include "opensci/parallel/sharded_forward.hpp"

namespace opensci::cli {
namespace {
namespace fs = std::filesystem;
using nlohmann::json;

// rank.<r>.json, rewritten atomically at every stage.
class RankStatus {
 public:
  RankStatus(fs::path dir, int rank) : dir_(std::move(dir)), rank_(rank) {
    status_ = {{"rank", rank}, {"pid", static_cast<int64_t>(getpid())}, {"state", "starting"}, {"stage", "init"}};
    if (!dir_.empty()) fs::create_directories(dir_);
  }
  json& data() { return status_; }
  void stage(const std::string& s) {
    status_["stage"] = s;
    status_["collective"] = parallel::is_collective_stage(s);
    write();
  }
  void state(const std::string& s) {
    status_["state"] = s;
    write();
  }
  void write() {
    if (dir_.empty()) return;
    const auto path = dir_ / fmt::format("rank.{}.json", rank_);
    const auto tmp = path.string() + ".tmp";
    std::ofstream(tmp) << status_.dump(1) << "\n";
    fs::rename(tmp, path);
  }

 private:
  fs::path dir_;
  int rank_;
  json status_;
};

json layers_json(const std::vector<parallel::LayerTraffic>& layers) {
  json j = json::array();
  for (const auto& l : layers)
    j.push_back({{"layer", l.layer}, {"kind", l.kind}, {"sent", l.sent}, {"minimum", l.minimum}, {"to_self", l.to_self}});
  return j;
}

json traffic_json(const parallel::Traffic& t) {
  json j = json::object();
  for (const auto& [cls, c] : t.by_class) j[cls] = {{"to_peers", c.to_peers}, {"to_self", c.to_self}, {"calls", c.calls}};
  return j;
}

}  // namespace

void add_capture_distributed_command(CLI::App& app);

void add_parallel_commands(CLI::App& app) {
  add_capture_distributed_command(app);
  struct Args {
    std::string model, tokens_file, dtype = "fp64", out, engine = "mpi", status_dir, fault;
    int sp = 1, ep = 1, device = -1, repeats = 1;
    bool hidden = false;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("forward-sharded",
                                 "One rank of the sequence/expert-parallel reference forward (run under mpiexec)");
  cmd->add_option("--model", a->model, "model directory")->required();
  cmd->add_option("--tokens-file", a->tokens_file, "JSON with input_ids, attention_mask[, position_ids]")->required();
  cmd->add_option("--dtype", a->dtype, "fp64 (golden) or fp32 (fast)")->check(CLI::IsMember({"fp64", "fp32"}));
  cmd->add_option("--sp", a->sp, "sequence-parallel size (Ulysses)");
  cmd->add_option("--ep", a->ep, "expert-parallel size");
  cmd->add_option("--engine", a->engine, "mpi (CPU ranks) or nccl (GPU ranks, bootstrapped over MPI)");
  cmd->add_option("--device", a->device, "GPU of this rank for nccl (default: node-local rank modulo devices)");
  cmd->add_option("--out", a->out, "output safetensors (written by rank 0)");
  cmd->add_flag("--hidden-states", a->hidden, "also gather and write per-layer tensors");
  cmd->add_option("--status-dir", a->status_dir, "directory for rank.<r>.json (stage, state, error, traffic)");
  cmd->add_option("--repeats", a->repeats, "run the forward this many times (benchmarks; the first is the output)");
  cmd->add_option("--inject-fault", a->fault, "RANK:KIND[@LAYER]: crash, abort, hang, exit, error, positions (tests)");
  cmd->callback([a] {
    // A rank must not outlive its launcher (mpiexec puts each rank in its own process group).
    const pid_t parent = getppid();
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) std::_Exit(70);
    if (!parallel::MpiSession::built())
      fail("forward-sharded: this binary has no MPI (configure with -DOPENSCI_WITH_MPI=ON; Debian: libopenmpi-dev)");
    parallel::MpiSession mpi(nullptr, nullptr);
    auto world = parallel::make_world(a->engine, a->device);
    RankStatus status(a->status_dir, world->rank());
    status.data()["engine"] = world->engine();
    status.state("running");
    try {
      const auto layout = parallel::Layout::make(world->size(), a->sp, a->ep, world->rank());
      status.data()["layout"] = layout.describe();
      parallel::ShardedOptions o;
      o.forward = {a->dtype == "fp64" ? Precision::Golden : Precision::Fast, a->hidden};
      o.fault = parallel::InjectedFault::parse(a->fault);
      o.progress = [&](const std::string& s) { status.stage(s); };
      status.stage("load checkpoint and tokens");
      const Checkpoint ck(a->model);
      const auto tokens = TokenBatch::from_json_file(a->tokens_file);
      std::vector<double> seconds, cpu_seconds;
      parallel::ShardedResult r;
      for (int i = 0; i < std::max(1, a->repeats); ++i) {
        world->barrier();
        auto run = parallel::sharded_forward(ck, tokens, layout, *world, o);
        seconds.push_back(run.seconds);
        cpu_seconds.push_back(run.cpu_seconds);
        if (i == 0) r = std::move(run);
        o.progress = nullptr;  // later repeats: no status writes inside the timed region
        o.forward.capture_hidden = false;
      }
      if (world->rank() == 0 && !a->out.empty())
        write_forward_result(r.result, tokens, a->out,
                             {{"producer", "opensci-compat sharded reference"},
                              {"dtype", a->dtype},
                              {"sp", std::to_string(a->sp)},
                              {"ep", std::to_string(a->ep)},
                              {"ranks", std::to_string(world->size())},
                              {"engine", world->engine()}});
      status.data()["seconds"] = seconds;
      status.data()["cpu_seconds"] = cpu_seconds;
      status.data()["layers"] = layers_json(r.layers);
      status.data()["traffic"] = traffic_json(r.traffic);
      status.stage("finished");
      world->barrier();  // nobody reports success before every rank got here
      status.state("finished");
    } catch (const std::exception& e) {
      status.data()["error"] = e.what();
      status.state("error");
      fmt::print(stderr, "rank {}: error: {}\n", world->rank(), e.what());
      std::fflush(stderr);
      world->abort(3);
    }
  });
}

void add_capture_distributed_command(CLI::App& app) {
  struct Args {
    parallel::DistributedCaptureOptions o;
    std::string matrix, env, spec;
    int timeout = 600;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand(
      "capture-distributed", "Capture transformers' own tensor/expert-parallel forward under torchrun (gloo on CPU)");
  cmd->add_option("--matrix", a->matrix, "matrix file whose environment --env to use");
  cmd->add_option("--env", a->env, "environment name in --matrix");
  cmd->add_option("--env-spec", a->spec, "environment spec JSON (instead of --matrix/--env)");
  cmd->add_option("--model", a->o.model, "model directory")->required();
  cmd->add_option("--tokens-file", a->o.tokens_file, "token batch JSON")->required();
  cmd->add_option("--mode", a->o.mode, "tp (tp_plan=\"auto\") or ep (DistributedConfig(enable_expert_parallel=True))")
      ->check(CLI::IsMember({"tp", "ep"}));
  cmd->add_option("--world", a->o.world, "ranks (torchrun --nproc-per-node)");
  cmd->add_option("--dtype", a->o.dtype, "float32 | bfloat16");
  cmd->add_option("--device", a->o.device, "cpu (gloo) | cuda (nccl)");
  cmd->add_option("--variant", a->o.variant, "<model>/<patch set>, recorded");
  cmd->add_option("--out", a->o.out, "capture directory")->required();
  cmd->add_option("--timeout", a->timeout, "seconds (default 600)");
  cmd->callback([a] {
    if (!a->spec.empty()) {
      a->o.env_spec = json::parse(a->spec);
    } else {
      if (a->matrix.empty() || a->env.empty()) fail("capture-distributed: give --env-spec, or --matrix and --env");
      const auto m = harness::load_matrix(a->matrix);
      if (!m.environments.count(a->env)) fail("{}: no environment '{}'", a->matrix, a->env);
      a->o.env_spec = m.environments.at(a->env).spec;
    }
    a->o.timeout = std::chrono::seconds(a->timeout);
    const auto r = parallel::run_distributed_capture(a->o);
    fmt::print("capture {}: {}\n", harness::capture_status_name(r.status), r.detail);
    if (r.status == harness::CaptureStatus::Unavailable) throw CLI::RuntimeError(77);
    // Like `capture`: the run is recorded whatever happened; the cell judges it.
  });
}

}  // namespace opensci::cli
