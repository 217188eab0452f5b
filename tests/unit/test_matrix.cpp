// The matrix file -> cells and CTest text, and the static patch engine.
#include "opensci/error.hpp"
#include "opensci/harness/matrix.hpp"
#include "opensci/harness/patch.hpp"
#include "test_helpers.hpp"

using namespace opensci;
using namespace opensci::harness;
using opensci::test::ScratchDir;

TEST_CASE("the project matrix loads with labels and expectations") {
  const auto m = load_matrix(opensci::test::source_dir() / "matrix/matrix.json");
  REQUIRE_FALSE(m.cells.empty());
  const MatrixCell* h3 = nullptr;
  for (const auto& c : m.cells)
    if (c.name == "cell/debian-sid/opensci-ref-published+hotfix-no-rope/padded/float32-cpu/vs-cpu-fp64") h3 = &c;
  REQUIRE(h3);
  CHECK(h3->expect == "xfail:H3");
  auto has = [&](const std::string& l) { return std::find(h3->labels.begin(), h3->labels.end(), l) != h3->labels.end(); };
  CHECK(has("v5"));
  CHECK(has("v5.12"));
  CHECK(has("patched"));
  CHECK(has("hotfix-no-rope"));
  CHECK(has("sp1"));
  CHECK(m.environments.at("tf-4.57").version_labels() == std::vector<std::string>{"v4", "v4.57"});
  EmitOptions o{"/bin/opensci-compat", "/tmp/work", {}};
  const auto text = emit_ctest(m, o);
  CHECK(text.find("add_test([==[patch/opensci-ref-published+hotfix-no-rope]==]") != std::string::npos);
  CHECK(text.find("FIXTURES_REQUIRED [==[env.debian-sid;model.opensci-ref-published+hotfix-no-rope]==]") !=
        std::string::npos);
  CHECK(text.find("add_test([==[env/golden-") == std::string::npos);  // golden replays need no environment
}

namespace {

// A small matrix in a scratch dir (tolerances "x" and "y", the project's hazard table) with
// `from` replaced by `to`; returns its path.
struct SmallMatrix {
  ScratchDir dir{"matrix"};
  std::filesystem::path file;
  std::string base = R"({"tokens": {"t": "t.json"}, "hazards": "HAZARDS", "models": {"m": {"config": "c.json"}},
    "patch_sets": {"s": {"shims": ["recompute-inv-freq"], "fixes": ["H3"]}},
    "environments": {"e": {"transformers": "5.2.0", "required": "always",
                           "spec": {"provider": "system", "python": "/usr/bin/python3"}}},
    "cells": [{"environments": ["e"], "models": ["m"], "tokens": "t", "patch_sets": ["none", "s"],
               "capture": {"dtype": "float32"}, "reference": [{"tolerance": "x"}], "expect": "EXPECT"}]})";
  SmallMatrix() {
    std::filesystem::create_directories(dir / "matrix");
    file = dir / "matrix/m.json";
    opensci::test::write_text(dir / "matrix/tolerances.json", R"({"x": {"reason": "r"}, "y": {"reason": "r"}})");
    opensci::test::write_text(dir / "t.json", R"({"input_ids": [[1, 2]]})");
    const auto table = (opensci::test::source_dir() / "matrix/hazards.json").string();
    base.replace(base.find("HAZARDS"), 7, table);
  }
  std::filesystem::path with(const std::string& from = "", const std::string& to = "") {
    auto s = base;
    if (!from.empty()) {
      REQUIRE(s.find(from) != std::string::npos);
      s.replace(s.find(from), from.size(), to);
    }
    if (s.find("EXPECT") != std::string::npos) s.replace(s.find("EXPECT"), 6, "pass");
    opensci::test::write_text(file, s);
    return file;
  }
};

}  // namespace

TEST_CASE("matrix errors name the file and the offending entry") {
  SmallMatrix sm;
  CHECK(load_matrix(sm.with("EXPECT", "xfail:H3")).cells.at(0).expect == "xfail:H3");
  REQUIRE_ERROR_MENTIONS(load_matrix(sm.with("EXPECT", "maybe")), "m.json", "cells[0].expect", "'maybe'", "xfail:<hazard id>");
  REQUIRE_ERROR_MENTIONS(load_matrix(sm.with("\"models\": [\"m\"]", "\"models\": [\"nope\"]")), "m.json", "'nope'");
  REQUIRE_ERROR_MENTIONS(load_matrix(sm.with("[\"none\", \"s\"]", "[\"nope\"]")), "cells[0].patch_sets", "patch set 'nope'");
}

TEST_CASE("a typo anywhere in the matrix is an error with its location") {
  SmallMatrix sm;
  // The misspelt key that once silently produced float32 cells.
  REQUIRE_ERROR_MENTIONS(load_matrix(sm.with("\"dtype\": \"float32\"", "\"dytpe\": \"bfloat16\"")), "m.json",
                         "cells[0].capture.dytpe: unknown key", "known: dtype, device");
  REQUIRE_ERROR_MENTIONS(load_matrix(sm.with("\"dtype\": \"float32\"", "\"dtype\": \"bf16\"")), "cells[0].capture.dtype",
                         "'bf16' is not one of float32, bfloat16, float64");
  REQUIRE_ERROR_MENTIONS(load_matrix(sm.with("[{\"tolerance\": \"x\"}]", "[{\"backend\": \"cpu\"}]")),
                         "cells[0].reference[0]", "missing 'tolerance'");
  REQUIRE_ERROR_MENTIONS(load_matrix(sm.with("\"tolerance\": \"x\"", "\"tolerance\": \"z\"")),
                         "cells[0].reference[0].tolerance", "'z' is not in", "known: x, y");
  REQUIRE_ERROR_MENTIONS(load_matrix(sm.with("\"tolerance\": \"x\"", "\"tolerance\": \"x\", \"precison\": \"fp32\"")),
                         "cells[0].reference[0].precison: unknown key");
  REQUIRE_ERROR_MENTIONS(load_matrix(sm.with("\"tokens\": \"t\",", "\"tokens\": \"t\", \"enviroments\": [],")),
                         "cells[0].enviroments: unknown key");
  REQUIRE_ERROR_MENTIONS(load_matrix(sm.with("\"required\": \"always\"", "\"required\": \"sometimes\"")),
                         "environments.e.required", "'sometimes'");
  REQUIRE_ERROR_MENTIONS(load_matrix(sm.with("\"config\": \"c.json\"", "\"config\": \"c.json\", \"sede\": 3")),
                         "models.m.sede: unknown key");
  REQUIRE_ERROR_MENTIONS(load_matrix(sm.with("{\"tokens\":", "{\"celss\": [], \"tokens\":")), "celss: unknown key");
}

TEST_CASE("hazards, shims and expectations are checked against the hazard table") {
  SmallMatrix sm;
  REQUIRE_ERROR_MENTIONS(load_matrix(sm.with("EXPECT", "xfail:H99")), "cells[0].expect", "unknown hazard 'H99'", "H1, H2");
  REQUIRE_ERROR_MENTIONS(load_matrix(sm.with("\"recompute-inv-freq\"", "\"recompute-inv-freqs\"")),
                         "patch_sets.s.shims", "unknown shim 'recompute-inv-freqs'");
  // What a patch set claims to fix is checked against what its shims fix.
  REQUIRE_ERROR_MENTIONS(load_matrix(sm.with("\"fixes\": [\"H3\"]", "\"fixes\": [\"H3\", \"H5\"]")),
                         "patch_sets.s.fixes", "declares [H3, H5]", "fix [H3]");
  // An environment expectation for a variant no cell has (a misspelt model) is an error, not a no-op.
  REQUIRE_ERROR_MENTIONS(
      load_matrix(sm.with("\"required\": \"always\",", "\"required\": \"always\", \"expect\": {\"mm+s\": \"xfail:H3\"},")),
      "environments.e.expect[\"mm+s\"]", "no cell of environment 'e' has variant 'mm+s'");
  REQUIRE_ERROR_MENTIONS(
      load_matrix(sm.with("\"required\": \"always\",", "\"required\": \"always\", \"expect\": {\"m+s\": \"xfail:H77\"},")),
      "environments.e.expect[\"m+s\"]", "unknown hazard 'H77'");
}

TEST_CASE("an expected numeric failure brings its counterfactual capture") {
  SmallMatrix sm;
  auto m = load_matrix(sm.with("\"required\": \"always\",", "\"required\": \"always\", \"expect\": {\"m\": \"xfail:H3\", \"m+s\": \"pass\"},"));
  const auto& c = m.cells.at(0);
  REQUIRE(c.variant == "m");
  CHECK(c.expect == "xfail:H3");
  CHECK(c.expect_source == "environments.e.expect[\"m\"]");
  CHECK(c.counterfactual_capture == "e/m+fix-H3/t/float32-cpu");
  CHECK(c.counterfactual_shims == std::vector<std::string>{"recompute-inv-freq"});
  CHECK(m.cells.at(1).counterfactual_capture.empty());  // expected to pass: nothing to prove
  EmitOptions o{"/bin/opensci-compat", "/tmp/work", {}};
  const auto text = emit_ctest(m, o);
  CHECK(text.find("add_test([==[capture/e/m+fix-H3/t/float32-cpu]==]") != std::string::npos);
  CHECK(text.find("--variant [==[m/none+fix-H3]==]") != std::string::npos);
  CHECK(text.find("--shim recompute-inv-freq") != std::string::npos);
  CHECK(text.find("--counterfactual [==[/tmp/work/captures/e/m+fix-H3/t/float32-cpu]==]") != std::string::npos);
  CHECK(text.find("FIXTURES_REQUIRED [==[capture.e/m/t/float32-cpu;capture.e/m+fix-H3/t/float32-cpu]==]") != std::string::npos);
  CHECK(text.find("env provision --spec") != std::string::npos);
  CHECK(text.find("--required always") != std::string::npos);
  // An error hazard is proven by its signature: no counterfactual.
  m = load_matrix(sm.with("EXPECT", "xfail:H2"));
  CHECK(m.cells.at(0).counterfactual_capture.empty());
  // matrix explain says where the expectation came from and how it is proven.
  m = load_matrix(sm.with("\"required\": \"always\",", "\"required\": \"always\", \"expect\": {\"m\": \"xfail:H3\"},"));
  const auto text2 = explain_cell(m, o, "cell/e/m/t/float32-cpu/vs-cpu-fp64");
  CHECK(text2.find("xfail:H3 — from environments.e.expect[\"m\"]") != std::string::npos);
  CHECK(text2.find("counterfactual capture e/m+fix-H3/t/float32-cpu") != std::string::npos);
  CHECK(text2.find("x (tolerances.json): r") != std::string::npos);
  REQUIRE_ERROR_MENTIONS(explain_cell(m, o, "e/m/t/float32"), "no cell named", "cell/e/m/t/float32-cpu/vs-cpu-fp64");
}

TEST_CASE("the tally fails a run that ran nothing live or skipped a required environment") {
  SmallMatrix sm;
  const auto m = load_matrix(sm.with());
  EmitOptions o{"/bin/opensci-compat", sm.dir / "work", {}};
  // No results at all: the required environment's cells did not run.
  auto t = tally_cells(m, o, {}, 1);
  CHECK_FALSE(t.ok);
  CHECK(t.missing == 2);
  CHECK(t.text.find("only 0 cells ran live") != std::string::npos);
  CHECK(t.text.find("environment e is required (always)") != std::string::npos);
  auto write = [&](const MatrixCell& c, const std::string& json) {
    std::filesystem::create_directories(result_file(o, c).parent_path());
    opensci::test::write_text(result_file(o, c), json);
  };
  write(m.cells.at(0), R"({"verdict": "pass", "capture": {"status": "ok"}})");
  write(m.cells.at(1), R"({"verdict": "not-run", "not_run": {"reason": "no python", "unreachable": false}})");
  t = tally_cells(m, o, {}, 1);
  CHECK_FALSE(t.ok);  // a required environment may not be Not Run
  CHECK(t.live == 1);
  CHECK(t.text.find("Not Run, but environment e is required (always): no python") != std::string::npos);
  write(m.cells.at(1), R"({"verdict": "xfail", "capture": {"status": "ok", "golden": "/x"}})");
  t = tally_cells(m, o, {}, 1);
  CHECK(t.ok);
  CHECK(t.replayed == 1);
  CHECK(t.text.find("1 ran live (pass 1), 1 replayed goldens (xfail 1)") != std::string::npos);
  t = tally_cells(m, o, {"patched"}, 2);  // one cell deselected; 2 live demanded
  CHECK(t.selected == 1);
  CHECK_FALSE(t.ok);

  // Cells of tier nightly are not emitted by a CI build: no result is expected of them there, and
  // a nightly build (which emitted them) must have their results.
  const auto n = load_matrix(sm.with("\"expect\": \"EXPECT\"", "\"expect\": \"EXPECT\", \"tier\": \"nightly\""));
  t = tally_cells(n, o, {}, 0);
  CHECK(t.ok);
  CHECK(t.selected == 0);
  CHECK(t.not_emitted == 2);
  CHECK(t.text.find("2 cells of tier nightly not in this run") != std::string::npos);
  EmitOptions nightly = o;
  nightly.nightly = true;
  std::filesystem::remove_all(sm.dir / "work");
  t = tally_cells(n, nightly, {}, 0);
  CHECK_FALSE(t.ok);
  CHECK(t.missing == 2);
}

TEST_CASE("static patches rewrite a copy and never silently do nothing") {
  ScratchDir dir("patch");
  const auto model = dir / "model";
  std::filesystem::create_directories(model);
  opensci::test::write_text(model / "modeling_x.py", "from transformers.utils import LossKwargs\nclass A:\n    pass\n");
  opensci::test::write_text(model / "config.json", R"({"model_type": "opensci"})");
  opensci::test::write_text(model / "model.safetensors", "weights");
  opensci::test::write_text(dir / "p.json", R"({"name": "p", "fixes": ["H1", "H5"], "rules": [
    {"hazard": "H1", "kind": "regex", "file": "modeling_*.py", "find": "LossKwargs", "replace": "TransformersKwargs"},
    {"hazard": "H1", "kind": "insert_after", "file": "modeling_*.py", "anchor": "^class A:", "text": "    patched = True"},
    {"hazard": "H1", "kind": "regex", "file": "modeling_*.py", "find": "LossKwargs", "expect_matches": "0"},
    {"hazard": "H5", "kind": "json_set", "file": "config.json", "key": "tie_word_embeddings", "value": true, "only_if_absent": true}]})");
  const auto r = apply_patch(load_patch(dir / "p.json"), model, dir / "out");
  CHECK(r.applied.size() == 3);
  const auto code = opensci::test::read_text(dir / "out/modeling_x.py");
  CHECK(code.find("import TransformersKwargs") != std::string::npos);
  CHECK(code.find("class A:\n    patched = True\n") != std::string::npos);
  CHECK(opensci::test::read_text(dir / "out/config.json").find("\"tie_word_embeddings\": true") != std::string::npos);
  CHECK(opensci::test::read_text(model / "modeling_x.py").find("LossKwargs") != std::string::npos);  // original untouched
  CHECK(opensci::test::read_text(dir / "out/model.safetensors") == "weights");

  // The same patch on code it was not written for: an error naming patch, hazard and file.
  opensci::test::write_text(dir / "q.json", R"({"name": "q", "rules": [
    {"hazard": "H2", "kind": "regex", "file": "modeling_*.py", "find": "ROPE_INIT_FUNCTIONS", "replace": "x"}]})");
  REQUIRE_ERROR_MENTIONS(apply_patch(load_patch(dir / "q.json"), model, dir / "out2"), "patch 'q'", "H2", "modeling_*.py",
                         "silently do nothing");
  opensci::test::write_text(dir / "r.json", R"({"name": "r", "rules": [
    {"hazard": "H1", "kind": "regex", "file": "*.py", "find": "LossKwargs", "expect_matches": "0"}]})");
  REQUIRE_ERROR_MENTIONS(apply_patch(load_patch(dir / "r.json"), model, dir / "out3"), "expects no match");
  opensci::test::write_text(dir / "s.json", R"({"name": "s", "rules": [{"hazard": "H1", "kind": "sed", "file": "*.py"}]})");
  REQUIRE_ERROR_MENTIONS(load_patch(dir / "s.json"), "unknown kind 'sed'");
}

// ---- expectations by version range, cell tiers, env provisioning flags (issue 9, environments) ----

TEST_CASE("version ranges: clauses, wildcards, missing components, errors", "[matrix][expectations]") {
  const auto r = parse_version_range(">=5.0, <5.2");
  CHECK(r.clauses.size() == 2);
  CHECK(r.contains("5.0.0"));
  CHECK(r.contains("5.0"));
  CHECK(r.contains("5.1.9"));
  CHECK_FALSE(r.contains("5.2.0"));
  CHECK_FALSE(r.contains("4.57.6"));
  CHECK_FALSE(r.contains("5.10.4"));  // numeric, not lexicographic
  CHECK(parse_version_range("<4.54").contains("4.53.3"));
  CHECK_FALSE(parse_version_range("<4.54").contains("4.54.0"));
  CHECK(parse_version_range("==5.2.*").contains("5.2.0"));
  CHECK(parse_version_range("==5.2.*").contains("5.2"));
  CHECK_FALSE(parse_version_range("==5.2.*").contains("5.20.2"));
  CHECK(parse_version_range("!=5.2.*").contains("5.20.2"));
  CHECK(parse_version_range("==5.24").contains("5.24.0"));  // missing components are 0
  CHECK(parse_version_range("").contains("4.48.3"));
  CHECK(parse_version_range("*").contains("5.24"));
  CHECK(parse_version_range(">4.57.6").contains("5.0.0"));
  CHECK_FALSE(parse_version_range(">4.57.6").contains("4.57.6"));
  REQUIRE_ERROR_MENTIONS(parse_version_range(">=5.0;<5.2"), ">=5.0;<5.2", "not <op><version>");
  REQUIRE_ERROR_MENTIONS(parse_version_range("~=5.0"), "clause \"~=5.0\"");
  REQUIRE_ERROR_MENTIONS(parse_version_range(">=5.*"), "only goes with == or !=");
  REQUIRE_ERROR_MENTIONS(parse_version_range(">=5.0").contains("latest"), "\"latest\" is not a numeric version");
  CHECK_FALSE(parse_numeric_version("5.2.0rc1"));
  CHECK(parse_numeric_version("5.10.4") == std::vector<int>{5, 10, 4});
}

TEST_CASE("expectations: the list is validated, applied by range, overridden per environment", "[matrix][expectations]") {
  ScratchDir dir("matrix-exp");
  std::filesystem::create_directories(dir / "matrix");
  const auto file = dir / "matrix/m.json";
  // Three versions of one model; H1 below 4.54, H2 from 5.0; tf-5.2 overrides its own cell.
  std::string base = R"({"tokens": {"t": "t.json"}, "hazards": "HAZARDS", "models": {"m": {"config": "c.json"}},
    "environments": {
      "tf-4.48": {"transformers": "4.48.3", "spec": {"provider": "system", "python": "/usr/bin/python3"}},
      "tf-5.0": {"transformers": "5.0.0", "spec": {"provider": "system", "python": "/usr/bin/python3"}},
      "tf-5.2": {"transformers": "5.2.0", "spec": {"provider": "system", "python": "/usr/bin/python3"},
                 "expect": {"m": "xfail:H3"}},
      "latest": {"transformers": "latest", "spec": {"provider": "system", "python": "/usr/bin/python3"}}},
    "expectations": EXPECTATIONS,
    "cells": [{"environments": ["tf-4.48", "tf-5.0", "tf-5.2", "latest"], "models": ["m"], "tokens": "t",
               "reference": [{"tolerance": "x"}], "expect": "pass" TIER}]})";
  opensci::test::write_text(dir / "matrix/tolerances.json", R"({"x": {"reason": "r"}})");
  opensci::test::write_text(dir / "t.json", R"({"input_ids": [[1, 2]]})");
  base.replace(base.find("HAZARDS"), 7, (opensci::test::source_dir() / "matrix/hazards.json").string());
  auto with = [&](const std::string& expectations, const std::string& tier = "") {
    auto s = base;
    s.replace(s.find("EXPECTATIONS"), 12, expectations);
    s.replace(s.find(" TIER"), 5, tier);
    opensci::test::write_text(file, s);
    return file;
  };
  auto expect_of = [](const Matrix& m, const std::string& env) {
    for (const auto& c : m.cells)
      if (c.env->name == env) return c.expect;
    return std::string("<no cell>");
  };
  const auto m = load_matrix(with(R"([
      {"variant": "m", "transformers": "<4.54", "outcome": "xfail:H1", "evidence": "4.48.3: ImportError"},
      {"variant": "m", "transformers": ">=5.0", "outcome": "xfail:H2", "evidence": "5.0.0: KeyError 'default'"}])"));
  CHECK(m.expectations.size() == 2);
  CHECK(expect_of(m, "tf-4.48") == "xfail:H1");
  CHECK(expect_of(m, "tf-5.0") == "xfail:H2");
  CHECK(expect_of(m, "tf-5.2") == "xfail:H3");  // the environment's own "expect" wins
  CHECK(expect_of(m, "latest") == "pass");      // not a numeric version: the cell's expect
  CHECK(expected_outcome(m.expectations, "m", "4.57.6", "x") == std::nullopt);
  CHECK(expected_outcome(m.expectations, "m+hotfix", "5.0.0", "x") == std::nullopt);  // variants match exactly

  // Validation: every message names the file and the entry.
  REQUIRE_ERROR_MENTIONS(load_matrix(with(R"([{"variant": "m", "transformers": ">=5", "outcome": "xfail:H2"}])")),
                         "m.json", "expectations[0]", "'evidence' must be a non-empty string");
  REQUIRE_ERROR_MENTIONS(
      load_matrix(with(R"([{"variant": "m", "transformers": ">=5", "outcome": "fail", "evidence": "e"}])")),
      "expectations[0]", "outcome 'fail'");
  REQUIRE_ERROR_MENTIONS(
      load_matrix(with(R"([{"variant": "m", "transformers": "5.x", "outcome": "pass", "evidence": "e"}])")),
      "expectations[0]", "clause \"5.x\"");
  REQUIRE_ERROR_MENTIONS(load_matrix(with(
                             R"([{"variant": "m", "transformers": ">=5", "outcome": "pass", "evidence": "e", "hazard": "H2"}])")),
                         "unknown key 'hazard'");
  REQUIRE_ERROR_MENTIONS(load_matrix(with(R"({"variant": "m"})")), "'expectations' must be a list");
  // Two entries that disagree on one version: an error naming both.
  REQUIRE_ERROR_MENTIONS(load_matrix(with(R"([
      {"variant": "m", "transformers": ">=5.0", "outcome": "xfail:H2", "evidence": "e"},
      {"variant": "m", "transformers": "==5.0.*", "outcome": "pass", "evidence": "e"}])")),
                         "expectations[0]", "expectations[1]", "disagree for transformers 5.0.0");
  // ...agreeing overlaps are fine
  CHECK_NOTHROW(load_matrix(with(R"([
      {"variant": "m", "transformers": ">=5.0", "outcome": "xfail:H2", "evidence": "e"},
      {"variant": "m", "transformers": "==5.0.*", "outcome": "xfail:H2", "evidence": "e"}])")));
  // An entry that matches no cell is a typo or stale.
  REQUIRE_ERROR_MENTIONS(
      load_matrix(with(R"([{"variant": "m+hotfix", "transformers": ">=5", "outcome": "pass", "evidence": "e"}])")),
      "expectations[0]", "matches no cell");
  REQUIRE_ERROR_MENTIONS(
      load_matrix(with(R"([{"variant": "m", "transformers": ">=6", "outcome": "pass", "evidence": "e"}])")),
      "matches no cell");

  // Tiers: label nightly, emitted only on request.
  const auto nightly = load_matrix(with("[]", R"(, "tier": "nightly")"));
  REQUIRE(nightly.cells.size() == 4);
  CHECK(nightly.cells[0].tier == "nightly");
  CHECK(std::find(nightly.cells[0].labels.begin(), nightly.cells[0].labels.end(), "nightly") !=
        nightly.cells[0].labels.end());
  EmitOptions o{"/bin/opensci-compat", "/tmp/work", {}};
  CHECK(emit_ctest(nightly, o).find("add_test(") == std::string::npos);  // no cell, no env, no toy
  o.nightly = true;
  CHECK(emit_ctest(nightly, o).find("add_test([==[cell/tf-5.0/m/t/float32-cpu/vs-cpu-fp64]==]") != std::string::npos);
  REQUIRE_ERROR_MENTIONS(load_matrix(with("[]", R"(, "tier": "weekly")")), "tier: 'weekly' is not one of");

  // env/<name> verifies the declared version and writes its status for the report.
  const auto text = emit_ctest(load_matrix(with("[]")), EmitOptions{"/bin/opensci-compat", "/tmp/work", {}});
  CHECK(text.find("--expect-transformers [==[5.0.0]==] --status-file [==[/tmp/work/envs/tf-5.0.json]==]") !=
        std::string::npos);
}

TEST_CASE("the project matrix: the release line, latest, expectations", "[matrix][expectations]") {
  const auto m = load_matrix(opensci::test::source_dir() / "matrix/matrix.json");
  // every minor from 4.48 to the newest, each declaring its exact newest patch release
  std::vector<std::string> minors;
  for (const auto& [name, env] : m.environments)
    if (name.starts_with("tf-")) {
      CHECK(env.provider() == "uv");
      CHECK(env.spec.at("transformers") == env.transformers);
      CHECK(env.spec.contains("base"));
      minors.push_back(name);
    }
  CHECK(minors.size() >= 35);
  for (const char* n : {"tf-4.48", "tf-4.57", "tf-5.0", "tf-5.24"}) CHECK(m.environments.count(n));
  REQUIRE(m.environments.count("latest"));
  const auto& latest = m.environments.at("latest");
  CHECK(latest.spec.at("transformers") == "latest");
  CHECK(parse_numeric_version(latest.transformers));  // declared as the newest minor: labels v5, v5.<minor>
  CHECK(latest.version_labels().size() == 2);
  // no overlay (local source trees) in the default matrix
  for (const auto& [name, env] : m.environments) CHECK(env.provider() != "overlay");
}
