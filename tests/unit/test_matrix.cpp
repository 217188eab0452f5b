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

TEST_CASE("matrix errors name the file and the offending entry") {
  ScratchDir dir("matrix");
  std::filesystem::create_directories(dir / "matrix");
  const auto file = dir / "matrix/m.json";
  const std::string base = R"({"tokens": {"t": "t.json"}, "models": {"m": {"config": "c.json"}},
    "environments": {"e": {"transformers": "5.2.0", "spec": {"provider": "system", "python": "/usr/bin/python3"}}},
    "cells": [{"environments": ["e"], "models": ["m"], "tokens": "t", "reference": [{"tolerance": "x"}], "expect": "EXPECT"}]})";
  auto with = [&](const std::string& from, const std::string& to) {
    auto s = base;
    s.replace(s.find(from), from.size(), to);
    opensci::test::write_text(file, s);
    return file;
  };
  CHECK(load_matrix(with("EXPECT", "xfail:H3")).cells.at(0).expect == "xfail:H3");
  REQUIRE_ERROR_MENTIONS(load_matrix(with("EXPECT", "maybe")), "m.json", "'maybe'", "xfail:<hazard id>");
  REQUIRE_ERROR_MENTIONS(load_matrix(with("\"models\": [\"m\"]", "\"models\": [\"nope\"]")), "m.json", "'nope'");
  REQUIRE_ERROR_MENTIONS(load_matrix(with("\"expect\": \"EXPECT\"", "\"patch_sets\": [\"nope\"]")), "patch set 'nope'");
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
