// opensci-bench-convert: throughput and peak memory of the streaming checkpoint converter.
//
// Writes a synthetic sharded per-expert MoE checkpoint (>= 2 GB by default, BF16, Qwen3-30B-A3B
// widths: H 2048, expert I 768, 16 experts per layer) under --dir, then in the same run:
//   copy     each shard mapped and written to a new file: the same bytes through the same
//            page-cache read + write path, no conversion (the I/O bound);
//   memcpy   the same byte count copied in memory (the memory-bandwidth bound);
//   convert  `opensci-compat convert` per-expert -> fused, and fused -> per-expert, each as a
//            child process so that its peak RSS (wait4 ru_maxrss) is its own.
// Peak RSS of every conversion must stay below one input shard plus one layer's experts
// (the converter's design bound); the program exits 1 when it does not. Everything it wrote
// is deleted at the end (unless --keep).
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fmt/core.h>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "opensci/safetensors.hpp"

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

struct Model {
  int64_t vocab = 32000, hidden = 2048, heads = 16, kv_heads = 4, head_dim = 128, experts = 16, moe_i = 768;
  int64_t layers = 0;
  uint64_t layer_expert_bytes() const { return static_cast<uint64_t>(experts * 3 * moe_i * hidden * 2); }  // BF16
};

nlohmann::json config_json(const Model& m) {
  return {{"model_type", "qwen3_moe"},        {"vocab_size", m.vocab},           {"hidden_size", m.hidden},
          {"intermediate_size", 6144},        {"moe_intermediate_size", m.moe_i}, {"num_hidden_layers", m.layers},
          {"num_attention_heads", m.heads},   {"num_key_value_heads", m.kv_heads}, {"head_dim", m.head_dim},
          {"num_experts", m.experts},         {"num_experts_per_tok", 8},        {"norm_topk_prob", true},
          {"tie_word_embeddings", false},     {"torch_dtype", "bfloat16"}};
}

// (name, shape) of every parameter, in the order HF writes a state dict: layer by layer.
std::vector<std::pair<std::string, std::vector<int64_t>>> parameters(const Model& m) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> p;
  const int64_t H = m.hidden, QD = m.heads * m.head_dim, KVD = m.kv_heads * m.head_dim;
  p.push_back({"model.embed_tokens.weight", {m.vocab, H}});
  for (int64_t l = 0; l < m.layers; ++l) {
    const auto pre = fmt::format("model.layers.{}.", l);
    p.push_back({pre + "input_layernorm.weight", {H}});
    p.push_back({pre + "self_attn.q_proj.weight", {QD, H}});
    p.push_back({pre + "self_attn.k_proj.weight", {KVD, H}});
    p.push_back({pre + "self_attn.v_proj.weight", {KVD, H}});
    p.push_back({pre + "self_attn.o_proj.weight", {H, QD}});
    p.push_back({pre + "self_attn.q_norm.weight", {m.head_dim}});
    p.push_back({pre + "self_attn.k_norm.weight", {m.head_dim}});
    p.push_back({pre + "post_attention_layernorm.weight", {H}});
    p.push_back({pre + "mlp.gate.weight", {m.experts, H}});
    for (int64_t e = 0; e < m.experts; ++e) {
      const auto ex = fmt::format("{}mlp.experts.{}.", pre, e);
      p.push_back({ex + "gate_proj.weight", {m.moe_i, H}});
      p.push_back({ex + "up_proj.weight", {m.moe_i, H}});
      p.push_back({ex + "down_proj.weight", {H, m.moe_i}});
    }
  }
  p.push_back({"model.norm.weight", {H}});
  p.push_back({"lm_head.weight", {m.vocab, H}});
  return p;
}

// Deterministic bytes (splitmix64), cheap enough not to dominate the setup.
void fill(std::vector<std::byte>& buf, uint64_t seed) {
  uint64_t s = seed;
  for (size_t i = 0; i + 8 <= buf.size(); i += 8) {
    uint64_t z = (s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    z &= 0x3f003f003f003f00ULL | 0x00ff00ff00ff00ffULL;  // finite BF16 values
    std::memcpy(buf.data() + i, &z, 8);
  }
}

// Writes the per-expert checkpoint, shards of about shard_bytes; returns the largest shard file.
uint64_t write_checkpoint(const fs::path& dir, const Model& m, uint64_t shard_bytes) {
  fs::create_directories(dir);
  std::ofstream(dir / "config.json") << config_json(m).dump(2);
  const auto params = parameters(m);
  std::vector<std::vector<size_t>> shards(1);
  uint64_t filled = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const uint64_t bytes = static_cast<uint64_t>(opensci::element_count(params[i].second)) * 2;
    if (filled > 0 && filled + bytes > shard_bytes) {
      shards.emplace_back();
      filled = 0;
    }
    shards.back().push_back(i);
    filled += bytes;
  }
  nlohmann::json index;
  uint64_t total = 0, largest = 0;
  for (size_t k = 0; k < shards.size(); ++k) {
    const auto file = fmt::format("model-{:05d}-of-{:05d}.safetensors", k + 1, shards.size());
    opensci::SafetensorsWriter w;
    for (size_t i : shards[k]) {
      const auto& [name, shape] = params[i];
      std::vector<std::byte> payload(static_cast<size_t>(opensci::element_count(shape)) * 2);
      fill(payload, i + 1);
      total += payload.size();
      index["weight_map"][name] = file;
      w.add(name, opensci::DType::BF16, shape, std::move(payload));
    }
    w.set_metadata("format", "pt");
    w.write(dir / file);
    largest = std::max<uint64_t>(largest, fs::file_size(dir / file));
  }
  index["metadata"] = {{"total_size", total}};
  std::ofstream(dir / "model.safetensors.index.json") << index.dump(2);
  return largest;
}

uint64_t dir_bytes(const fs::path& dir) {
  uint64_t n = 0;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file() && e.path().extension() == ".safetensors") n += e.file_size();
  return n;
}

// Every shard mapped and written to out/: the converter's I/O without the conversion.
double plain_copy(const fs::path& in, const fs::path& out) {
  fs::create_directories(out);
  const auto t0 = Clock::now();
  for (const auto& e : fs::directory_iterator(in)) {
    if (e.path().extension() != ".safetensors") continue;
    const int fd = ::open(e.path().c_str(), O_RDONLY);
    const size_t size = e.file_size();
    void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    ::close(fd);
    const int ofd = ::open((out / e.path().filename()).c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const auto* p = static_cast<const char*>(map);
    for (size_t done = 0; done < size;) {
      const ssize_t n = ::write(ofd, p + done, size - done);
      if (n <= 0) throw std::runtime_error("write failed: " + std::string(std::strerror(errno)));
      done += static_cast<size_t>(n);
    }
    ::close(ofd);
    ::munmap(map, size);
  }
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

double memcpy_seconds(uint64_t bytes) {
  const size_t chunk = 256u << 20;
  std::vector<std::byte> a(chunk, std::byte{1}), b(chunk);
  const auto t0 = Clock::now();
  for (uint64_t done = 0; done < bytes; done += chunk) std::memcpy(b.data(), a.data(), std::min<uint64_t>(chunk, bytes - done));
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  if (b[chunk - 1] != std::byte{1}) throw std::runtime_error("memcpy check failed");
  return s;
}

struct ChildRun {
  double seconds = 0;
  uint64_t max_rss_bytes = 0;
  int status = -1;
};

ChildRun run_child(const std::vector<std::string>& argv) {
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  const auto t0 = Clock::now();
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::execv(args[0], args.data());
    _exit(127);
  }
  int status = 0;
  struct rusage ru {};
  ::wait4(pid, &status, 0, &ru);
  ChildRun r;
  r.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  r.max_rss_bytes = static_cast<uint64_t>(ru.ru_maxrss) * 1024;  // Linux: kilobytes
  r.status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

double gbps(uint64_t bytes, double s) { return static_cast<double>(bytes) / s / 1e9; }
double mib(uint64_t b) { return static_cast<double>(b) / (1 << 20); }

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Throughput and peak RSS of `opensci-compat convert` on a synthetic sharded MoE checkpoint"};
  std::string dir = "/tmp", out_dir, cli = OPENSCI_CLI;
  double size_gb = 2.2;
  uint64_t shard_mb = 512;
  bool keep = false;
  app.add_option("--dir", dir, "where the synthetic checkpoint is written (needs ~2x --size-gb free)");
  app.add_option("--out-dir", out_dir,
                 "where copies and conversions write (default --dir; a tmpfs such as /dev/shm takes the disk out "
                 "of the figures)");
  app.add_option("--size-gb", size_gb, "approximate checkpoint size in GB (>= 2 for the issue's figure)");
  app.add_option("--shard-mb", shard_mb, "input shard size in MiB");
  app.add_option("--cli", cli, "opensci-compat executable");
  app.add_flag("--keep", keep, "keep the files");
  CLI11_PARSE(app, argc, argv);

  Model m;
  const uint64_t fixed = static_cast<uint64_t>(2 * m.vocab * m.hidden * 2);
  const uint64_t per_layer = m.layer_expert_bytes() + static_cast<uint64_t>(2 * (2 * m.heads + 2 * m.kv_heads) * m.head_dim * m.hidden);
  m.layers = std::max<int64_t>(1, static_cast<int64_t>((size_gb * 1e9 - static_cast<double>(fixed)) / static_cast<double>(per_layer)) + 1);

  char tmpl[] = "opensci-bench-convert.XXXXXX";
  const fs::path root = fs::path(dir) / tmpl;
  std::string root_s = root.string();
  if (!::mkdtemp(root_s.data())) {
    fmt::print(stderr, "cannot create a directory under {}: {}\n", dir, std::strerror(errno));
    return 2;
  }
  const fs::path work = root_s;
  fs::path out = work;
  if (!out_dir.empty()) {
    std::string o = (fs::path(out_dir) / tmpl).string();
    if (!::mkdtemp(o.data())) {
      fmt::print(stderr, "cannot create a directory under {}: {}\n", out_dir, std::strerror(errno));
      return 2;
    }
    out = o;
  }
  int rc = 0;
  try {
    fmt::print("synthetic qwen3_moe BF16: {} layers x {} experts (H {}, I {}), shards ~{} MiB -> {} (outputs in {})\n",
               m.layers, m.experts, m.hidden, m.moe_i, shard_mb, work.string(), out.string());
    const auto t0 = Clock::now();
    const uint64_t largest_shard = write_checkpoint(work / "per_expert", m, shard_mb << 20);
    const uint64_t bytes = dir_bytes(work / "per_expert");
    fmt::print("  written {:.2f} GB in {:.1f} s; largest shard {:.0f} MiB; one layer's experts {:.0f} MiB\n",
               static_cast<double>(bytes) / 1e9, std::chrono::duration<double>(Clock::now() - t0).count(),
               mib(largest_shard), mib(m.layer_expert_bytes()));

    // Every timed phase starts with no dirty pages (sync, untimed): otherwise the kernel's
    // writeback of the previous phase's output throttles the next one and the figures measure
    // the disk, not the converter. Inputs stay in the page cache (they were just written).
    auto settle = [] { ::sync(); };
    settle();
    const double copy1 = plain_copy(work / "per_expert", out / "copy1");
    fs::remove_all(out / "copy1");
    settle();
    const double mem = memcpy_seconds(bytes);
    const auto to_fused = run_child({cli, "convert", "--in", (work / "per_expert").string(), "--out",
                                     (out / "fused").string(), "--to", "hf-fused"});
    settle();
    const auto to_pe = run_child({cli, "convert", "--in", (out / "fused").string(), "--out",
                                  (out / "per_expert2").string(), "--to", "hf-per-expert"});
    fs::remove_all(out / "per_expert2");
    settle();
    const double copy2 = plain_copy(work / "per_expert", out / "copy2");
    fs::remove_all(out / "copy2");
    if (to_fused.status != 0 || to_pe.status != 0) {
      fmt::print(stderr, "conversion failed (exit {} / {})\n", to_fused.status, to_pe.status);
      rc = 1;
    }
    const double copy = std::min(copy1, copy2);
    auto largest_file = [](const fs::path& d) {
      uint64_t n = 0;
      for (const auto& e : fs::directory_iterator(d))
        if (e.path().extension() == ".safetensors") n = std::max<uint64_t>(n, e.file_size());
      return n;
    };
    // The bound of each run is its own input's largest shard plus one layer's experts.
    const uint64_t bound = largest_shard + m.layer_expert_bytes();
    const uint64_t bound_back = largest_file(out / "fused") + m.layer_expert_bytes();
    fmt::print("\n  {:<34} {:>9} {:>10}\n", "", "seconds", "GB/s");
    fmt::print("  {:<34} {:>9.2f} {:>10.2f}\n", "memcpy (same bytes, in memory)", mem, gbps(bytes, mem));
    fmt::print("  {:<34} {:>9.2f} {:>10.2f}   (best of 2: {:.2f} / {:.2f} s)\n", "plain copy (mmap + write)", copy,
               gbps(bytes, copy), copy1, copy2);
    fmt::print("  {:<34} {:>9.2f} {:>10.2f}   {:.0f}% of copy\n", "convert per-expert -> fused", to_fused.seconds,
               gbps(bytes, to_fused.seconds), 100.0 * copy / to_fused.seconds);
    fmt::print("  {:<34} {:>9.2f} {:>10.2f}   {:.0f}% of copy\n", "convert fused -> per-expert", to_pe.seconds,
               gbps(bytes, to_pe.seconds), 100.0 * copy / to_pe.seconds);
    fmt::print("\n  peak RSS per-expert -> fused: {:.0f} MiB; fused -> per-expert: {:.0f} MiB\n",
               mib(to_fused.max_rss_bytes), mib(to_pe.max_rss_bytes));
    fmt::print("  bound (largest input shard + one layer's experts): {:.0f} MiB + {:.0f} MiB = {:.0f} MiB "
               "(fused input: {:.0f} MiB)\n",
               mib(largest_shard), mib(m.layer_expert_bytes()), mib(bound), mib(bound_back));
    for (const auto& [r, b] : {std::pair{&to_fused, bound}, std::pair{&to_pe, bound_back}})
      if (r->max_rss_bytes >= b) {
        fmt::print(stderr, "FAIL: peak RSS {:.0f} MiB is not below the bound {:.0f} MiB\n", mib(r->max_rss_bytes),
                   mib(b));
        rc = 1;
      }
    if (rc == 0) fmt::print("  PASS: both conversions stay below the bound\n");
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    rc = 2;
  }
  if (keep) {
    fmt::print("kept {} and {}\n", work.string(), out.string());
  } else {
    std::error_code ec;
    fs::remove_all(work, ec);
    fs::remove_all(out, ec);
  }
  return rc;
}
