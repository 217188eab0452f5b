// What a verdict rests on: the hazard table (and its agreement with the shims and static
// patches), golden fixtures that must prove they are what they claim, SHA-256 of their files,
// and the cell's file handling. The numeric side (defects in the reference or a capture) is
// proven against real captures by tests/mutation.
#include <cstdlib>
#include <iostream>
#include <fstream>
#include <nlohmann/json.hpp>

#include "opensci/error.hpp"
#include "opensci/harness/capture.hpp"
#include "opensci/harness/cell.hpp"
#include "opensci/harness/hazards.hpp"
#include "opensci/harness/sha256.hpp"
#include "opensci/harness/toy.hpp"
#include "test_helpers.hpp"

using namespace opensci;
using namespace opensci::harness;
using opensci::test::ScratchDir;
namespace fs = std::filesystem;

TEST_CASE("sha256 matches the FIPS 180-4 test vectors") {
  CHECK(sha256_hex("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CHECK(sha256_hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  CHECK(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  CHECK(sha256_hex(std::string(1000000, 'a')) == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  ScratchDir dir("sha");
  opensci::test::write_text(dir / "f", std::string(70000, 'x') + "tail");  // crosses the read-buffer and block bounds
  CHECK(sha256_file(dir / "f") == sha256_hex(std::string(70000, 'x') + "tail"));
  REQUIRE_ERROR_MENTIONS(sha256_file(dir / "missing"), "missing", "cannot open");
}

TEST_CASE("the hazard table names every hazard's signature, evidence and fix") {
  const auto t = HazardTable::load(HazardTable::default_file());
  CHECK(t.ids().front() == "H1");
  CHECK(t.ids().size() >= 16);
  CHECK(t.error_matches("KeyError", "'default'", "self.rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]") ==
        std::vector<std::string>{"H2"});
  CHECK(t.error_matches("KeyError", "'default'", "somewhere else entirely").empty());  // H2 needs its traceback
  CHECK(t.error_matches("ImportError", "cannot import name 'LossKwargs' from 'transformers.utils'", "") ==
        std::vector<std::string>{"H1"});
  CHECK(t.error_matches("ValueError", "cannot import name 'LossKwargs'", "").empty());  // wrong type
  CHECK(t.error_matches("ImportError", "cannot import name 'check_model_inputs'", "") == std::vector<std::string>{"H12"});
  CHECK(t.hazard_for_evidence("inv_freq_garbage") == "H3");
  CHECK(t.hazard_for_evidence("effective_dtype_differs") == "H6");
  CHECK(t.at("H3", "here").counterfactual());
  CHECK_FALSE(t.at("H2", "here").counterfactual());  // an error hazard is proven by its signature
  REQUIRE_ERROR_MENTIONS(t.at("H99", "cells[3].expect"), "cells[3].expect", "unknown hazard 'H99'", "hazards.json");
}

TEST_CASE("a malformed hazard table is an error naming the key") {
  ScratchDir dir("hazards");
  const auto file = dir / "h.json";
  auto load = [&](const std::string& text) {
    opensci::test::write_text(file, text);
    return HazardTable::load(file);
  };
  const std::string ok = R"({"hazards": {"H1": {"name": "n", "title": "t", "versions": "v", "what": "w", "kind": "KIND",
      SIG "fix": {"shims": ["s"]}}}})";
  auto with = [&](const std::string& kind, const std::string& sig) {
    auto s = ok;
    s.replace(s.find("KIND"), 4, kind);
    s.replace(s.find("SIG"), 3, sig);
    return s;
  };
  CHECK(load(with("numeric", R"("evidence": ["inv_freq_garbage"],)")).hazard_for_evidence("inv_freq_garbage") == "H1");
  REQUIRE_ERROR_MENTIONS(load(with("sometimes", "")), "hazards.H1.kind", "'sometimes'");
  REQUIRE_ERROR_MENTIONS(load(with("numeric", R"("evidense": [],)")), "hazards.H1.evidense: unknown key");
  REQUIRE_ERROR_MENTIONS(load(with("numeric", R"("evidence": ["vibes"],)")), "unknown detector 'vibes'");
  REQUIRE_ERROR_MENTIONS(load(with("numeric", R"("consistent_with": ["luck"],)")), "unknown check 'luck'");
  REQUIRE_ERROR_MENTIONS(load(with("error", "")), "hazards.H1", "needs a 'signature'");
  REQUIRE_ERROR_MENTIONS(load(with("error", R"("signature": {"types": ["E"], "message": "("},)")), "invalid regex");
}

TEST_CASE("the shims and static patches name exactly the hazards the table gives them") {
  if (!fs::exists("/usr/bin/python3")) {
    std::cout << "OPENSCI-SKIPPED: /usr/bin/python3 is missing: cannot read harness/python/shims.py's registry\n";
    return;
  }
  const auto t = HazardTable::load(HazardTable::default_file());
  ScratchDir dir("shims");
  const auto out = dir / "shims.json";
  const auto cmd = fmt::format(
      "cd '{}/harness/python' && /usr/bin/python3 -c 'import json, shims; "
      "print(json.dumps({{n: s.hazard for n, s in shims.SHIMS.items()}}))' > '{}'",
      opensci::test::source_dir().string(), out.string());
  REQUIRE(std::system(cmd.c_str()) == 0);
  const auto registry = nlohmann::json::parse(opensci::test::read_text(out));
  const auto fixes = t.fix_shims();
  REQUIRE_FALSE(registry.empty());
  for (const auto& [name, hazard] : registry.items()) {
    INFO("shim " << name << " (shims.py says " << hazard << ")");
    REQUIRE(fixes.count(name));  // every shim is a fix the table lists
    CHECK(std::find(t.at(hazard, "shims.py").fix_shims.begin(), t.at(hazard, "shims.py").fix_shims.end(), name) !=
          t.at(hazard, "shims.py").fix_shims.end());
  }
  for (const auto& [name, hazard] : fixes) {
    INFO("hazards.json names fix shim " << name << " for " << hazard);
    CHECK(registry.contains(name));  // every fix the table names exists
  }
  for (const auto& e : fs::directory_iterator(opensci::test::source_dir() / "matrix/patches")) {
    if (e.path().extension() != ".json") continue;
    const auto p = nlohmann::json::parse(opensci::test::read_text(e.path()));
    for (const auto& r : p.value("rules", nlohmann::json::array())) {
      INFO(e.path().filename().string() << " rule for " << r.value("hazard", std::string("?")));
      CHECK(t.find(r.value("hazard", std::string())) != nullptr);
    }
  }
}

namespace {

// A golden fixture copied into a scratch tree (what replay_golden reads) and replayed.
struct GoldenCopy {
  ScratchDir dir{"golden"};
  fs::path fixture;
  CaptureOptions o;
  GoldenCopy() {
    const auto src = opensci::test::source_dir() / "fixtures/golden/5.12.1/opensci-ref-published/hotfix";
    fixture = dir / "golden/opensci-ref-published/hotfix";
    fs::create_directories(fixture);
    for (const auto& e : fs::directory_iterator(src)) fs::copy_file(e.path(), fixture / e.path().filename());
    o.env_spec = {{"provider", "golden"}, {"dir", (dir / "golden").string()}};
    o.model = dir / "model";
    o.tokens_file = opensci::test::source_dir() / "fixtures/tokens/padded-batch.json";
    o.out = dir / "out";
    o.variant = "opensci-ref-published/hotfix";
  }
  CaptureResult replay() { return run_capture(o); }
};

}  // namespace

TEST_CASE("a golden fixture is replayed only when it proves what it claims") {
  {
    GoldenCopy g;
    const auto r = g.replay();
    INFO(r.detail);
    CHECK(r.status == CaptureStatus::Ok);
  }
  {
    GoldenCopy g;  // one byte of the committed logits changed
    auto bytes = opensci::test::read_text(g.fixture / "output.safetensors");
    bytes[bytes.size() - 3] ^= 0x01;
    opensci::test::write_text(g.fixture / "output.safetensors", bytes);
    const auto r = g.replay();
    CHECK(r.status == CaptureStatus::BadOutput);
    CHECK(r.detail.find("golden.json files.output.safetensors.sha256") != std::string::npos);
  }
  {
    GoldenCopy g;  // replayed for another cell's variant
    g.o.variant = "opensci-ref-published/hotfix";
    g.o.shims = {"recompute-inv-freq"};
    const auto r = g.replay();
    CHECK(r.status == CaptureStatus::BadOutput);
    CHECK(r.detail.find("outcome.json shims: recorded [], the cell applies [recompute-inv-freq]") != std::string::npos);
  }
  {
    GoldenCopy g;
    g.o.dtype = "bfloat16";
    CHECK(g.replay().detail.find("outcome.json dtype: recorded float32, the cell asks for bfloat16") != std::string::npos);
  }
  {
    GoldenCopy g;  // a file slipped in, and golden.json gone
    opensci::test::write_text(g.fixture / "error.json", "{}");
    CHECK(g.replay().detail.find("error.json is in the fixture but not hashed") != std::string::npos);
    fs::remove(g.fixture / "golden.json");
    CHECK(g.replay().detail.find("no golden.json") != std::string::npos);
  }
}

TEST_CASE("a cell writes its result to a bare relative file name") {
  GoldenCopy g;
  ToyOptions toy;
  toy.config = opensci::test::source_dir() / "toy_configs/opensci-ref-published.json";
  toy.remote_code = opensci::test::source_dir() / "fixtures/remote_code/opensci_ref_published";
  toy.seed = 1;
  toy.out = g.dir / "toy";
  build_toy(toy);
  g.o.model = toy.out;
  REQUIRE(g.replay().status == CaptureStatus::Ok);
  // Through the CLI, from inside the scratch dir: `--result res.json` once crashed with
  // "filesystem error: cannot create directories".
  const auto cmd = fmt::format(
      "cd '{}' && '{}' cell --name c --capture out --model toy --tokens-file '{}' --variant opensci-ref-published/none "
      "--tolerance-file '{}' --tolerance fp32-cpu --result res.json > cell.log 2>&1",
      g.dir.path().string(), OPENSCI_CLI, g.o.tokens_file.string(),
      (opensci::test::source_dir() / "matrix/tolerances.json").string());
  const int rc = std::system(cmd.c_str());
  INFO(opensci::test::read_text(g.dir / "cell.log"));
  // The golden was recorded for the hotfix variant on a hotfix-patched copy; on the unpatched toy
  // the verdict does not matter here, only that the cell ran and wrote res.json.
  CHECK(WEXITSTATUS(rc) <= 1);
  CHECK(fs::exists(g.dir / "res.json"));
  CHECK(fs::exists(g.dir / "res.reference.safetensors"));
  CHECK(opensci::test::read_text(g.dir / "cell.log").find("filesystem error") == std::string::npos);
}
