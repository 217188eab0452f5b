// Matrix layers: user models and matrix files merged over the project's matrix, as load_matrix
// and emit_ctest see them.
#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "opensci/error.hpp"
#include "opensci/harness/matrix.hpp"
#include "opensci/harness/matrix_layers.hpp"
#include "test_helpers.hpp"

using namespace opensci::harness;
using nlohmann::json;
using opensci::test::read_text;
using opensci::test::ScratchDir;
using opensci::test::write_text;
namespace fs = std::filesystem;

namespace {

fs::path base() { return opensci::test::source_dir() / "matrix/matrix.json"; }

// A user model directory: the published config shape and remote code (toyify reads it later).
fs::path user_model(const fs::path& dir, bool qwen3 = false) {
  fs::create_directories(dir);
  json cfg = json::parse(read_text(opensci::test::source_dir() / "toy_configs/opensci-ref-published.json"));
  if (qwen3) cfg.erase("qk_layernorm");
  write_text(dir / "config.json", cfg.dump());
  return dir;
}

Matrix load(const ScratchDir& dir, const json& merged) {
  write_text(dir / "merged.json", merged.dump());
  return load_matrix(dir / "merged.json");
}

}  // namespace

TEST_CASE("a user model gets the cells, patch sets and (with expect like) the expectations of its template") {
  ScratchDir dir("layers");
  MatrixLayers l;
  l.base = base();
  l.models = {user_model(dir / "My.Model").string()};
  l.expect = "like";
  const auto merged = merge_matrix(l);
  const auto m = load(dir, merged);
  REQUIRE(m.models.count("my-model"));
  const auto& model = m.models.at("my-model");
  CHECK(model.build["toyify"]["from"] == (dir / "My.Model").string());
  std::map<std::string, std::string> mine, fixture;
  for (const auto& c : m.cells) {
    if (c.model->name == "my-model") mine[c.env->name + "/" + c.patch->name + "/" + c.reference.backend] = c.expect;
    if (c.model->name == "opensci-ref-published" && !c.env->golden())
      fixture[c.env->name + "/" + c.patch->name + "/" + c.reference.backend] = c.expect;
  }
  CHECK(mine == fixture);  // the same grid: every live environment, patch set, reference and expectation
  CHECK(mine.at("debian-sid/none/cpu") == "xfail:H2");
  CHECK(mine.at("debian-sid/hotfix-no-rope/cpu") == "xfail:H3");
  CHECK(mine.at("debian-sid/hotfix/cpu") == "pass");
  for (const auto& c : m.cells)
    if (c.model->name == "my-model") {
      CHECK_FALSE(c.env->golden());  // no recorded capture of this model
      CHECK(std::find(c.labels.begin(), c.labels.end(), "user") != c.labels.end());
      CHECK(std::find(c.labels.begin(), c.labels.end(), "hazard-fixture") == c.labels.end());
    }
  CHECK(merged["_layers"]["notes"].dump().find("golden-5.12.1 left out") != std::string::npos);
  // The toy step is toyify, Not Run (77) where the model cannot be had.
  const auto text = emit_ctest(m, {"/bin/opensci-compat", dir / "work", {}});
  CHECK(text.find("add_test([==[toy/my-model]==] [==[/bin/opensci-compat]==] [==[toyify]==] [==[--from]==]") !=
        std::string::npos);
  CHECK(text.find("FIXTURES_SETUP toy.my-model SKIP_RETURN_CODE 77") != std::string::npos);
  // The project's own cells are all still there.
  const auto plain = load_matrix(base());
  CHECK(m.cells.size() == plain.cells.size() + mine.size());
}

TEST_CASE("expect pass, the lineage's template, restrictions and layer files") {
  ScratchDir dir("layers2");
  MatrixLayers l;
  l.base = base();
  l.models = {user_model(dir / "q", true).string()};  // OpenSci-Qwen3 lineage
  l.environments = {"debian-sid"};
  l.user_only = true;
  auto m = load(dir, merge_matrix(l));
  REQUIRE_FALSE(m.cells.empty());
  for (const auto& c : m.cells) {
    CHECK(c.model->name == "q");
    CHECK(c.env->name == "debian-sid");
    CHECK(c.expect == "pass");
    CHECK(c.patch->name == "none");  // opensci-qwen3's cells
  }
  // A layer file: its own environment and a user model with sizes, paths relative to the file.
  fs::create_directories(dir / "layer");
  user_model(dir / "layer/mine");
  write_text(dir / "layer/user.json", R"({
    "environments": {"my-venv": {"transformers": "4.57.6", "spec": {"provider": "venv", "transformers": "4.57.6"}}},
    "models": {"mine": {"from": "mine", "like": "opensci-ref", "toyify": {"layers": 2, "kv_heads": 2},
                        "environments": ["debian-sid"]}},
    "cells": [{"environments": ["my-venv"], "models": ["mine"], "tokens": "padded",
               "reference": [{"backend": "cpu", "precision": "fp64", "tolerance": "fp32-cpu"}]}]})");
  MatrixLayers l2;
  l2.base = base();
  l2.layers = {dir / "layer/user.json"};
  m = load(dir, merge_matrix(l2));
  std::set<std::string> envs;
  for (const auto& c : m.cells)
    if (c.model->name == "mine") envs.insert(c.env->name);
  CHECK(envs == std::set<std::string>{"debian-sid", "my-venv"});
  const auto cmd = user_model_command(m.models.at("mine"), "/out");
  CHECK(cmd == std::vector<std::string>{"toyify", "--from", (dir / "layer/mine").string(), "--out", "/out", "--seed", "1",
                                        "--unavailable-marker", "--kv-heads", "2", "--layers", "2"});
}

TEST_CASE("layer errors name the file and the key") {
  ScratchDir dir("layers3");
  write_text(dir / "bad.json", R"({"modles": {}})");
  MatrixLayers l;
  l.base = base();
  l.layers = {dir / "bad.json"};
  REQUIRE_ERROR_MENTIONS(merge_matrix(l), "bad.json", "unknown key 'modles'");
  write_text(dir / "bad2.json", R"({"models": {"x": {"from": "org/x", "toyfy": {}}}})");
  l.layers = {dir / "bad2.json"};
  REQUIRE_ERROR_MENTIONS(merge_matrix(l), "bad2.json", "user model 'x'", "unknown key 'toyfy'");
  write_text(dir / "bad3.json", R"({"models": {"x": {"from": "org/x", "like": "nope"}}})");
  l.layers = {dir / "bad3.json"};
  REQUIRE_ERROR_MENTIONS(merge_matrix(l), "like 'nope'");
}
