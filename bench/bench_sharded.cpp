// Benchmark: the sharded fp32 reference forward at 1, 2, 4 ranks (real MPI ranks through the
// launcher, mpiexec oversubscribed when ranks > cores), with the unsharded forward in this process
// as the peer measured in the same run; and the bytes each rank sends per layer against the
// analytic all-to-all minimum (counted in the communicator). Not a test: it prints figures.
//
//   opensci-bench-sharded --work /tmp/bench-sharded [--config bench/configs/opensci-ref-0.4b.json]
//                         [--seq 512] [--ranks 1,2,4] [--mode sp|ep] [--repeats 3]
#include <omp.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cblas.h>
#include <fmt/core.h>
#include <fstream>
#include <sstream>
#include <thread>

#include "opensci/convert.hpp"
#include "opensci/error.hpp"
#include "opensci/forward.hpp"
#include "opensci/harness/toy.hpp"
#include "opensci/parallel/cell_parallel.hpp"
#include "opensci/parallel/launcher.hpp"

namespace fs = std::filesystem;
using namespace opensci;

namespace {

double process_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// The machine's 1-minute load average: wall times on a shared machine mean little when it exceeds the cores.
double load_average() {
  std::ifstream in("/proc/loadavg");
  double l = 0;
  in >> l;
  return l;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"sharded reference forward at 1, 2, 4 ranks: wall time and all-to-all bytes vs the analytic minimum"};
  std::string work = "/tmp/opensci-bench-sharded", config = OPENSCI_SOURCE_DIR "/bench/configs/opensci-ref-0.4b.json";
  std::string remote_code = OPENSCI_SOURCE_DIR "/fixtures/remote_code/opensci_ref", ranks_text = "1,2,4", mode = "sp",
              json_out;
  int64_t seq = 512, batch = 1;
  int repeats = 3, threads = 0;
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  app.add_option("--work", work, "model and scratch dir (the random-weight model is cached here)");
  app.add_option("--config", config, "config.json of the benchmarked shape");
  app.add_option("--remote-code", remote_code, "remote code copied next to the config (unused by the reference)");
  app.add_option("--seq", seq, "prefill length");
  app.add_option("--batch", batch, "batch rows (ep mode splits rows over ranks)");
  app.add_option("--ranks", ranks_text, "comma-separated rank counts");
  app.add_option("--mode", mode, "sp (Ulysses over the sequence) or ep (experts; MoE configs)")
      ->check(CLI::IsMember({"sp", "ep"}));
  app.add_option("--repeats", repeats, "timed repetitions per size (median over them, max over ranks)");
  app.add_option("--threads", threads,
                 "threads of the unsharded peer and of each rank (default: all cores / cores per rank); 1 keeps "
                 "OpenMP's spin-waiting out of the CPU-seconds");
  app.add_option("--json", json_out, "write the figures as JSON");
  CLI11_PARSE(app, argc, argv);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // figures as they come, also into a log file

  try {
    const fs::path model = fs::path(work) / "model";
    if (!fs::exists(model / "model.safetensors")) {
      fmt::print("building random-weight model in {} ...\n", model.string());
      harness::ToyOptions o;
      o.config = config;
      o.seed = 1;
      o.out = model;
      o.remote_code = remote_code;
      harness::build_toy(o);
    }
    // MoE: the ranks read expert blocks of the fused layout, as in the cells (converted once).
    fs::path rank_model = model;
    if (load_config(model / "config.json").is_moe()) {
      rank_model = fs::path(work) / "model-fused";
      if (!fs::exists(rank_model / "config.json")) {
        convert::ConvertOptions co;
        co.input = model;
        co.output = rank_model;
        co.to = convert::Format::HfFused;
        convert::convert_checkpoint(co);
      }
    }
    const Checkpoint ck(model);
    const auto& c = ck.config();
    harness::DeterministicRng rng(42);
    TokenBatch tokens;
    tokens.batch = batch;
    tokens.seq = seq;
    for (int64_t i = 0; i < batch * seq; ++i) {
      tokens.input_ids.push_back(static_cast<int64_t>(rng.next() % static_cast<uint64_t>(c.vocab_size)));
      tokens.attention_mask.push_back(1);
      tokens.position_ids.push_back(i % seq);
    }
    const auto tokens_file = fs::path(work) / "tokens.json";
    parallel::write_tokens_json(tokens, tokens_file);

    // The peer: the unsharded forward in this process, all cores.
    const int peer_threads = threads > 0 ? threads : cores;
    omp_set_num_threads(peer_threads);
    openblas_set_num_threads(peer_threads);
    forward(ck, tokens, {Precision::Fast, false});  // page in the mapped weights
    std::vector<double> unsharded, unsharded_cpu;
    for (int r = 0; r < repeats; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      const double c0 = process_cpu_seconds();
      forward(ck, tokens, {Precision::Fast, false});
      unsharded.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      unsharded_cpu.push_back(process_cpu_seconds() - c0);
    }
    fmt::print("shape: hidden {}, {} layers, {} heads ({} kv), head_dim {}, vocab {}{}; batch {} x seq {}; {} cores\n",
               c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size,
               c.is_moe() ? fmt::format(", {} experts top-{}", c.num_experts, c.num_experts_per_tok) : "", batch, seq,
               cores);
    fmt::print("unsharded fp32 forward (this process, {} threads): median {:.3f} s wall, {:.3f} CPU-s; load average {:.1f}\n",
               peer_threads, median(unsharded), median(unsharded_cpu), load_average());
    nlohmann::json out = {{"seq", seq}, {"batch", batch}, {"cores", cores}, {"mode", mode},
                          {"unsharded_s", median(unsharded)}, {"unsharded_cpu_s", median(unsharded_cpu)},
                          {"sizes", nlohmann::json::array()}};

    std::stringstream ss(ranks_text);
    for (std::string item; std::getline(ss, item, ',');) {
      const int n = std::stoi(item);
      parallel::LaunchOptions lo;
      lo.program = OPENSCI_CLI;  // the ranks run opensci-compat forward-sharded
      lo.model = rank_model;
      lo.tokens_file = tokens_file;
      lo.work = fs::path(work) / fmt::format("{}{}", mode, n);
      lo.precision = "fp32";
      lo.sp = mode == "sp" ? n : 1;
      lo.ep = mode == "ep" ? n : 1;
      lo.hidden_states = false;
      lo.repeats = repeats + 1;  // the first pages the weights in
      lo.threads_per_rank = threads > 0 ? threads : std::max(1, cores / n);
      lo.timeout = std::chrono::minutes(20);
      const auto r = parallel::launch_sharded(lo);
      if (!r.ok) fail("{} ranks: {}", n, r.summary);
      // Per repeat the slowest rank; then the median over repeats (the first excluded).
      // CPU-seconds summed over ranks: the work, whatever share of the cores the ranks got.
      std::vector<double> per_repeat, cpu_per_repeat;
      for (int i = 1; i <= repeats; ++i) {
        double slowest = 0, cpu_total = 0;
        for (const auto& st : r.rank_status) {
          slowest = std::max(slowest, st["seconds"][static_cast<size_t>(i)].get<double>());
          cpu_total += st["cpu_seconds"][static_cast<size_t>(i)].get<double>();
        }
        per_repeat.push_back(slowest);
        cpu_per_repeat.push_back(cpu_total);
      }
      // Bytes per rank per layer: the largest any rank sent, and its analytic minimum.
      std::map<std::string, std::pair<uint64_t, uint64_t>> by_kind;  // kind -> (max sent, its minimum)
      std::map<std::string, uint64_t> self_kind;
      for (const auto& st : r.rank_status)
        for (const auto& l : st["layers"]) {
          auto& e = by_kind[l["kind"].get<std::string>()];
          if (l["sent"].get<uint64_t>() >= e.first) e = {l["sent"].get<uint64_t>(), l["minimum"].get<uint64_t>()};
          self_kind[l["kind"].get<std::string>()] = std::max(self_kind[l["kind"].get<std::string>()], l["to_self"].get<uint64_t>());
        }
      const double t = median(per_repeat);
      fmt::print("{} ranks ({} threads each): median {:.3f} s per forward (slowest rank), {:.2f}x the unsharded run; "
                 "{:.3f} CPU-s summed over ranks ({:.2f}x); job {:.1f} s; load average {:.1f}\n",
                 n, lo.threads_per_rank, t, t / median(unsharded), median(cpu_per_repeat),
                 median(cpu_per_repeat) / median(unsharded_cpu), r.wall_seconds, load_average());
      nlohmann::json size = {{"ranks", n}, {"threads_per_rank", lo.threads_per_rank}, {"median_s", t}, {"runs_s", per_repeat},
                             {"cpu_s", median(cpu_per_repeat)}};
      for (const auto& [kind, e] : by_kind) {
        fmt::print("  {} layer: {:.3f} MB sent per rank (max over ranks), analytic all-to-all minimum {:.3f} MB ({}), "
                   "kept local {:.3f} MB\n",
                   kind, static_cast<double>(e.first) / 1e6, static_cast<double>(e.second) / 1e6,
                   e.first == e.second ? "equal" : fmt::format("ratio {:.3f}", static_cast<double>(e.first) / static_cast<double>(std::max<uint64_t>(e.second, 1))),
                   static_cast<double>(self_kind[kind]) / 1e6);
        size[kind] = {{"sent_bytes", e.first}, {"minimum_bytes", e.second}, {"to_self_bytes", self_kind[kind]}};
      }
      out["sizes"].push_back(size);
    }
    if (!json_out.empty()) std::ofstream(json_out) << out.dump(2) << "\n";
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 2;
  }
  return 0;
}
