// Dashboards: the PNG writer (decoded by Python's zlib, an independent decoder), the cells'
// CTest measurements, the report's grid (release order, outcomes, env-error and not-run columns,
// the first change of a row) and the history across runs.
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "opensci/error.hpp"
#include "opensci/harness/matrix.hpp"
#include "opensci/harness/measurements.hpp"
#include "opensci/harness/png.hpp"
#include "opensci/harness/process.hpp"
#include "opensci/harness/report.hpp"
#include "test_helpers.hpp"

using namespace opensci::harness;
using nlohmann::json;
using opensci::test::ScratchDir;
namespace fs = std::filesystem;

namespace {

void write_bytes(const fs::path& p, const std::vector<uint8_t>& b) {
  std::ofstream(p, std::ios::binary)
      .write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

// Runs tests/dashboard/png_decode.py (python3 from PATH); returns its output, REQUIREs exit 0.
std::string python_decode(const std::vector<std::string>& args, const fs::path& log) {
  ProcessSpec spec;
  spec.argv = {"python3", (opensci::test::source_dir() / "tests/dashboard/png_decode.py").string()};
  spec.argv.insert(spec.argv.end(), args.begin(), args.end());
  spec.env = {{"PATH", "/usr/local/bin:/usr/bin:/bin"}};
  spec.stdout_path = spec.stderr_path = log;
  spec.timeout = std::chrono::seconds(60);
  const auto r = run_process(spec);
  const auto out = opensci::test::read_text(log);
  INFO("png_decode.py: " << r.describe() << "\n" << out);
  REQUIRE(r.ok());
  return out;
}

json cell(const std::string& env, const std::string& variant, const std::string& version, const std::string& verdict,
          const std::string& expect = "pass") {
  return {{"name", "cell/" + env + "/" + variant + "/padded/float32-cpu/vs-cpu-fp64"},
          {"verdict", verdict},
          {"expect", expect},
          {"labels", json::array({"cell", env})},
          {"backend", "cpu"},
          {"precision", "fp64"},
          {"capture", {{"environment", {{"transformers", version}}}, {"wall_seconds", 1.5}}},
          {"summary", verdict}};
}

}  // namespace

TEST_CASE("CRC-32 and Adler-32 match their published check values") {
  const std::string check = "123456789", wiki = "Wikipedia";
  CHECK(png::crc32(reinterpret_cast<const uint8_t*>(check.data()), check.size()) == 0xCBF43926u);
  CHECK(png::adler32(reinterpret_cast<const uint8_t*>(wiki.data()), wiki.size()) == 0x11E60398u);
  // Incremental use gives the same value.
  const auto a = png::crc32(reinterpret_cast<const uint8_t*>(check.data()), 4);
  CHECK(png::crc32(reinterpret_cast<const uint8_t*>(check.data()) + 4, 5, a) == 0xCBF43926u);
}

TEST_CASE("zlib streams decompress with Python's zlib to the same bytes") {
  ScratchDir dir("zlib");
  std::mt19937 rng(7);
  std::vector<std::pair<std::string, std::vector<uint8_t>>> cases;
  cases.push_back({"empty", {}});
  cases.push_back({"one", {42}});
  std::vector<uint8_t> random(70000);
  for (auto& b : random) b = static_cast<uint8_t>(rng());
  cases.push_back({"random", random});
  std::vector<uint8_t> runs;  // runs of every length around the 258-byte match limit
  for (int len = 1; len < 600; len += 7) runs.insert(runs.end(), static_cast<size_t>(len), static_cast<uint8_t>(len));
  cases.push_back({"runs", runs});
  std::vector<uint8_t> rows;  // repeated 1000-byte rows (previous-row matches), past the 32 KiB window
  std::vector<uint8_t> row(1000);
  for (auto& b : row) b = static_cast<uint8_t>(rng() % 4);
  for (int i = 0; i < 60; ++i) rows.insert(rows.end(), row.begin(), row.end());
  cases.push_back({"rows", rows});
  for (const auto& [name, raw] : cases) {
    const auto comp = png::zlib_compress(raw, name == "rows" ? 1000 : 0);
    write_bytes(dir / (name + ".raw"), raw);
    write_bytes(dir / (name + ".z"), comp);
    INFO(name);
    python_decode({"zlib", (dir / (name + ".raw")).string(), (dir / (name + ".z")).string()}, dir / (name + ".log"));
    if (name == "rows") CHECK(comp.size() < raw.size() / 20);  // the repeated rows compress
  }
  // A corrupted stream must be caught by the decoder (the check above can fail).
  auto bad = png::zlib_compress(rows, 1000);
  bad.back() ^= 0xFF;  // Adler-32
  write_bytes(dir / "bad.z", bad);
  ProcessSpec spec;
  spec.argv = {"python3", (opensci::test::source_dir() / "tests/dashboard/png_decode.py").string(), "zlib",
               (dir / "rows.raw").string(), (dir / "bad.z").string()};
  spec.env = {{"PATH", "/usr/local/bin:/usr/bin:/bin"}};
  spec.stdout_path = spec.stderr_path = dir / "bad.log";
  CHECK(run_process(spec).exit_code == 1);
}

TEST_CASE("a PNG decodes to exactly the pixels drawn") {
  ScratchDir dir("png");
  png::IndexedImage img(37, 19, {{255, 255, 255}, {0, 0, 0}, {200, 10, 10}});
  img.fill_rect(2, 3, 30, 5, 2);
  img.text(1, 10, "1e-9 attn.0", 1);
  img.set(36, 18, 1);
  write_bytes(dir / "a.png", png::encode_png(img));
  python_decode({"image", (dir / "a.png").string(), (dir / "a.json").string()}, dir / "a.log");
  const auto d = json::parse(opensci::test::read_text(dir / "a.json"));
  CHECK(d["width"] == 37);
  CHECK(d["height"] == 19);
  CHECK(d["palette"] == json::array({{255, 255, 255}, {0, 0, 0}, {200, 10, 10}}));
  bool same = true;
  for (int y = 0; y < 19; ++y)
    for (int x = 0; x < 37; ++x) same = same && d["pixels"][y][x] == img.pixels[static_cast<size_t>(y * 37 + x)];
  CHECK(same);
  CHECK(d["pixels"][18][36] == 1);
  CHECK(d["pixels"][5][10] == 2);
  REQUIRE_ERROR_MENTIONS(png::IndexedImage(0, 3, std::vector<png::Rgb>(1)), "0x3");
}

TEST_CASE("a cell prints its measurements, and its plot when out of tolerance") {
  ScratchDir dir("measure");
  json r = cell("debian-sid", "opensci-ref-published+hotfix-no-rope", "5.12.1", "xfail", "xfail:H3");
  r["diagnosis"] = {{"hazard", "H3"}, {"findings", json::array()}};
  r["provenance"] = {{"versions", {{"transformers", "5.12.1"}, {"torch", "2.14.1+debian"}}}};
  r["comparison"] = {{"max_abs", 0.27},
                     {"logsoftmax_max_abs", 0.2},
                     {"rel_l2", 0.01},
                     {"cosine", 0.9999},
                     {"kl_mean", 1e-3},
                     {"kl_max", "inf"},
                     {"top1_agreement", 0.5},
                     {"within_tolerance", false},
                     {"first_divergent_layer", "attn.0"},
                     {"tolerance", {{"hidden_max_abs", 1e-4}}},
                     {"layers", json::array({{{"name", "hidden.embed"}, {"max_abs", 0.0}},
                                             {{"name", "attn.0"}, {"max_abs", 0.3}},
                                             {{"name", "mlp.0"}, {"max_abs", "inf"}}})}};
  const auto out = ctest_measurement_output(r, dir / "r.json");
  INFO(out);
  for (const auto* line :
       {R"(<CTestMeasurement type="text/string" name="verdict">xfail</CTestMeasurement>)",
        R"(<CTestMeasurement type="text/string" name="hazard">H3</CTestMeasurement>)",
        R"(<CTestMeasurement type="text/string" name="expect">xfail:H3</CTestMeasurement>)",
        R"(<CTestMeasurement type="numeric/double" name="max_abs_dlogit">0.27</CTestMeasurement>)",
        R"(<CTestMeasurement type="numeric/double" name="max_abs_dlog_softmax">0.2</CTestMeasurement>)",
        R"(<CTestMeasurement type="numeric/double" name="kl_max">inf</CTestMeasurement>)",
        R"(<CTestMeasurement type="numeric/double" name="top1_agreement">0.5</CTestMeasurement>)",
        R"(<CTestMeasurement type="text/string" name="first_divergent_layer">attn.0</CTestMeasurement>)",
        R"(<CTestMeasurement type="numeric/integer" name="first_divergent_layer_index">1</CTestMeasurement>)",
        R"(<CTestMeasurement type="numeric/double" name="capture_wall_seconds">1.5</CTestMeasurement>)",
        R"(<CTestMeasurement type="text/string" name="torch_version">2.14.1+debian</CTestMeasurement>)",
        R"(<CTestMeasurement type="text/string" name="transformers_version">5.12.1</CTestMeasurement>)"})
    CHECK(out.find(line) != std::string::npos);
  const auto png_path = layer_plot_path(dir / "r.json");
  CHECK(out.find(R"(<CTestMeasurementFile type="image/png" name="layer_divergence">)" + png_path.string() +
                 "</CTestMeasurementFile>") != std::string::npos);
  REQUIRE(fs::exists(png_path));
  python_decode({"image", png_path.string(), (dir / "plot.json").string()}, dir / "plot.log");
  const auto d = json::parse(opensci::test::read_text(dir / "plot.json"));
  CHECK(d["width"] == 640);
  // Bars: attn.0 (0.3, over tolerance: orange) is longer than hidden.embed (0: minimal).
  auto bar_length = [&](int row_index) {
    const int y = 28 + row_index * 12 + 4;
    int n = 0;
    for (const auto& p : d["pixels"][y]) n += p == 5 || p == 2;
    return n;
  };
  CHECK(bar_length(0) <= 2);
  CHECK(bar_length(1) > 300);
  CHECK(bar_length(2) > bar_length(1));  // inf: the full axis

  // Within tolerance: no image; markup in values is escaped.
  json ok = cell("e", "m", "5.12.1", "pass");
  ok["comparison"] = {{"max_abs", 1e-7}, {"within_tolerance", true}, {"layers", json::array()}};
  ok["summary"] = "a <b> & c";
  const auto ok_out = ctest_measurement_output(ok, dir / "ok.json");
  CHECK(ok_out.find("CTestMeasurementFile") == std::string::npos);
  CHECK_FALSE(fs::exists(layer_plot_path(dir / "ok.json")));
  const auto escaped = measurement_xml({"n<", "text/string", "a <b> & c"});
  CHECK(escaped == R"(<CTestMeasurement type="text/string" name="n&lt;">a &lt;b&gt; &amp; c</CTestMeasurement>)");
  // A capture that failed: no comparison values, but verdict and versions.
  const auto failed = cell_measurements({{"verdict", "fail"}, {"capture", {{"status", "crash"}}}});
  CHECK(std::none_of(failed.begin(), failed.end(), [](auto& m) { return m.name == "max_abs_dlogit"; }));
  CHECK(std::any_of(failed.begin(), failed.end(),
                    [](auto& m) { return m.name == "transformers_version" && m.value == "unknown"; }));
}

TEST_CASE("transformers versions sort in release order, not lexically") {
  std::vector<std::string> v = {"latest", "5.12.1", "4.57.6", "5.2.0", "main", "5.0.0", "4.48.0", "4.9.1"};
  std::sort(v.begin(), v.end(), version_less);
  CHECK(v == std::vector<std::string>{"4.9.1", "4.48.0", "4.57.6", "5.0.0", "5.2.0", "5.12.1", "latest", "main"});
  CHECK(version_less("5.2", "5.12"));
  CHECK_FALSE(version_less("5.12.1", "5.2.0"));
}

TEST_CASE("the grid: outcomes per model x patch set and version, the first change marked") {
  std::vector<json> results = {
      cell("tf-5.12", "opensci-ref", "5.12.1", "fail"),  // listed first: order comes from versions
      cell("tf-4.48", "opensci-ref", "4.48.0", "pass"),
      cell("tf-5.2", "opensci-ref", "5.2.0", "not-run"),
      cell("tf-5.0", "opensci-ref", "5.0.0", "pass"),
      cell("tf-4.48", "opensci-ref-published", "4.48.0", "xfail", "xfail:H1"),
      cell("tf-4.57", "opensci-ref-published", "4.57.6", "xfail", "xfail:H1"),
      cell("tf-5.0", "opensci-ref-published", "5.0.0", "xfail", "xfail:H2"),
      cell("tf-5.0", "opensci-ref-published+hotfix", "5.0.0", "xpass", "xfail:H3"),
      cell("golden-5.12.1", "opensci-ref-published+hotfix", "5.12.1", "pass"),
  };
  results.back()["labels"].push_back("golden");
  const auto g = build_grid(complete_results(results, nullptr, {}));
  CHECK(g.versions == std::vector<std::string>{"4.48.0", "4.57.6", "5.0.0", "5.2.0", "5.12.1"});
  REQUIRE(g.rows.size() == 3);
  CHECK(g.rows[0].variant == "opensci-ref");
  CHECK(g.rows[1].variant == "opensci-ref-published");
  CHECK(g.rows[2].variant == "opensci-ref-published+hotfix");
  const auto& ref = g.rows[0];
  CHECK(ref.squares[1].empty);  // no 4.57 cell for opensci-ref
  CHECK(ref.squares[3].outcome == Outcome::NotRun);
  CHECK(ref.squares[4].outcome == Outcome::Fail);
  REQUIRE(ref.change);
  CHECK(*ref.change == 4);  // not run at 5.2 is not a change; FAIL at 5.12 is
  CHECK(ref.squares[4].first_change);
  CHECK(ref.change_text == "5.0.0 → 5.12.1: pass → fail");
  const auto& pub = g.rows[1];
  CHECK(pub.squares[0].outcome == Outcome::XFail);
  CHECK(pub.squares[0].hazard == "H1");
  REQUIRE(pub.change);
  CHECK(*pub.change == 2);
  CHECK(pub.change_text == "4.57.6 → 5.0.0: xfail H1 → xfail H2");
  CHECK(g.rows[2].squares[2].outcome == Outcome::XPass);
  CHECK(g.rows[2].squares[4].replay_only);

  const auto plain = render_grid_terminal(g, {});
  INFO(plain);
  CHECK(plain.find("\x1b[") == std::string::npos);  // no colours unless asked (a TTY)
  CHECK(plain.find("▶FAIL") != std::string::npos);
  CHECK(plain.find("pass*") != std::string::npos);
  const auto header = plain.substr(0, plain.find('\n'));
  CHECK(header.find(" 4.48 ") < header.find(" 4.57 "));
  CHECK(header.find(" 4.57 ") < header.find(" 5.0 "));
  CHECK(header.find(" 5.0 ") < header.find(" 5.2 "));
  CHECK(header.find(" 5.2 ") < header.find(" 5.12 "));
  const auto coloured = render_grid_terminal(g, {true, "/tmp/r.html"});
  CHECK(coloured.find("\x1b[1;97;41m") != std::string::npos);
  CHECK(coloured.find("\x1b]8;;file:///tmp/r.html#cell-tf-5-12-opensci-ref-padded-float32-cpu-vs-cpu-fp64") !=
        std::string::npos);

  const auto md = render_markdown(complete_results(results, nullptr, {}));
  CHECK(md.find("[▶ 🟥 **FAIL**](#cell-tf-5-12-opensci-ref-padded-float32-cpu-vs-cpu-fp64)") != std::string::npos);
  CHECK(md.find("<a id=\"cell-tf-5-12-opensci-ref-padded-float32-cpu-vs-cpu-fp64\"></a>") != std::string::npos);
  CHECK(md.find("[🟪 H1]") != std::string::npos);
  const auto html = render_html(complete_results(results, nullptr, {}));
  CHECK(
      html.find(
          R"(<td class="fail change" title="tf-5.12/opensci-ref/padded/float32-cpu/vs-cpu-fp64: fail"><a href="#cell-tf-5-12-opensci-ref-padded-float32-cpu-vs-cpu-fp64">)") !=
      std::string::npos);
  CHECK(html.find(R"(<details id="cell-tf-5-12-opensci-ref-padded-float32-cpu-vs-cpu-fp64">)") != std::string::npos);
  // The grid leads the page.
  CHECK(html.find("class=\"grid\"") < html.find("<h2>Cells</h2>"));
}

TEST_CASE("the grid colours env-error environments and cells without results from the matrix") {
  ScratchDir dir("grid-matrix");
  fs::create_directories(dir / "matrix");
  for (const char* f : {"hazards.json", "tolerances.json"})  // the strict loader reads both
    fs::copy_file(opensci::test::source_dir() / "matrix" / f, dir / "matrix" / f);
  fs::copy_file(opensci::test::source_dir() / "fixtures/tokens/padded-batch.json", dir / "t.json");
  fs::copy_file(opensci::test::source_dir() / "toy_configs/opensci-ref.json", dir / "c.json");
  opensci::test::write_text(dir / "matrix/matrix.json", R"({"tokens": {"padded": "t.json"},
    "models": {"m": {"config": "c.json"}},
    "environments": {
      "tf-4.48": {"transformers": "4.48.0", "spec": {"provider": "uv", "transformers": "4.48.0"}},
      "tf-4.57": {"transformers": "4.57.6", "spec": {"provider": "uv", "transformers": "4.57.6"}},
      "tf-5.0": {"transformers": "5.0.0", "spec": {"provider": "uv", "transformers": "5.0.0"}},
      "uv-latest": {"transformers": "latest", "spec": {"provider": "uv", "transformers": "latest"}}},
    "cells": [{"environments": ["tf-4.48", "tf-4.57", "tf-5.0", "uv-latest"], "models": ["m"],
               "reference": [{"tolerance": "fp32-cpu"}], "capture": {"dtype": "float32", "device": "cpu"}}]})");
  const auto m = load_matrix(dir / "matrix/matrix.json");
  REQUIRE(m.cells.size() == 4);
  // Hand-written status files as `env provision --status-file` writes them.
  fs::create_directories(dir / "envs");
  opensci::test::write_text(dir / "envs/tf-4.57.json", R"({"status": "env-error", "reason": "resolver failed",
    "package": "tokenizers==0.20.3", "resolver_message": "no wheel for cp314", "declared_transformers": "4.57.6"})");
  opensci::test::write_text(dir / "envs/uv-latest.json", R"({"status": "ready", "declared_transformers": "latest",
    "transformers": "5.23.0"})");
  std::vector<json> results = {cell("tf-4.48", "m", "4.48.0", "pass")};
  results[0]["name"] = m.cells[0].name;
  const auto all = complete_results(results, &m, load_env_statuses(dir / "envs"));
  REQUIRE(all.size() == 4);
  const auto g = build_grid(all);
  CHECK(g.versions == std::vector<std::string>{"4.48.0", "4.57.6", "5.0.0", "latest"});
  CHECK(g.headers.back() == "latest (5.23.0)");
  REQUIRE(g.rows.size() == 1);
  CHECK(g.rows[0].squares[0].outcome == Outcome::Pass);
  CHECK(g.rows[0].squares[1].outcome == Outcome::EnvError);
  CHECK(g.rows[0].squares[2].outcome == Outcome::NotRun);  // no result file
  CHECK(g.rows[0].squares[3].outcome == Outcome::NotRun);
  CHECK_FALSE(g.rows[0].change);
  const auto env_error =
      std::find_if(all.begin(), all.end(), [](const json& r) { return r["verdict"] == "env-error"; });
  REQUIRE(env_error != all.end());
  CHECK((*env_error)["summary"] ==
        "environment tf-4.57 could not be installed: tokenizers==0.20.3: no wheel for cp314");
  const auto n = count_verdicts(all);
  CHECK(n.env_error == 1);
  CHECK(n.not_run == 2);
  CHECK(n.pass == 1);
  const auto text = render_table(all);
  CHECK(text.find("ENV") != std::string::npos);
  CHECK(text.find("latest = latest (5.23.0)") != std::string::npos);
}

TEST_CASE("history: each cell's error over the runs, the first verdict change marked") {
  ScratchDir dir("history");
  auto write_run = [&](const std::string& run, const std::vector<json>& cells) {
    fs::create_directories(dir / run / "results");
    for (const auto& c : cells) {
      auto flat = c["name"].get<std::string>();
      std::replace(flat.begin(), flat.end(), '/', '+');
      opensci::test::write_text(dir / run / "results" / (flat + ".json"), c.dump());
    }
    return dir / run / "results";
  };
  auto with_error = [](json c, double max_abs) {
    c["comparison"] = {{"max_abs", max_abs}, {"tolerance", {{"logits_max_abs", 1e-4}}}};
    return c;
  };
  const auto a = cell("e", "m", "5.12.1", "pass"), b = cell("e", "m+hotfix", "5.12.1", "pass");
  auto a_fail = a;
  a_fail["verdict"] = "fail";
  // (vectors built by push_back: a braced list of json would itself become one json array)
  std::vector<json> run1, run2, run3;
  run1.push_back(with_error(a, 1e-7));
  run2.push_back(with_error(a, 2e-7));
  run2.push_back(with_error(b, 1e-7));
  run3.push_back(with_error(a_fail, 0.3));
  run3.push_back(with_error(b, 1e-7));
  const std::vector<fs::path> dirs = {write_run("2026-11-20", run1), write_run("2026-11-21", run2),
                                      write_run("2026-11-22", run3)};
  const auto runs = load_history(dirs);
  REQUIRE(runs.size() == 3);
  CHECK(runs[0].label == "2026-11-20");
  CHECK(runs[2].label == "2026-11-22");
  const auto h = build_history(runs);  // sorted by cell name: "m+hotfix" before "m/"
  REQUIRE(h.size() == 2);
  CHECK(h[0].cell == b["name"]);
  const auto& ha = h[1];
  CHECK(ha.cell == a["name"]);
  REQUIRE(ha.change);
  CHECK(*ha.change == 2);
  CHECK(ha.change_text == "run 3 (2026-11-22): pass → fail");
  CHECK_FALSE(h[0].runs[0]);  // b was not in the first run
  CHECK_FALSE(h[0].change);
  const auto svg = history_svg(runs, ha);
  CHECK(svg.find("class=\"change\"") != std::string::npos);
  CHECK(svg.find("run 3 (2026-11-22): fail, max|Δlogit| 3.000e-01") != std::string::npos);
  CHECK(history_svg(runs, h[0]).find("class=\"change\"") == std::string::npos);
  const auto text = render_history_terminal(runs, h);
  CHECK(text.find("PPF") != std::string::npos);
  CHECK(text.find(" PP ") != std::string::npos);
  ReportHistory rh{runs, h};
  const auto html = render_html(complete_results(load_results(dirs.back()), nullptr, {}), &rh);
  CHECK(html.find("<h2>History</h2>") != std::string::npos);
  CHECK(html.find("<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"history\"") != std::string::npos);
}
