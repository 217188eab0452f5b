// What a finished cell reports to CTest, and through it to CDash: named measurements printed in
// the test's output (`<CTestMeasurement type=".." name="..">value</CTestMeasurement>`, which
// ctest moves into Test.xml as <NamedMeasurement>), and, for a cell whose comparison is out of
// tolerance, its per-layer divergence plot as a PNG image measurement.
//
// The names are stable (dashboards plot them across nights); README.md "Dashboards" lists them:
//   verdict, expect, hazard, max_abs_dlogit, max_abs_dlog_softmax, rel_l2, cosine, kl_mean, kl_max,
//   top1_agreement, first_divergent_layer, first_divergent_layer_index, capture_wall_seconds,
//   transformers_version, torch_version, layer_divergence (image/png)
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace opensci::harness {

struct Measurement {
  std::string name;
  std::string type;  // numeric/double | numeric/integer | text/string
  std::string value;
};

// The measurements of a cell result (the JSON `opensci-compat cell` writes). Comparison values
// are present only when a comparison ran; non-finite values are written as inf / nan.
std::vector<Measurement> cell_measurements(const nlohmann::json& result);

// One <CTestMeasurement> element, the value XML-escaped.
std::string measurement_xml(const Measurement& m);

// Per-layer max|Δ| as a PNG bar chart (log10 axis 1e-9 .. 1e2, the hidden-state tolerance as a
// red line, layers above it in orange). Empty when the comparison has no per-layer tensors.
std::vector<uint8_t> layer_plot_png(const nlohmann::json& comparison, const std::string& title);

// Where a cell's plot goes: next to its result file, "<result>.layers.png".
std::filesystem::path layer_plot_path(const std::filesystem::path& result_file);

// Everything a cell prints for CTest: the measurements and, when the comparison is out of
// tolerance, the plot written to layer_plot_path() and named by a <CTestMeasurementFile>.
std::string ctest_measurement_output(const nlohmann::json& result, const std::filesystem::path& result_file);
void print_ctest_measurements(const nlohmann::json& result, const std::filesystem::path& result_file);

}  // namespace opensci::harness
