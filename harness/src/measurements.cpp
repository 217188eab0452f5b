#include "opensci/harness/measurements.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>

#include "opensci/harness/png.hpp"

namespace opensci::harness {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string str(const json& j, const char* key, const std::string& fallback = "") {
  return j.is_object() && j.contains(key) && j[key].is_string() ? j[key].get<std::string>() : fallback;
}

// A comparison value: a number, or the strings "inf" / "nan" to_json writes for non-finite ones.
double number(const json& j) {
  if (j.is_number()) return j.get<double>();
  if (j.is_string()) {
    const auto s = j.get<std::string>();
    if (s == "inf") return std::numeric_limits<double>::infinity();
    if (s == "-inf") return -std::numeric_limits<double>::infinity();
  }
  return std::numeric_limits<double>::quiet_NaN();
}

std::string format_double(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  return fmt::format("{:.9g}", v);
}

std::string xml_escape(const std::string& s) {
  std::string out;
  for (char ch : s) {
    switch (ch) {
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '&':
        out += "&amp;";
        break;
      case '"':
        out += "&quot;";
        break;
      default:
        out += ch;
    }
  }
  return out;
}

// The versions the capture really ran with: provenance first, then the capture's environment probe.
std::string resolved_version(const json& result, const char* package) {
  if (result.contains("provenance")) {
    const auto& p = result["provenance"];
    if (p.is_object() && p.contains("versions")) {
      const auto v = str(p["versions"], package);
      if (!v.empty()) return v;
    }
  }
  if (result.contains("capture") && result["capture"].is_object() && result["capture"].contains("environment")) {
    const auto v = str(result["capture"]["environment"], package);
    if (!v.empty()) return v;
  }
  return "unknown";
}

}  // namespace

std::vector<Measurement> cell_measurements(const json& result) {
  std::vector<Measurement> m;
  auto text = [&](const char* name, const std::string& v) { m.push_back({name, "text/string", v}); };
  auto dbl = [&](const char* name, double v) { m.push_back({name, "numeric/double", format_double(v)}); };
  text("verdict", str(result, "verdict", "unknown"));
  text("expect", str(result, "expect", "pass"));
  std::string hazard = "none";
  if (result.contains("diagnosis") && result["diagnosis"].is_object())
    hazard = str(result["diagnosis"], "hazard", "none");
  text("hazard", hazard);
  if (result.contains("comparison") && result["comparison"].is_object()) {
    const auto& c = result["comparison"];
    dbl("max_abs_dlogit", number(c.value("max_abs", json())));
    dbl("max_abs_dlog_softmax", number(c.value("logsoftmax_max_abs", json())));
    dbl("rel_l2", number(c.value("rel_l2", json())));
    dbl("cosine", number(c.value("cosine", json())));
    dbl("kl_mean", number(c.value("kl_mean", json())));
    dbl("kl_max", number(c.value("kl_max", json())));
    dbl("top1_agreement", number(c.value("top1_agreement", json())));
    const auto layer = str(c, "first_divergent_layer", "none");
    text("first_divergent_layer", layer);
    int64_t index = -1;
    if (c.contains("layers") && c["layers"].is_array())
      for (size_t i = 0; i < c["layers"].size(); ++i)
        if (str(c["layers"][i], "name") == layer) index = static_cast<int64_t>(i);
    m.push_back({"first_divergent_layer_index", "numeric/integer", std::to_string(index)});
  }
  if (result.contains("capture") && result["capture"].is_object() && result["capture"].contains("wall_seconds"))
    dbl("capture_wall_seconds", number(result["capture"]["wall_seconds"]));
  text("transformers_version", resolved_version(result, "transformers"));
  text("torch_version", resolved_version(result, "torch"));
  return m;
}

std::string measurement_xml(const Measurement& m) {
  return fmt::format(R"(<CTestMeasurement type="{}" name="{}">{}</CTestMeasurement>)", xml_escape(m.type),
                     xml_escape(m.name), xml_escape(m.value));
}

std::vector<uint8_t> layer_plot_png(const json& comparison, const std::string& title) {
  if (!comparison.contains("layers") || !comparison["layers"].is_array() || comparison["layers"].empty()) return {};
  const auto& layers = comparison["layers"];
  enum : uint8_t { kWhite, kInk, kBar, kRed, kGrid, kOver };
  const std::vector<png::Rgb> palette = {{255, 255, 255}, {40, 40, 40},    {74, 126, 187},
                                         {204, 0, 0},     {221, 221, 221}, {224, 128, 32}};
  const double lo = -9, hi = 2;  // log10 axis range
  const double tol = comparison.contains("tolerance") ? comparison["tolerance"].value("hidden_max_abs", 1e-4) : 1e-4;
  const auto first = str(comparison, "first_divergent_layer");
  size_t label_chars = 4;
  for (const auto& l : layers) label_chars = std::max(label_chars, str(l, "name").size() + 2);
  const int width = 640, row = 12, bar = 9, top = 28;
  const int x0 = static_cast<int>(std::min<size_t>(label_chars, 24)) * png::kGlyphAdvance + 6, x1 = width - 12;
  const int height = top + static_cast<int>(layers.size()) * row + 22;
  auto x_of = [&](double v) {
    const double l = std::isnan(v) || v >= INFINITY ? hi : (v > 0 ? std::clamp(std::log10(v), lo, hi) : lo);
    return x0 + static_cast<int>(std::lround((l - lo) / (hi - lo) * (x1 - x0)));
  };
  png::IndexedImage img(width, height, palette, kWhite);
  const size_t max_title = static_cast<size_t>((width - 8) / png::kGlyphAdvance);
  img.text(4, 3, title.size() > max_title ? title.substr(0, max_title - 2) + ".." : title, kInk);
  img.text(4, 14, fmt::format("per-layer max|d| vs reference, log10; red: tolerance {:.0e}", tol), kInk);
  const int plot_bottom = top + static_cast<int>(layers.size()) * row;
  for (int e = static_cast<int>(lo); e <= static_cast<int>(hi); ++e)
    img.fill_rect(x_of(std::pow(10.0, e)), top - 2, 1, plot_bottom - top + 4, kGrid);
  int y = top;
  for (const auto& l : layers) {
    const double v = number(l.value("max_abs", json()));
    const auto name = str(l, "name");
    img.text(2, y + 1, (name == first ? "> " : "  ") + name, name == first ? kRed : kInk);
    const bool over = !(v <= tol);
    img.fill_rect(x0, y, std::max(1, x_of(v) - x0), bar, over ? kOver : kBar);
    y += row;
  }
  const int tx = x_of(tol);
  for (int yy = top - 4; yy < plot_bottom + 2; yy += 4) img.fill_rect(tx, yy, 2, 3, kRed);
  for (int e = static_cast<int>(lo); e <= static_cast<int>(hi); e += 2) {
    const auto label = fmt::format("1e{}", e);
    img.text(x_of(std::pow(10.0, e)) - static_cast<int>(label.size()) * png::kGlyphAdvance / 2, plot_bottom + 8, label,
             kInk);
  }
  return png::encode_png(img);
}

fs::path layer_plot_path(const fs::path& result_file) { return fs::path(result_file.string() + ".layers.png"); }

std::string ctest_measurement_output(const json& result, const fs::path& result_file) {
  std::string out;
  for (const auto& m : cell_measurements(result)) out += measurement_xml(m) + "\n";
  const bool out_of_tolerance = result.contains("comparison") && result["comparison"].is_object() &&
                                !result["comparison"].value("within_tolerance", true);
  if (out_of_tolerance) {
    const auto bytes = layer_plot_png(result["comparison"], str(result, "name"));
    if (!bytes.empty()) {
      const auto path = layer_plot_path(result_file);
      std::ofstream f(path, std::ios::binary | std::ios::trunc);
      f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
      f.close();
      if (f)
        out +=
            fmt::format(R"(<CTestMeasurementFile type="image/png" name="layer_divergence">{}</CTestMeasurementFile>)",
                        xml_escape(path.string())) +
            "\n";
      else
        out += measurement_xml({"layer_divergence", "text/string", "could not write " + path.string()}) + "\n";
    }
  }
  return out;
}

void print_ctest_measurements(const json& result, const fs::path& result_file) {
  fmt::print("{}", ctest_measurement_output(result, result_file));
  std::fflush(stdout);
}

}  // namespace opensci::harness
