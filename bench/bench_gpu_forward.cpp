// Benchmark: the GPU reference forward (GpuModel, bf16 by default) at the published 1.7B shape,
// prefill, random weights drawn on the device. Prints time, achieved TFLOP/s and bytes/s, as
// fractions of the peaks given on the command line; harness/python/bench_gpu_transformers.py
// times transformers (sdpa) on the same shape so a GPU session can put the two side by side
// (--compare reads its JSON). Not a test.
//
//   opensci-bench-gpu-forward [--config bench/configs/opensci-ref-1.7b.json] [--seq 2048]
//       [--batch 1,8] [--dtype bf16] [--peak-tflops 989] [--peak-gbs 4800] [--repeats 5]
//       [--gemm auto|tiled] [--json out.json] [--compare transformers.json]
#include <fmt/core.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "opensci/error.hpp"
#include "opensci/gpu/device.hpp"
#include "opensci/gpu/forward.hpp"

using namespace opensci;

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// FLOPs of one prefill, counted as bench_forward.cpp does: projections, MLP, LM head, and the
// causal attention's two matmuls over the seq (seq + 1) / 2 visible (query, key) pairs.
double prefill_flops(const ModelConfig& c, int64_t batch, int64_t seq) {
  const double T = static_cast<double>(batch * seq), H = static_cast<double>(c.hidden_size);
  const double D = static_cast<double>(c.head_dim), NH = static_cast<double>(c.num_heads),
               NKV = static_cast<double>(c.num_kv_heads);
  const double per_layer = H * D * (2 * NH + 2 * NKV) + 3 * H * static_cast<double>(c.intermediate_size);
  const double linear = T * (static_cast<double>(c.num_layers) * per_layer + H * static_cast<double>(c.vocab_size));
  const double attention = static_cast<double>(c.num_layers * batch) * NH * D * static_cast<double>(seq * (seq + 1));
  return 2 * (linear + attention);
}

ModelConfig load_bench_config(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail("{}: cannot open the benchmark config", path);
  auto j = nlohmann::json::parse(in);
  for (auto it = j.begin(); it != j.end();) it = it.key().starts_with("_") ? j.erase(it) : std::next(it);
  return parse_config(j, path);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"GPU reference forward (prefill) at the 1.7B shape: time, TFLOP/s and bandwidth vs given peaks"};
  std::string config_path = OPENSCI_SOURCE_DIR "/bench/configs/opensci-ref-1.7b.json", dtype = "bf16", gemm = "auto",
              json_out, compare;
  std::vector<int64_t> batches{1, 8};
  int64_t seq = 2048;
  int repeats = 5, warmup = 2;
  double peak_tflops = 0, peak_gbs = 0;
  uint64_t seed = 1234;
  app.add_option("--config", config_path, "config.json of the benchmarked shape");
  app.add_option("--seq", seq, "prefill length");
  app.add_option("--batch", batches, "batch sizes")->delimiter(',');
  app.add_option("--dtype", dtype, "storage dtype")->check(CLI::IsMember({"bf16", "fp32"}));
  app.add_option("--gemm", gemm, "auto (vendor BLAS when built) or tiled")->check(CLI::IsMember({"auto", "tiled"}));
  app.add_option("--peak-tflops", peak_tflops,
                 "dense peak of the device for --dtype, TFLOP/s (H100/H200 SXM bf16: 989)");
  app.add_option("--peak-gbs", peak_gbs, "peak memory bandwidth, GB/s (H200: 4800, H100 SXM: 3350)");
  app.add_option("--repeats", repeats, "timed forward passes per batch (median reported)");
  app.add_option("--warmup", warmup, "untimed forward passes first");
  app.add_option("--seed", seed, "seed of the random weights and token ids");
  app.add_option("--json", json_out, "write the figures as JSON");
  app.add_option("--compare", compare, "JSON of bench_gpu_transformers.py for the same shape: print the ratio");
  CLI11_PARSE(app, argc, argv);

  try {
    const auto probe = gpu::probe_device();
    if (!probe.available) {
      fmt::print(stderr, "opensci-bench-gpu-forward: {}\n", probe.reason);
      return 77;
    }
    const ModelConfig config = load_bench_config(config_path);
    gpu::GpuForwardOptions options;
    options.dtype = dtype == "bf16" ? gpu::DType::BF16 : gpu::DType::F32;
    options.gemm = gemm == "tiled" ? gpu::GemmBackend::Tiled : gpu::GemmBackend::Auto;
    const auto model = gpu::GpuModel::random(config, seed, options);
    fmt::print("device {} ({}), {} parameters {:.2f} GiB in {}, GEMM {}\n", probe.name, gpu::rt::kPlatform,
               config.source, static_cast<double>(model.parameter_bytes()) / (1 << 30), dtype, model.gemm_name());

    nlohmann::json out = {{"config", config_path},          {"device", probe.name},
                          {"platform", gpu::rt::kPlatform}, {"dtype", dtype},
                          {"gemm", model.gemm_name()},      {"seq", seq},
                          {"peak_tflops", peak_tflops},     {"peak_gbs", peak_gbs},
                          {"runs", nlohmann::json::array()}};
    std::mt19937_64 rng(seed);
    for (const int64_t batch : batches) {
      TokenBatch tokens;
      tokens.batch = batch;
      tokens.seq = seq;
      std::uniform_int_distribution<int64_t> pick(0, config.vocab_size - 1);
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t s = 0; s < seq; ++s) {
          tokens.input_ids.push_back(pick(rng));
          tokens.attention_mask.push_back(1);
          tokens.position_ids.push_back(s);
        }
      gpu::GpuRunOptions run;
      run.download_logits = false;  // logits stay on the device, as in a prefill
      for (int i = 0; i < warmup; ++i) model.forward(tokens, run);
      std::vector<double> seconds;
      for (int i = 0; i < repeats; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        model.forward(tokens, run);  // returns after the device finished
        seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
      const double t = median(seconds);
      const double flops = prefill_flops(config, batch, seq);
      const double tflops = flops / t / 1e12;
      // Bytes a prefill cannot avoid: every weight read once, the logits written once.
      const double bytes = static_cast<double>(model.parameter_bytes()) +
                           static_cast<double>(batch * seq * config.vocab_size) * (dtype == "bf16" ? 2.0 : 4.0);
      const double gbs = bytes / t / 1e9;
      fmt::print(
          "batch {} x seq {}: median {:.2f} ms (min {:.2f}), {:.0f} tokens/s, {:.1f} TFLOP/s{}, {:.0f} GB/s{}\n", batch,
          seq, t * 1e3, *std::min_element(seconds.begin(), seconds.end()) * 1e3, static_cast<double>(batch * seq) / t,
          tflops, peak_tflops > 0 ? fmt::format(" ({:.1f}% of {:.0f})", 100 * tflops / peak_tflops, peak_tflops) : "",
          gbs,
          peak_gbs > 0 ? fmt::format(" ({:.1f}% of {:.0f}, weights + logits once)", 100 * gbs / peak_gbs, peak_gbs)
                       : "");
      out["runs"].push_back({{"batch", batch},
                             {"median_seconds", t},
                             {"seconds", seconds},
                             {"flops", flops},
                             {"tflops", tflops},
                             {"min_bytes", bytes},
                             {"gbs", gbs},
                             {"fraction_of_peak_tflops", peak_tflops > 0 ? tflops / peak_tflops : 0.0},
                             {"fraction_of_peak_gbs", peak_gbs > 0 ? gbs / peak_gbs : 0.0}});
    }
    if (!compare.empty()) {
      std::ifstream in(compare);
      if (!in) fail("--compare {}: cannot open", compare);
      const auto theirs = nlohmann::json::parse(in);
      for (const auto& r : theirs.at("runs"))
        for (const auto& mine : out["runs"])
          if (mine["batch"] == r.at("batch") && theirs.value("seq", seq) == seq)
            fmt::print("batch {}: opensci {:.2f} ms vs transformers ({}) {:.2f} ms: ratio {:.2f}x\n",
                       r.at("batch").get<int64_t>(), mine["median_seconds"].get<double>() * 1e3,
                       theirs.value("attn_implementation", "?"), r.at("median_seconds").get<double>() * 1e3,
                       mine["median_seconds"].get<double>() / r.at("median_seconds").get<double>());
    }
    if (!json_out.empty()) std::ofstream(json_out) << out.dump(2) << "\n";
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 2;
  }
  return 0;
}
