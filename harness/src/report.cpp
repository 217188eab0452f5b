#include "opensci/harness/report.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <fstream>

namespace opensci::harness {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

struct Row {
  std::string cell, version, reference, expect, verdict, max_abs, top1, diagnosis;
};

std::string str(const json& j, const char* key, const std::string& fallback = "") {
  return j.contains(key) && j[key].is_string() ? j[key].get<std::string>() : fallback;
}

Row row_of(const json& r) {
  Row row;
  row.cell = str(r, "name");
  if (row.cell.starts_with("cell/")) row.cell = row.cell.substr(5);
  const auto env = r.contains("capture") ? r["capture"].value("environment", json::object()) : json::object();
  row.version = env.is_object() && env.contains("transformers") && env["transformers"].is_string()
                    ? env["transformers"].get<std::string>()
                    : "-";
  row.reference = fmt::format("{} {}", str(r, "backend"), str(r, "precision"));
  row.expect = str(r, "expect", "pass");
  row.verdict = str(r, "verdict", "?");
  if (r.contains("comparison")) {
    const auto& c = r["comparison"];
    row.max_abs = c["max_abs"].is_number() ? fmt::format("{:.2e}", c["max_abs"].get<double>()) : str(c, "max_abs");
    row.top1 = fmt::format("{:.3f}", c.value("top1_agreement", 0.0));
  } else {
    row.max_abs = row.top1 = "-";
  }
  if (row.verdict == "pass") {
    // A passing cell's findings are latent (e.g. a garbage inv_freq buffer the code never reads).
    row.diagnosis = str(r, "summary");
    if (r.contains("diagnosis") && r["diagnosis"].contains("hazard") && r["diagnosis"]["hazard"].is_string())
      row.diagnosis += " (latent " + r["diagnosis"]["hazard"].get<std::string>() + ": output unaffected)";
  } else if (r.contains("diagnosis") && r["diagnosis"].contains("findings") && !r["diagnosis"]["findings"].empty()) {
    const auto& f = r["diagnosis"]["findings"][0];
    const auto hazard = str(f, "hazard");
    row.diagnosis = (hazard.empty() ? "" : hazard + ": ") + str(f, "title");
  } else {
    row.diagnosis = str(r, "summary");
  }
  return row;
}

std::string html_escape(const std::string& s) {
  std::string out;
  for (char ch : s) {
    switch (ch) {
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '&': out += "&amp;"; break;
      case '"': out += "&quot;"; break;
      default: out += ch;
    }
  }
  return out;
}

// Per-layer max|Δ| as bars on a log10 axis from 1e-9 to 1e2, the tolerance as a red line.
std::string layer_plot_svg(const json& comparison) {
  if (!comparison.contains("layers") || comparison["layers"].empty()) return "";
  const auto& layers = comparison["layers"];
  const double lo = -9, hi = 2;
  const int bar = 14, width = 560, label_w = 130;
  const int height = static_cast<int>(layers.size()) * (bar + 3) + 24;
  auto x_of = [&](double v) {
    const double l = v > 0 && std::isfinite(v) ? std::clamp(std::log10(v), lo, hi) : (v > 0 ? hi : lo);
    return label_w + (l - lo) / (hi - lo) * (width - label_w - 10);
  };
  std::string svg = fmt::format(R"(<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-size="10">)", width, height);
  int y = 4;
  for (const auto& l : layers) {
    const double v = l["max_abs"].is_number() ? l["max_abs"].get<double>() : INFINITY;
    svg += fmt::format(R"(<text x="0" y="{}">{}</text><rect x="{}" y="{}" width="{:.1f}" height="{}" fill="#4a7ebb"><title>{:.3e}</title></rect>)",
                       y + bar - 3, html_escape(str(l, "name")), label_w, y, std::max(1.0, x_of(v) - label_w), bar, v);
    y += bar + 3;
  }
  if (comparison.contains("tolerance")) {
    const double t = comparison["tolerance"].value("hidden_max_abs", 1e-4);
    svg += fmt::format(R"(<line x1="{0:.1f}" x2="{0:.1f}" y1="0" y2="{1}" stroke="#c00" stroke-dasharray="3,2"/>)", x_of(t), y);
  }
  for (int e = -9; e <= 2; e += 2)
    svg += fmt::format(R"(<text x="{:.1f}" y="{}" fill="#666">1e{}</text>)", x_of(std::pow(10.0, e)) - 8, height - 4, e);
  return svg + "</svg>";
}

}  // namespace

std::vector<json> load_results(const fs::path& dir) {
  std::vector<json> out;
  if (!fs::is_directory(dir)) return out;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() != ".json") continue;
    std::ifstream in(e.path());
    try {
      out.push_back(json::parse(in));
    } catch (const json::exception&) {
      out.push_back({{"name", e.path().filename().string()}, {"verdict", "fail"}, {"summary", "unreadable result file"}});
    }
  }
  std::sort(out.begin(), out.end(), [](const json& a, const json& b) { return str(a, "name") < str(b, "name"); });
  return out;
}

ReportCounts count_verdicts(const std::vector<json>& results) {
  ReportCounts c;
  for (const auto& r : results) {
    const auto v = str(r, "verdict");
    if (v == "pass") ++c.pass;
    else if (v == "xfail") ++c.xfail;
    else if (v == "xpass") ++c.xpass;
    else if (v == "not-run") ++c.not_run;
    else ++c.fail;
  }
  return c;
}

std::string render_table(const std::vector<json>& results) {
  std::vector<Row> rows;
  for (const auto& r : results) rows.push_back(row_of(r));
  std::vector<std::string> head{"cell", "transformers", "reference", "expect", "verdict", "max|Δlogit|", "top-1", "diagnosis"};
  std::vector<size_t> w(head.size());
  for (size_t i = 0; i < head.size(); ++i) w[i] = head[i].size();
  auto cols = [](const Row& r) {
    return std::vector<std::string>{r.cell, r.version, r.reference, r.expect, r.verdict, r.max_abs, r.top1, r.diagnosis};
  };
  for (const auto& r : rows) {
    const auto c = cols(r);
    for (size_t i = 0; i + 1 < c.size(); ++i) w[i] = std::max(w[i], c[i].size());
  }
  auto line = [&](const std::vector<std::string>& c) {
    std::string s;
    for (size_t i = 0; i < c.size(); ++i) s += fmt::format("{:<{}}  ", c[i], i + 1 < c.size() ? w[i] : 0);
    while (!s.empty() && s.back() == ' ') s.pop_back();
    return s + "\n";
  };
  std::string out = line(head);
  for (const auto& r : rows) out += line(cols(r));
  const auto n = count_verdicts(results);
  out += fmt::format("\n{} cells: {} pass, {} expected failures, {} FAIL, {} unexpected pass, {} not run\n", results.size(),
                     n.pass, n.xfail, n.fail, n.xpass, n.not_run);
  return out;
}

std::string render_markdown(const std::vector<json>& results) {
  std::string out = "# opensci-compat matrix\n\n| cell | transformers | reference | expect | verdict | max\\|Δlogit\\| | top-1 | diagnosis |\n|---|---|---|---|---|---|---|---|\n";
  auto cell = [](const std::string& s) {  // a '|' inside a cell would split the Markdown table
    std::string escaped;
    for (char ch : s) {
      if (ch == '|') escaped.push_back('\\');
      escaped.push_back(ch);
    }
    return escaped;
  };
  for (const auto& r : results) {
    const auto row = row_of(r);
    out += fmt::format("| `{}` | {} | {} | {} | **{}** | {} | {} | {} |\n", row.cell, row.version, row.reference, row.expect,
                       row.verdict, row.max_abs, row.top1, cell(row.diagnosis));
  }
  const auto n = count_verdicts(results);
  out += fmt::format("\n{} cells: {} pass, {} expected failures, {} fail, {} unexpected pass, {} not run.\n", results.size(),
                     n.pass, n.xfail, n.fail, n.xpass, n.not_run);
  return out;
}

std::string render_html(const std::vector<json>& results) {
  std::string out = R"(<!doctype html><html><head><meta charset="utf-8"><title>opensci-compat matrix</title><style>
body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}
.pass{background:#d8f0d8}.xfail{background:#e8e8f8}.fail,.xpass{background:#f8d0d0}.not-run{background:#eee}
details{margin:0.6em 0}pre{background:#f6f6f6;padding:6px;white-space:pre-wrap}</style></head><body>
<h1>opensci-compat matrix</h1><table><tr><th>cell</th><th>transformers</th><th>reference</th><th>expect</th><th>verdict</th><th>max|&Delta;logit|</th><th>top-1</th><th>diagnosis</th></tr>
)";
  for (const auto& r : results) {
    const auto row = row_of(r);
    out += fmt::format(R"(<tr class="{}"><td><a href="#{}">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>)",
                       html_escape(row.verdict), html_escape(row.cell), html_escape(row.cell), html_escape(row.version),
                       html_escape(row.reference), html_escape(row.expect), html_escape(row.verdict), row.max_abs, row.top1,
                       html_escape(row.diagnosis));
    out += "\n";
  }
  out += "</table>\n";
  for (const auto& r : results) {
    const auto row = row_of(r);
    out += fmt::format(R"(<details id="{}"><summary>{} — {}</summary><p>{}</p>)", html_escape(row.cell), html_escape(row.cell),
                       html_escape(row.verdict), html_escape(str(r, "summary")));
    if (r.contains("diagnosis") && r["diagnosis"].contains("findings"))
      for (const auto& f : r["diagnosis"]["findings"])
        out += fmt::format("<p><b>{}</b> {}: {}</p>", html_escape(str(f, "hazard")), html_escape(str(f, "title")),
                           html_escape(str(f, "evidence")));
    if (r.contains("comparison")) out += "<p>per-layer max|&Delta;| (log scale; red: tolerance)</p>" + layer_plot_svg(r["comparison"]);
    if (r.contains("capture") && r["capture"].contains("stderr_tail") && r["capture"]["stderr_tail"].is_string() &&
        !r["capture"]["stderr_tail"].get<std::string>().empty())
      out += "<pre>" + html_escape(r["capture"]["stderr_tail"].get<std::string>()) + "</pre>";
    out += "</details>\n";
  }
  return out + "</body></html>\n";
}

}  // namespace opensci::harness
