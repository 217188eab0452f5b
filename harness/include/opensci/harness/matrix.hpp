// The declarative matrix (matrix/matrix.json): models x environments x reference runs, each
// cell with an expected outcome. `emit_ctest` turns it into CTest tests:
//   toy/<model>                                  FIXTURES_SETUP toy.<model>
//   patch/<model>+<patch set>                    FIXTURES_SETUP model.<model>+<patch set> (static rewrite)
//   env/<env>                                    FIXTURES_SETUP env.<env>        (skip 77 = unavailable)
//   capture/<env>/<variant>/<tokens>/<dtype>-<dev> FIXTURES_SETUP capture.<...>  (requires env + model)
//   cell/<env>/<variant>/<tokens>/<dtype>-<dev>/vs-<backend>-<precision>         (requires capture)
//   capture/<env>/<variant>+fix-<H>/...         the counterfactual of an xfail:<H> cell whose hazard
//                                                has a runtime fix (hazards.json): the same run + the fix
// where <variant> is <model> (unpatched) or <model>+<patch set>.
// The file is validated strictly: an unknown key anywhere, an unknown hazard, tolerance, shim,
// dtype, device, backend or precision is an error naming its location (cells[19].capture.dytpe).
// Cells are labelled: matrix, cell, version (v5, v5.12), environment, provider, backend,
// dtype, sp<N>, ep<N>, unpatched/patched (+ the patch set name), and the model's labels.
#pragma once

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace opensci::harness {

struct MatrixModel {
  std::string name;
  std::filesystem::path config, remote_code;  // absolute
  uint64_t seed = 1;
  std::string toy_dtype = "f32";
  std::vector<std::string> labels;
  // A user's model (matrix_layers.hpp): {"toyify": {"from": ..., sizes}} or {"real": {"from": ...}},
  // built by `toyify` / `download` instead of `toy`; null for the project's toy configs.
  nlohmann::json build;
};

// How a model is patched for a version: a static rewrite of a copy of the model dir
// (matrix/patches/<name>.json) and/or runtime shims applied in the capture process.
// "none" (unpatched) always exists.
struct PatchSet {
  std::string name = "none";
  std::filesystem::path static_patch;  // empty: no static rewrite
  std::vector<std::string> shims;
  std::vector<std::string> fixes;  // hazards it repairs (validated against the hazard table)
  bool unpatched() const { return static_patch.empty() && shims.empty(); }
};

struct MatrixEnvironment {
  std::string name;
  std::string transformers;  // "5.12.1", "4.57.6", "latest", ...
  nlohmann::json spec;       // provider spec (harness/include/opensci/harness/environment.hpp)
  std::vector<std::string> patch_sets{"none"};  // each model runs once per patch set
  // "<model>" (unpatched) or "<model>+<patch set>" -> "pass" | "xfail:<hazard>" (overrides the cell's)
  std::map<std::string, std::string> expect;
  // Whether a run may leave this environment Not Run: "no" (it may), "always" (unavailable =
  // failure), "when-reachable" (unavailable = failure unless the network resource it needs — an
  // index, a mirror — did not answer). OPENSCI_OPTIONAL_ENVS=<env>,... or =all relaxes it.
  std::string required = "no";
  std::vector<std::string> version_labels() const;  // "5.12.1" -> {"v5", "v5.12"}
  std::string provider() const;
  bool golden() const { return provider() == "golden"; }  // replays committed captures
};

// ---- expected outcomes by transformers version range (top-level "expectations") ----
// A version range as pip writes one: comma-separated clauses, each "<op><version>" with op one of
// >= <= > < == != and version "5", "5.2", "5.2.1" (missing components are 0), "==5.2.*" /
// "!=5.2.*" for a whole line; "" or "*" = every version. All clauses must hold.
struct VersionRange {
  struct Clause {
    std::string op;
    std::vector<int> version;
    bool wildcard = false;  // "==5.2.*"
  };
  std::string text;
  std::vector<Clause> clauses;
  // Throws opensci::Error for a version that is not numeric ("latest", "5.2.0rc1").
  bool contains(const std::string& version) const;
};
VersionRange parse_version_range(const std::string& text);  // throws opensci::Error naming the bad clause
// "5.12.1" -> {5, 12, 1}; nullopt when not purely numeric.
std::optional<std::vector<int>> parse_numeric_version(const std::string& version);

// {"variant": "<model>[+<patch set>]", "transformers": "<range>", "outcome": "pass|xfail:<H>",
//  "evidence": "<what was measured>"}
struct Expectation {
  std::string variant;
  VersionRange range;
  std::string outcome;
  std::string evidence;
  size_t index = 0;  // position in the list (messages)
};
// Validates the list (unknown keys, missing/empty fields, range syntax, outcome form).
std::vector<Expectation> parse_expectations(const nlohmann::json& list, const std::string& where);
// The outcome the list gives `variant` on `version`; nullopt when no entry matches (or the version
// is not numeric); throws when two matching entries disagree. `used` (optional) gets the index of
// the entry that matched.
std::optional<std::string> expected_outcome(const std::vector<Expectation>& list, const std::string& variant,
                                            const std::string& version, const std::string& where,
                                            std::vector<bool>* used = nullptr, size_t* index = nullptr);

struct ReferenceRun {
  std::string backend = "cpu";     // cpu | libtorch | cuda | hip
  std::string precision = "fp64";  // fp64 (golden) | fp32 | bf16
  std::string tolerance;
};

struct MatrixCell {
  std::string name, capture_name;
  const MatrixEnvironment* env = nullptr;
  const MatrixModel* model = nullptr;
  const PatchSet* patch = nullptr;
  std::string variant;  // "<model>" or "<model>+<patch set>"
  std::string tokens_name;
  std::filesystem::path tokens;
  std::string dtype = "float32", device = "cpu";
  ReferenceRun reference;
  int sp = 1, ep = 1;
  std::string expect = "pass";
  std::string tier = "ci";  // "ci" | "nightly" (label nightly; emitted only with EmitOptions::nightly)
  std::string expect_source;           // where the expectation came from ("environments.e.expect[\"m\"]", ...)
  std::string counterfactual_capture;  // capture name of the counterfactual run ("" when none)
  std::vector<std::string> counterfactual_shims;  // the cell's shims + the expected hazard's fix
  std::string source;                  // "cells[3]": the matrix entry the cell expands from
  std::vector<std::string> labels;
};

struct Matrix {
  std::filesystem::path file, source_dir, tolerances, hazards;
  std::map<std::string, MatrixModel> models;
  std::map<std::string, PatchSet> patch_sets;
  std::map<std::string, MatrixEnvironment> environments;
  std::vector<Expectation> expectations;
  std::vector<MatrixCell> cells;
};

// Paths in the file are relative to the repository root (the matrix file's parent's parent).
Matrix load_matrix(const std::filesystem::path& file);

struct EmitOptions {
  std::filesystem::path cli;   // the opensci-compat binary
  std::filesystem::path work;  // toys, captures and results go here
  std::string python_dir;      // harness/python
  bool nightly = false;        // also emit the cells of tier "nightly"
};
std::string emit_ctest(const Matrix& matrix, const EmitOptions& options);
// Whether a build emits the cell as CTest tests: tier "ci" always, tier "nightly" only with
// `nightly` (-DOPENSCI_NIGHTLY=ON). emit_ctest, matrix tally and report agree through this.
inline bool cell_emitted(const MatrixCell& cell, bool nightly) { return cell.tier != "nightly" || nightly; }

// What a cell expands to (environment, model, patch set, inputs, reference, tolerance with its
// reason, expected outcome and where it came from, the hazard row, the CTest tests and fixtures
// it needs), for `opensci-compat matrix explain <cell>`. Throws naming close matches when the
// cell is unknown.
std::string explain_cell(const Matrix& matrix, const EmitOptions& options, const std::string& cell);

// Ran, not just collected: of the selected cells (those without an excluded label), how many ran
// live, replayed a golden, or did not run (grouped by reason). Not ok when fewer than `min_live`
// ran live, or when a cell of a required environment has no result or was not run (for
// "when-reachable" environments Not Run is allowed only when its index/mirror was unreachable).
struct Tally {
  bool ok = true;
  int selected = 0, live = 0, replayed = 0, not_run = 0, missing = 0;
  int not_emitted = 0;  // cells of tier nightly in a run that did not emit them (EmitOptions::nightly)
  std::map<std::string, int> verdicts;  // "live pass", "replayed xfail", ...
  std::string text;                     // the printed summary, problems last
};
Tally tally_cells(const Matrix& matrix, const EmitOptions& options, const std::vector<std::string>& exclude_labels,
                  int min_live);

// Where the pieces of a cell live under the work dir.
std::filesystem::path model_dir(const EmitOptions& o, const MatrixModel& m);
std::filesystem::path model_dir(const EmitOptions& o, const MatrixCell& c);  // the patched copy when statically patched
std::filesystem::path capture_dir(const EmitOptions& o, const MatrixCell& c);
std::filesystem::path counterfactual_dir(const EmitOptions& o, const MatrixCell& c);  // empty when none
std::filesystem::path result_file(const EmitOptions& o, const MatrixCell& c);

}  // namespace opensci::harness
