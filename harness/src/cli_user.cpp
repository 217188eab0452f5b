// `toyify`, `download`, `run`: the matrix on a user's own model (a directory or a Hub repo).
#include <fmt/core.h>
#include <fmt/ranges.h>

#include <memory>

#include "commands.hpp"
#include "opensci/error.hpp"
#include "opensci/harness/hub.hpp"
#include "opensci/harness/toyify.hpp"

namespace opensci::cli {
namespace fs = std::filesystem;

void add_toyify_command(CLI::App& app) {
  struct Args {
    std::string from;
    harness::ToyifyOptions o;
    int64_t layers = 0, hidden = 0, heads = 0, kv_heads = 0, ffn = 0, moe_ffn = 0, experts = 0, vocab = 0;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("toyify", "Shrink a model (directory or ORG/NAME[@REV] on the Hub) to toy size, "
                                           "keeping its remote code, config keys, tensor names and dtypes");
  cmd->add_option("--from", a->from, "model directory, or ORG/NAME[@REVISION] on the Hub")->required();
  cmd->add_option("--out", a->o.out, "toy model directory to write")->required();
  cmd->add_option("--seed", a->o.seed, "seed of the deterministic weights");
  cmd->add_option("--layers", a->layers, "num_hidden_layers (default 3)");
  cmd->add_option("--hidden", a->hidden, "hidden_size (default 96)");
  cmd->add_option("--heads", a->heads, "num_attention_heads (default 4, a multiple of the GQA ratio)");
  cmd->add_option("--kv-heads", a->kv_heads, "num_key_value_heads (default: heads / the source's GQA ratio)");
  cmd->add_option("--ffn", a->ffn, "intermediate_size (default: the source's ffn/hidden proportion)");
  cmd->add_option("--moe-ffn", a->moe_ffn, "moe_intermediate_size (default: the source's proportion)");
  cmd->add_option("--experts", a->experts, "num_experts (default min(4, source))");
  cmd->add_option("--vocab", a->vocab, "vocab_size (default min(384, source))");
  cmd->callback([a] {
    auto opt = [](int64_t v) { return v > 0 ? std::optional<int64_t>(v) : std::nullopt; };
    a->o.layers = opt(a->layers);
    a->o.hidden = opt(a->hidden);
    a->o.heads = opt(a->heads);
    a->o.kv_heads = opt(a->kv_heads);
    a->o.ffn = opt(a->ffn);
    a->o.moe_ffn = opt(a->moe_ffn);
    a->o.experts = opt(a->experts);
    a->o.vocab = opt(a->vocab);
    harness::ModelSource source;
    try {
      source = harness::read_model_source(a->from);
    } catch (const harness::HubUnavailable& e) {
      fmt::print(stderr, "not available: {}\n", e.what());
      throw CLI::RuntimeError(77);
    }
    const auto r = harness::toyify(source, a->o);
    fmt::print("toyified {} -> {}: {} tensors written, {} dropped\n", source.description, a->o.out.string(), r.tensors,
               r.dropped);
    for (const auto& c : r.record["changes"])
      fmt::print("  {}: {} -> {} ({})\n", c["key"].get<std::string>(), c["from"].dump(), c["to"].dump(),
                 c["why"].get<std::string>());
    for (const auto& w : r.warnings) fmt::print(stderr, "warning: {}\n", w);
  });
}

void add_download_command(CLI::App& app) {
  struct Args {
    std::string repo, revision, out;
    std::vector<std::string> include;
    int parallel = 0;
    bool quiet = false;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("download", "Download a Hub repo into the shared HF cache (HF_ENDPOINT, HF_TOKEN, "
                                             "HF_HUB_CACHE / HF_HOME, HF_HUB_OFFLINE)");
  cmd->add_option("repo", a->repo, "ORG/NAME[@REVISION]")->required();
  cmd->add_option("--revision", a->revision, "branch, tag or commit (default main, or the @REVISION of the repo id)");
  cmd->add_option("--include", a->include, "only files matching this glob (repeatable)");
  cmd->add_option("--out", a->out, "also materialise the snapshot here as a plain directory (hard links)");
  cmd->add_option("--parallel", a->parallel, "files at a time (default 8)");
  cmd->add_flag("--quiet", a->quiet, "no progress line even on a terminal");
  cmd->callback([a] {
    auto [repo, revision] = harness::parse_repo_spec(a->repo);
    if (!a->revision.empty()) revision = a->revision;
    auto config = harness::HubConfig::from_environment();
    if (a->parallel > 0) config.parallel = a->parallel;
    if (a->quiet) config.progress = false;
    harness::HubClient client(config);
    harness::DownloadStats stats;
    try {
      const auto snapshot = client.download(repo, revision, a->include, &stats);
      if (!a->out.empty()) harness::materialise_snapshot(snapshot, a->out);
      fmt::print("{}\n", a->out.empty() ? snapshot.string() : a->out);
      fmt::print(stderr, "{}@{}: {} files downloaded, {} already cached, {} bytes in {:.2f} s\n", repo, revision,
                 stats.downloaded.load(), stats.cached.load(), stats.bytes.load(), stats.seconds);
    } catch (const harness::HubUnavailable& e) {
      // Not Run for CTest: the Hub is out of reach here and the cache does not hold the model.
      fmt::print(stderr, "not available: {}\n", e.what());
      throw CLI::RuntimeError(77);
    }
  });
}

}  // namespace opensci::cli
