// `matrix ctest`, `capture`, `cell`: the steps CTest runs for every matrix cell.
#include <fmt/core.h>
#include <fmt/ranges.h>

#include <algorithm>

#include <fstream>
#include <thread>

#include "commands.hpp"
#include "opensci/error.hpp"
#include "opensci/harness/capture.hpp"
#include "opensci/harness/cell.hpp"
#include "opensci/harness/environment.hpp"
#include "opensci/harness/matrix.hpp"
#include "opensci/harness/matrix_layers.hpp"
#include "opensci/harness/patch.hpp"

namespace opensci::cli {
namespace fs = std::filesystem;

void add_matrix_command(CLI::App& app) {
  struct Args {
    std::string matrix, cli, work, out;
    bool nightly = false;
  };
  auto a = std::make_shared<Args>();
  auto* matrix = app.add_subcommand("matrix", "Work with the declarative matrix (matrix/matrix.json)");
  matrix->require_subcommand(1);
  auto* ctest = matrix->add_subcommand("ctest", "Generate the CTest include file of the matrix");
  ctest->add_option("--matrix", a->matrix, "matrix JSON")->required()->check(CLI::ExistingFile);
  ctest->add_option("--cli", a->cli, "path of the opensci-compat binary the tests run")->required();
  ctest->add_option("--work", a->work, "work dir for toys, captures, results")->required();
  ctest->add_option("--out", a->out, "CMake file to write")->required();
  ctest->add_flag("--nightly", a->nightly, "also emit the cells of tier \"nightly\" (label nightly)");
  ctest->callback([a] {
    const auto m = harness::load_matrix(a->matrix);
    harness::EmitOptions o{fs::absolute(a->cli), fs::absolute(a->work), {}, a->nightly};
    const auto text = harness::emit_ctest(m, o);
    const auto tmp = a->out + ".tmp";
    std::ofstream(tmp) << text;
    fs::rename(tmp, a->out);
    const auto nightly = std::count_if(m.cells.begin(), m.cells.end(), [](const auto& c) { return c.tier == "nightly"; });
    fmt::print("{}: {} cells ({} of tier nightly, {})\n", a->out, m.cells.size(), nightly,
               a->nightly ? "emitted" : "not emitted: configure with -DOPENSCI_NIGHTLY=ON");
  });

  struct ExplainArgs {
    std::string matrix = OPENSCI_SOURCE_DIR "/matrix/matrix.json", work = "build/matrix", cell;
  };
  auto e = std::make_shared<ExplainArgs>();
  auto* explain = matrix->add_subcommand("explain", "What one cell expands to and where its expectation comes from");
  explain->add_option("cell", e->cell, "cell name (cell/<env>/<variant>/<tokens>/<dtype>-<device>/vs-<backend>-<precision>)")
      ->required();
  explain->add_option("--matrix", e->matrix, "matrix JSON")->check(CLI::ExistingFile);
  explain->add_option("--work", e->work, "work dir of the build (for the paths shown)");
  explain->callback([e] {
    const auto m = harness::load_matrix(e->matrix);
    harness::EmitOptions o{{}, fs::absolute(e->work), {}};
    fmt::print("{}", harness::explain_cell(m, o, e->cell));
  });

  struct TallyArgs {
    std::string matrix, work;
    std::vector<std::string> exclude;
    int min_live = 1;
    bool nightly = false;
  };
  auto t = std::make_shared<TallyArgs>();
  auto* tally = matrix->add_subcommand(
      "tally", "Count the cells that ran live, replayed goldens, or did not run (and why); fail when nothing ran live "
               "or a required environment's cells did not run");
  tally->add_option("--matrix", t->matrix, "matrix JSON")->required()->check(CLI::ExistingFile);
  tally->add_option("--work", t->work, "work dir (results under <work>/results)")->required();
  tally->add_option("--exclude-label", t->exclude, "cells with this label were not selected (repeatable)");
  tally->add_option("--min-live", t->min_live, "fewest cells that must have run live (default 1)");
  tally->add_flag("--nightly", t->nightly,
                  "the run emitted the cells of tier nightly too (-DOPENSCI_NIGHTLY=ON): count them");
  tally->callback([t] {
    const auto m = harness::load_matrix(t->matrix);
    harness::EmitOptions o{{}, fs::absolute(t->work), {}, t->nightly};
    const auto r = harness::tally_cells(m, o, t->exclude, t->min_live);
    fmt::print("{}", r.text);
    if (!r.ok) throw CLI::RuntimeError(1);
  });
}

void add_capture_command(CLI::App& app) {
  struct Args {
    std::string spec;
    harness::CaptureOptions o;
    int timeout_s = 600;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("capture", "Run transformers in an isolated environment and capture its forward");
  cmd->add_option("--env-spec", a->spec, "environment spec (JSON text or file)")->required();
  cmd->add_option("--model", a->o.model, "model directory")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--tokens-file", a->o.tokens_file, "token ids JSON")->required()->check(CLI::ExistingFile);
  cmd->add_option("--dtype", a->o.dtype, "float32 | bfloat16 | float64");
  cmd->add_option("--device", a->o.device, "cpu | cuda");
  cmd->add_option("--attn-impl", a->o.attn_impl, "default | eager | sdpa");
  cmd->add_option("--out", a->o.out, "capture directory")->required();
  cmd->add_option("--shim", a->o.shims, "runtime shim to apply before loading (repeatable)");
  cmd->add_option("--variant", a->o.variant, "<model>/<patch set>, recorded (and the key of golden captures)");
  cmd->add_option("--threads", a->o.threads, "torch threads (0 = all cores)");
  cmd->add_option("--timeout", a->timeout_s, "seconds before the whole process group is killed");
  cmd->add_option("--script-dir", a->o.script_dir, "directory of capture.py")->default_str(OPENSCI_SOURCE_DIR "/harness/python");
  cmd->add_flag("--hidden-states,!--no-hidden-states", a->o.hidden_states, "capture per-layer tensors");
  cmd->add_flag("--dump-state-dict,!--no-dump-state-dict", a->o.dump_state_dict, "dump parameters after loading");
  cmd->add_flag("!--no-worker", a->o.worker, "run a cold interpreter instead of the environment's capture worker");
  cmd->callback([a] {
    if (fs::exists(a->o.model / harness::kUnavailableMarker)) {  // a user model not available here: Not Run
      fs::create_directories(a->o.out);
      fs::remove(a->o.out / "outcome.json");
      fs::copy_file(a->o.model / harness::kUnavailableMarker, a->o.out / "SKIPPED", fs::copy_options::overwrite_existing);
      fmt::print("capture unavailable: model {} is not available here\n", a->o.model.string());
      throw CLI::RuntimeError(77);
    }
    a->o.env_spec = harness::load_spec(a->spec);
    a->o.timeout = std::chrono::seconds(a->timeout_s);
    if (a->o.script_dir.empty()) a->o.script_dir = OPENSCI_SOURCE_DIR "/harness/python";
    const auto r = harness::run_capture(a->o);
    fmt::print("capture {}: {}\n", harness::capture_status_name(r.status), r.detail);
    if (r.status == harness::CaptureStatus::Unavailable) throw CLI::RuntimeError(77);
    // Every other outcome is recorded in outcome.json and judged by the cells.
  });
}

void add_patch_command(CLI::App& app) {
  struct Args {
    std::string model, patch, out;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("patch", "Apply a static patch (matrix/patches/*.json) to a copy of a model dir");
  cmd->add_option("--model", a->model, "model directory")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--patch", a->patch, "patch JSON")->required()->check(CLI::ExistingFile);
  cmd->add_option("--out", a->out, "patched copy")->required();
  cmd->callback([a] {
    if (fs::exists(fs::path(a->model) / harness::kUnavailableMarker)) {  // a user model not available here
      fs::remove_all(a->out);
      fs::create_directories(a->out);
      fs::copy_file(fs::path(a->model) / harness::kUnavailableMarker, fs::path(a->out) / harness::kUnavailableMarker);
      fmt::print("not run: model {} is not available here\n", a->model);
      throw CLI::RuntimeError(77);
    }
    const auto patch = harness::load_patch(a->patch);
    const auto r = harness::apply_patch(patch, a->model, a->out);
    fmt::print("patch '{}' (fixes {}) applied to {}:\n", patch.name, fmt::join(patch.fixes, ", "), a->out);
    for (const auto& line : r.applied) fmt::print("  {}\n", line);
  });
}

void add_cell_command(CLI::App& app) {
  auto o = std::make_shared<harness::CellOptions>();
  auto labels = std::make_shared<std::string>();
  auto* cmd = app.add_subcommand("cell", "Judge one matrix cell: capture vs reference backend");
  cmd->add_option("--name", o->name, "cell name")->required();
  cmd->add_option("--capture", o->capture, "capture directory")->required();
  cmd->add_option("--model", o->model, "model directory")->required();
  cmd->add_option("--tokens-file", o->tokens_file, "the cell's prompt batch (token ids JSON): the capture must have run it")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--dtype", o->dtype, "dtype the cell asked transformers to run in (float32 | bfloat16 | float64)");
  cmd->add_option("--variant", o->variant, "<model>/<patch set> the cell asked for");
  cmd->add_option("--shim", o->shims, "runtime shim of the cell's patch set (repeatable)");
  cmd->add_option("--transformers", o->transformers,
                  "transformers version the matrix declares for the environment (checked against the capture)");
  cmd->add_option("--backend", o->backend, "reference backend");
  cmd->add_option("--precision", o->precision, "fp64 | fp32 | bf16");
  cmd->add_option("--tolerance-file", o->tolerance_file, "tolerances JSON")->required();
  cmd->add_option("--tolerance", o->tolerance, "tolerance name")->required();
  cmd->add_option("--hazards", o->hazards_file, "hazard table (default: matrix/hazards.json of the source tree)");
  cmd->add_option("--expect", o->expect, "pass | xfail:<hazard>");
  cmd->add_option("--counterfactual", o->counterfactual,
                  "capture dir of the same run with the expected hazard's fix added (proves an xfail)");
  cmd->add_option("--result", o->result, "result JSON to write")->required();
  cmd->add_option("--labels", *labels, "comma-separated labels, recorded in the result");
  cmd->add_option("--sp", o->sp, "sequence-parallel size of the reference (> 1: sharded ranks, parallel/)");
  cmd->add_option("--ep", o->ep, "expert-parallel size of the reference (> 1: sharded ranks, parallel/)");
  cmd->add_option("--parallel-timeout", o->parallel_timeout_s, "seconds the sharded job may run (default 120)");
  cmd->add_option("--inject-reference-defect", o->reference_defect,
                  "mutation tests only: make the reference commit a known defect (drop-bias:<tensor>, theta-x2, "
                  "skip-qk-norm, swap-rope-halves); the cell must then fail");
  cmd->callback([o, labels] {
    std::stringstream ss(*labels);
    for (std::string l; std::getline(ss, l, ',');) o->labels.push_back(l);
    const int code = harness::run_cell(*o);
    if (code != 0) throw CLI::RuntimeError(code);
  });
}

}  // namespace opensci::cli
