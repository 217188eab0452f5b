// Benchmark: the fp32 reference forward (prefill) against transformers + torch fp32 on CPU,
// same model directory, same tokens, same thread count, in one run. Not a test: it prints
// figures (and JSON with --json) for the issue notes.
//
//   opensci-bench-forward --work /tmp/bench [--config bench/configs/opensci-ref-0.4b.json]
//                         [--seq 128] [--batch 1] [--threads N] [--repeats 5] [--no-torch]
#include <cblas.h>
#include <omp.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <fmt/core.h>
#include <fstream>
#include <thread>

#include "opensci/error.hpp"
#include "opensci/forward.hpp"
#include "opensci/harness/environment.hpp"
#include "opensci/harness/toy.hpp"

namespace fs = std::filesystem;
using namespace opensci;

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Multiply-adds of one prefill (x2 = FLOPs): projections, MLP, LM head, attention scores and values.
double prefill_flops(const ModelConfig& c, int64_t batch, int64_t seq) {
  const double T = static_cast<double>(batch * seq), H = static_cast<double>(c.hidden_size);
  const double D = static_cast<double>(c.head_dim), NH = static_cast<double>(c.num_heads), NKV = static_cast<double>(c.num_kv_heads);
  const double per_layer = H * D * (2 * NH + 2 * NKV) + 3 * H * static_cast<double>(c.intermediate_size);
  const double linear = T * (static_cast<double>(c.num_layers) * per_layer + H * static_cast<double>(c.vocab_size));
  const double attention = static_cast<double>(c.num_layers * batch) * NH * D * static_cast<double>(seq * (seq + 1));
  return 2 * (linear + attention);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fp32 reference forward vs transformers+torch (CPU), same run, same threads"};
  std::string work = "/tmp/opensci-bench", config = OPENSCI_SOURCE_DIR "/bench/configs/opensci-ref-0.4b.json";
  std::string remote_code = OPENSCI_SOURCE_DIR "/fixtures/remote_code/opensci_ref", json_out, spec_text;
  int64_t seq = 128, batch = 1;
  int threads = static_cast<int>(std::thread::hardware_concurrency()), repeats = 5;
  bool no_torch = false;
  std::string torch_blas_threads;
  app.add_option("--work", work, "model and scratch dir (the random-weight model is cached here)");
  app.add_option("--config", config, "config.json of the benchmarked shape");
  app.add_option("--seq", seq, "prefill length");
  app.add_option("--batch", batch, "batch size");
  app.add_option("--threads", threads, "threads for both sides");
  app.add_option("--repeats", repeats, "timed repetitions (median reported)");
  app.add_option("--env-spec", spec_text, "environment for transformers (default: the Debian sid rootfs)");
  app.add_option("--json", json_out, "write the figures as JSON");
  app.add_flag("--no-torch", no_torch, "reference only");
  app.add_option("--torch-blas-threads", torch_blas_threads,
                 "OPENBLAS_NUM_THREADS for the torch side (torch's OpenMP threads and OpenBLAS's own pool "
                 "oversubscribe small machines; measure both settings)");
  CLI11_PARSE(app, argc, argv);

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
    const Checkpoint ck(model);
    const auto& c = ck.config();
    // Seeded token ids, written for the torch side too.
    harness::DeterministicRng rng(42);
    nlohmann::json ids = nlohmann::json::array();
    std::vector<int64_t> flat;
    for (int64_t b = 0; b < batch; ++b) {
      nlohmann::json row = nlohmann::json::array();
      for (int64_t s = 0; s < seq; ++s) {
        const auto id = static_cast<int64_t>(rng.next() % static_cast<uint64_t>(c.vocab_size));
        row.push_back(id);
        flat.push_back(id);
      }
      ids.push_back(row);
    }
    const auto tokens_file = fs::path(work) / "tokens.json";
    std::ofstream(tokens_file) << nlohmann::json{{"input_ids", ids}}.dump();
    const auto tokens = TokenBatch::from_json_file(tokens_file);

    omp_set_num_threads(threads);
    openblas_set_num_threads(threads);
    const double flops = prefill_flops(c, batch, seq);
    std::vector<double> times;
    forward(ck, tokens, {Precision::Fast, false});  // warm-up: page in the mapped weights
    for (int r = 0; r < repeats; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      forward(ck, tokens, {Precision::Fast, false});
      times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    const double ref_s = median(times);
    fmt::print("shape: hidden {}, {} layers, {} heads, ffn {}, vocab {}; batch {} x seq {}; {} threads\n", c.hidden_size,
               c.num_layers, c.num_heads, c.intermediate_size, c.vocab_size, batch, seq, threads);
    fmt::print("reference fp32: median {:.3f} s over {} runs, {:.1f} GFLOP/s, {:.0f} tokens/s\n", ref_s, repeats,
               flops / ref_s / 1e9, static_cast<double>(batch * seq) / ref_s);
    nlohmann::json out = {{"batch", batch}, {"seq", seq}, {"threads", threads}, {"gflop", flops / 1e9},
                          {"reference_fp32", {{"median_s", ref_s}, {"runs_s", times}}}};

    if (!no_torch) {
      const auto spec = spec_text.empty() ? harness::default_environment_spec() : harness::load_spec(spec_text);
      auto provider = harness::make_provider(spec);
      if (const auto a = provider->probe(); !a) opensci::fail("torch side unavailable: {}", a.reason);
      harness::Progress progress("env " + provider->id());
      const auto env = provider->realise(progress);
      const auto run_dir = fs::path(work) / "torch-run";
      auto extra = harness::private_run_env(run_dir);
      extra["OMP_NUM_THREADS"] = std::to_string(threads);
      if (!torch_blas_threads.empty()) extra["OPENBLAS_NUM_THREADS"] = torch_blas_threads;
      const auto torch_json = fs::path(work) / "torch.json";
      fs::remove(torch_json);
      auto proc_spec = env.python(OPENSCI_SOURCE_DIR "/harness/python/bench_forward.py",
                                  {"--model", fs::absolute(model).string(), "--batch", std::to_string(batch), "--seq", std::to_string(seq),
                                   "--threads", std::to_string(threads), "--repeats", std::to_string(repeats), "--warmup", "1",
                                   "--dtype", "float32", "--out", fs::absolute(torch_json).string()},
                                  {OPENSCI_SOURCE_DIR "/harness/python", fs::absolute(work)}, extra, std::chrono::minutes(30));
      proc_spec.stderr_path = fs::path(work) / "torch.stderr";
      proc_spec.stdout_path = fs::path(work) / "torch.stdout";
      const auto res = harness::run_process(proc_spec);
      if (!res.ok()) opensci::fail("transformers benchmark failed: {}\n{}", res.describe(), res.stderr_tail);
      std::ifstream in(torch_json);
      const auto tj = nlohmann::json::parse(in);
      const double torch_s = tj.at("median_seconds").get<double>();
      fmt::print("transformers {} / torch {} fp32: median {:.3f} s, {:.1f} GFLOP/s\n", env.transformers_version,
                 env.torch_version, torch_s, flops / torch_s / 1e9);
      fmt::print("ratio torch / reference = {:.2f} (> 1: the reference is faster)\n", torch_s / ref_s);
      out["torch_fp32"] = tj;
      out["ratio_torch_over_reference"] = torch_s / ref_s;
    }
    if (!json_out.empty()) std::ofstream(json_out) << out.dump(2) << "\n";
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 2;
  }
  return 0;
}
