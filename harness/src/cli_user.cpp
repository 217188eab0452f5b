// `toyify`, `download`, `run`: the matrix on a user's own model (a directory or a Hub repo).
#include <fmt/core.h>
#include <fmt/ranges.h>

#include <memory>
#include <set>
#include <sstream>

#include "commands.hpp"
#include "opensci/error.hpp"
#include <cstdio>
#include <fstream>

#include "opensci/harness/capture.hpp"
#include "opensci/harness/cell.hpp"
#include "opensci/harness/environment.hpp"
#include "opensci/harness/hazards.hpp"
#include "opensci/harness/hub.hpp"
#include "opensci/harness/matrix.hpp"
#include "opensci/harness/matrix_layers.hpp"
#include "opensci/harness/patch.hpp"
#include "opensci/harness/report.hpp"
#include "opensci/harness/toyify.hpp"

namespace opensci::cli {
namespace fs = std::filesystem;

namespace {

// Not Run for CTest (77): the model cannot be had here. With --unavailable-marker the output dir
// holds only the reason, so the patch / capture / cell steps after it report Not Run too.
[[noreturn]] void not_available(const std::string& why, const std::string& out, bool marker) {
  fmt::print(stderr, "not available: {}\n", why);
  if (marker && !out.empty()) {
    fs::remove_all(out);
    fs::create_directories(out);
    std::ofstream(fs::path(out) / harness::kUnavailableMarker) << why << "\n";
  }
  throw CLI::RuntimeError(77);
}

void write_json(const fs::path& p, const nlohmann::json& j) {
  fs::create_directories(p.parent_path());
  std::ofstream(p.string() + ".tmp") << j.dump(2) << "\n";
  fs::rename(p.string() + ".tmp", p);
}

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

}  // namespace

void add_toyify_command(CLI::App& app) {
  struct Args {
    std::string from;
    harness::ToyifyOptions o;
    int64_t layers = 0, hidden = 0, heads = 0, kv_heads = 0, ffn = 0, moe_ffn = 0, experts = 0, vocab = 0;
    bool marker = false;
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
  cmd->add_flag("--unavailable-marker", a->marker, "when the Hub is out of reach, leave --out holding only the reason "
                                                   "(the matrix's later steps then report Not Run)");
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
      not_available(e.what(), a->o.out.string(), a->marker);
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
    bool quiet = false, marker = false;
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
  cmd->add_flag("--unavailable-marker", a->marker, "when the Hub is out of reach and nothing is cached, leave --out "
                                                   "holding only the reason (later matrix steps report Not Run)");
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
      not_available(e.what(), a->out, a->marker);
    }
  });
}

void add_matrix_merge_command(CLI::App& app) {
  struct Args {
    harness::MatrixLayers l;
    std::string out, models;
    std::vector<std::string> layers;
  };
  auto a = std::make_shared<Args>();
  auto* matrix = app.get_subcommand("matrix");
  auto* cmd = matrix->add_subcommand("merge", "The matrix with user layers and models over it, as one matrix JSON "
                                              "(CMake: OPENSCI_MATRIX, OPENSCI_MODELS)");
  cmd->add_option("--matrix", a->l.base, "the default matrix")->required()->check(CLI::ExistingFile);
  cmd->add_option("--layer", a->layers, "a user matrix file layered over it (repeatable)");
  cmd->add_option("--models", a->models, "';'-separated model directories or ORG/NAME[@REV] (OPENSCI_MODELS)");
  cmd->add_option("--expect", a->l.expect, "pass | like: expected outcomes of --models")->check(CLI::IsMember({"pass", "like"}));
  cmd->add_option("--like", a->l.like, "project model whose cells --models copy (default: by lineage)");
  cmd->add_option("--out", a->out, "merged matrix JSON to write")->required();
  cmd->callback([a] {
    for (const auto& f : a->layers) a->l.layers.push_back(f);
    std::stringstream ss(a->models);
    for (std::string item; std::getline(ss, item, ';');)
      if (!item.empty()) a->l.models.push_back(item);
    const auto merged = harness::merge_matrix(a->l);
    write_json(a->out, merged);
    harness::load_matrix(a->out);  // the merged file must load as it will for CTest
    for (const auto& n : merged["_layers"]["models"]) fmt::print("user model {}: {} ({} cell blocks of {})\n", n["name"].get<std::string>(), n["from"].get<std::string>(), n["cells"].get<int>(), n["like"].get<std::string>());
    for (const auto& n : merged["_layers"]["notes"]) fmt::print("  note: {}\n", n.get<std::string>());
  });
}

// `run --model DIR`: the matrix on one model from the command line, the same steps CTest runs
// (toyify, patch, capture, cell), in this process, then the grid.
void add_run_command(CLI::App& app) {
  struct Args {
    std::string model, envs, patch_sets, work = "opensci-run", like, expect = "pass", matrix = OPENSCI_SOURCE_DIR "/matrix/matrix.json";
    std::vector<std::string> layers;
    int timeout_s = 900, threads = 0;
    bool as_is = false;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("run", "Run the matrix on your model (a directory or ORG/NAME[@REV]), toyified, and "
                                        "print the grid");
  cmd->add_option("--model", a->model, "model directory or ORG/NAME[@REVISION]")->required();
  cmd->add_option("--envs", a->envs, "comma-separated environments (default: every one the model's template runs in)");
  cmd->add_option("--patch-sets", a->patch_sets, "comma-separated patch sets (default: the template's)");
  cmd->add_option("--work", a->work, "work directory (toys, captures, results)");
  cmd->add_option("--like", a->like, "project model whose cells to copy (default: by lineage)");
  cmd->add_option("--expect", a->expect, "pass (default: any failure is red, with its diagnosis) | like (the project "
                                         "model's expectations)")->check(CLI::IsMember({"pass", "like"}));
  cmd->add_option("--matrix", a->matrix, "the default matrix");
  cmd->add_option("--layer", a->layers, "user matrix file layered over it (repeatable)");
  cmd->add_option("--timeout", a->timeout_s, "seconds per capture");
  cmd->add_option("--threads", a->threads, "torch threads per capture (0 = all cores)");
  cmd->callback([a] {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);  // progress as it happens, also into a log file
    const fs::path work = fs::absolute(a->work);
    harness::MatrixLayers l;
    l.base = a->matrix;
    for (const auto& f : a->layers) l.layers.push_back(f);
    l.models = {a->model};
    l.expect = a->expect;
    l.like = a->like;
    l.environments = split_commas(a->envs);
    l.patch_sets = split_commas(a->patch_sets);
    l.user_only = true;
    write_json(work / "matrix.json", harness::merge_matrix(l));
    const auto m = harness::load_matrix(work / "matrix.json");
    const harness::EmitOptions o{{}, work, {}};
    fs::remove_all(work / "results");
    std::set<std::string> built, patched, captured;
    for (const auto& c : m.cells) {
      const auto& model = *c.model;
      const auto dir = harness::model_dir(o, model);
      if (built.insert(model.name).second) {
        fmt::print("== model {}\n", model.name);
        if (!model.build.contains("toyify"))
          fail("run: model '{}' is a real-tier model (the checkpoint as it is); `run` toyifies — use ctest -L real", model.name);
        try {
          const auto source = harness::read_model_source(model.build.at("toyify").at("from").get<std::string>());
          harness::ToyifyOptions t;
          t.out = dir;
          t.seed = model.seed;
          const auto r = harness::toyify(source, t);
          fmt::print("toyified {}: {} tensors\n", source.description, r.tensors);
          for (const auto& w : r.warnings) fmt::print("warning: {}\n", w);
        } catch (const harness::HubUnavailable& e) {
          fs::remove_all(dir);
          fs::create_directories(dir);
          std::ofstream(dir / harness::kUnavailableMarker) << e.what() << "\n";
          fmt::print("not available: {}\n", e.what());
        }
      }
      const auto mdir = harness::model_dir(o, c);
      const auto result = harness::result_file(o, c);
      const bool unavailable = fs::exists(dir / harness::kUnavailableMarker);
      if (!c.patch->static_patch.empty() && !unavailable && patched.insert(c.variant).second) {
        try {
          harness::apply_patch(harness::load_patch(c.patch->static_patch), dir, mdir);
        } catch (const Error& e) {
          fmt::print("patch {}: {}\n", c.variant, e.what());
        }
      }
      if (!c.patch->static_patch.empty() && !unavailable && !fs::exists(mdir)) {
        write_json(result, {{"name", c.name}, {"labels", c.labels}, {"expect", c.expect}, {"verdict", "fail"},
                            {"summary", fmt::format("patch set '{}' does not apply to this model (see above)", c.patch->name)}});
        continue;
      }
      const auto cap = harness::capture_dir(o, c);
      // The capture, and for a proven xfail its counterfactual (the same run + the hazard's fix).
      auto capture = [&](const std::string& name, const fs::path& out, const std::string& variant,
                         const std::vector<std::string>& shims) {
        if (!captured.insert(name).second) return;
        fmt::print("== capture {}\n", name);
        if (unavailable) {
          fs::create_directories(out);
          std::ifstream in(dir / harness::kUnavailableMarker);
          std::string why((std::istreambuf_iterator<char>(in)), {});
          std::ofstream(out / "SKIPPED") << "model not available: " << why;
          return;
        }
        harness::CaptureOptions co;
        co.env_spec = harness::load_spec(c.env->spec.dump());
        co.model = mdir;
        co.tokens_file = c.tokens;
        co.out = out;
        co.script_dir = OPENSCI_SOURCE_DIR "/harness/python";
        co.variant = variant;
        co.dtype = c.dtype;
        co.device = c.device;
        co.shims = shims;
        co.threads = a->threads;
        co.timeout = std::chrono::seconds(a->timeout_s);
        const auto r = harness::run_capture(co);
        fmt::print("capture {}: {}\n", harness::capture_status_name(r.status), r.detail);
      };
      const auto variant = c.model->name + "/" + c.patch->name;
      capture(c.capture_name, cap, variant, c.patch->shims);
      if (!c.counterfactual_capture.empty())
        capture(c.counterfactual_capture, harness::counterfactual_dir(o, c),
                variant + harness::counterfactual_suffix(c.expect.substr(6)), c.counterfactual_shims);
      harness::CellOptions co;
      co.name = c.name;
      co.capture = cap;
      co.model = mdir;
      co.tokens_file = c.tokens;
      co.dtype = c.dtype;
      co.variant = variant;
      co.shims = c.patch->shims;
      co.transformers = c.env->transformers;
      co.backend = c.reference.backend;
      co.precision = c.reference.precision;
      co.tolerance_file = m.tolerances;
      co.tolerance = c.reference.tolerance;
      co.hazards_file = m.hazards;
      co.expect = c.expect;
      if (!c.counterfactual_capture.empty()) co.counterfactual = harness::counterfactual_dir(o, c);
      co.result = result;
      co.labels = c.labels;
      fmt::print("== {}\n", c.name);
      if (unavailable) {
        write_json(result, {{"name", c.name}, {"labels", c.labels}, {"expect", c.expect}, {"verdict", "not-run"},
                            {"summary", "model not available here (see above)"}});
        continue;
      }
      try {
        harness::run_cell(co);
      } catch (const Error& e) {
        write_json(result, {{"name", c.name}, {"labels", c.labels}, {"expect", c.expect}, {"verdict", "fail"}, {"summary", e.what()}});
      }
    }
    const auto results = harness::load_results(work / "results");
    fmt::print("\n{}", harness::render_table(results));
    std::ofstream(work / "report.md") << harness::render_markdown(results);
    std::ofstream(work / "report.html") << harness::render_html(results);
    fmt::print("\n{}: report.md, report.html, results/\n", work.string());
    const auto n = harness::count_verdicts(results);
    if (n.fail + n.xpass > 0) throw CLI::RuntimeError(1);
  });
}

}  // namespace opensci::cli
