#include "opensci/harness/report.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

#include "opensci/harness/matrix.hpp"

namespace opensci::harness {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string str(const json& j, const char* key, const std::string& fallback = "") {
  return j.is_object() && j.contains(key) && j[key].is_string() ? j[key].get<std::string>() : fallback;
}

std::string short_name(const std::string& cell) { return cell.starts_with("cell/") ? cell.substr(5) : cell; }

// HTML id / Markdown anchor of a cell's detail: letters, digits and '-' only.
std::string anchor_of(const std::string& cell) {
  std::string id = "cell-";
  for (char ch : short_name(cell)) id += std::isalnum(static_cast<unsigned char>(ch)) ? ch : '-';
  return id;
}

std::string html_escape(const std::string& s) {
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

std::string md_cell(const std::string& s) {  // a '|' inside a cell would split the Markdown table
  std::string escaped;
  for (char ch : s) {
    if (ch == '|') escaped.push_back('\\');
    escaped.push_back(ch);
  }
  return escaped;
}

// A comparison value: a number, or the strings "inf" / "nan" to_json writes for non-finite ones.
std::optional<double> number(const json& j) {
  if (j.is_number()) return j.get<double>();
  if (j.is_string()) {
    const auto s = j.get<std::string>();
    if (s == "inf") return INFINITY;
    if (s == "nan" || s == "-nan") return NAN;
  }
  return std::nullopt;
}

std::string expected_hazard(const json& r) {
  const auto e = str(r, "expect");
  return e.starts_with("xfail:") ? e.substr(6) : "";
}

// ------------------------------------------------------------------------------------------
// The cell table (one row per cell)
// ------------------------------------------------------------------------------------------
struct Row {
  std::string cell, version, reference, expect, verdict, max_abs, top1, diagnosis;
};

Row row_of(const json& r) {
  Row row;
  row.cell = short_name(str(r, "name"));
  const auto env = r.contains("capture") ? r["capture"].value("environment", json::object()) : json::object();
  row.version = str(env, "transformers", "-");
  if (row.version == "-" && r.contains("report")) row.version = str(r["report"], "version", "-");
  row.reference = r.contains("backend") ? fmt::format("{} {}", str(r, "backend"), str(r, "precision")) : "-";
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

// Per-layer max|Δ| as bars on a log10 axis from 1e-9 to 1e2, the tolerance as a red line.
std::string layer_plot_svg(const json& comparison) {
  if (!comparison.contains("layers") || comparison["layers"].empty()) return "";
  const auto& layers = comparison["layers"];
  const double lo = -9, hi = 2;
  const int bar = 14, width = 560, label_w = 130;
  const int height = static_cast<int>(layers.size()) * (bar + 3) + 24;
  auto x_of = [&](double v) {
    const double l = v > 0 && std::isfinite(v) ? std::clamp(std::log10(v), lo, hi) : (v > 0 || std::isnan(v) ? hi : lo);
    return label_w + (l - lo) / (hi - lo) * (width - label_w - 10);
  };
  std::string svg =
      fmt::format(R"(<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-size="10">)", width, height);
  int y = 4;
  for (const auto& l : layers) {
    const double v = number(l.value("max_abs", json())).value_or(NAN);
    svg += fmt::format(
        R"(<text x="0" y="{}">{}</text><rect x="{}" y="{}" width="{:.1f}" height="{}" fill="#4a7ebb"><title>{:.3e}</title></rect>)",
        y + bar - 3, html_escape(str(l, "name")), label_w, y, std::max(1.0, x_of(v) - label_w), bar, v);
    y += bar + 3;
  }
  if (comparison.contains("tolerance")) {
    const double t = comparison["tolerance"].value("hidden_max_abs", 1e-4);
    svg += fmt::format(R"(<line x1="{0:.1f}" x2="{0:.1f}" y1="0" y2="{1}" stroke="#c00" stroke-dasharray="3,2"/>)",
                       x_of(t), y);
  }
  for (int e = -9; e <= 2; e += 2)
    svg +=
        fmt::format(R"(<text x="{:.1f}" y="{}" fill="#666">1e{}</text>)", x_of(std::pow(10.0, e)) - 8, height - 4, e);
  return svg + "</svg>";
}

// ------------------------------------------------------------------------------------------
// Grid
// ------------------------------------------------------------------------------------------
int severity(Outcome o) {  // the worst cell of a square decides its colour
  switch (o) {
    case Outcome::Fail:
      return 6;
    case Outcome::XPass:
      return 5;
    case Outcome::EnvError:
      return 4;
    case Outcome::XFail:
      return 3;
    case Outcome::Pass:
      return 2;
    case Outcome::NotRun:
      return 1;
  }
  return 0;
}

Outcome outcome_of(const std::string& verdict) {
  if (verdict == "pass") return Outcome::Pass;
  if (verdict == "xfail") return Outcome::XFail;
  if (verdict == "xpass") return Outcome::XPass;
  if (verdict == "env-error") return Outcome::EnvError;
  if (verdict == "not-run") return Outcome::NotRun;
  return Outcome::Fail;  // "fail" and anything unreadable
}

bool decides_colour(Outcome o) { return o != Outcome::NotRun && o != Outcome::EnvError; }

std::string outcome_words(const GridSquare& s) {
  return s.outcome == Outcome::XFail ? "xfail " + s.hazard : outcome_name(s.outcome);
}

// What identifies a cell's place in the grid, from the report tag complete_results() adds, else
// from its name (cell/<env>/<variant>/...) and capture.
struct Place {
  std::string env, variant, version;
};
Place place_of(const json& r) {
  Place p;
  const auto name = short_name(str(r, "name"));
  const auto slash = name.find('/');
  p.env = name.substr(0, slash);
  if (slash != std::string::npos) p.variant = name.substr(slash + 1, name.find('/', slash + 1) - slash - 1);
  if (r.contains("report")) {
    p.env = str(r["report"], "env", p.env);
    p.variant = str(r["report"], "variant", p.variant);
    p.version = str(r["report"], "version");
  }
  if (p.version.empty()) p.version = str(r, "declared_transformers");  // what the matrix declared for the cell
  if (p.version.empty() && r.contains("capture") && r["capture"].is_object())
    p.version = str(r["capture"].value("environment", json::object()), "transformers");
  if (p.version.empty() && r.contains("labels") && r["labels"].is_array())
    for (const auto& l : r["labels"]) {  // "v5.12" -> "5.12"
      const auto s = l.is_string() ? l.get<std::string>() : "";
      if (std::regex_match(s, std::regex(R"(v\d+\.\d+)"))) p.version = s.substr(1);
    }
  if (p.version.empty()) p.version = p.env;
  return p;
}

bool is_replay(const json& r) {
  if (r.contains("capture") && r["capture"].is_object() && r["capture"].contains("golden")) return true;
  if (r.contains("labels") && r["labels"].is_array())
    for (const auto& l : r["labels"])
      if (l == "golden") return true;
  return false;
}

// A variant's sort key: its model, unpatched first, then the patch sets by name.
std::tuple<std::string, int, std::string> variant_key(const std::string& v) {
  const auto plus = v.find('+');
  if (plus == std::string::npos) return {v, 0, ""};
  return {v.substr(0, plus), 1, v.substr(plus + 1)};
}

std::vector<long> numeric_parts(const std::string& v) {
  static const std::regex numeric(R"((\d+)(\.\d+)*)");
  if (!std::regex_match(v, numeric)) return {};
  std::vector<long> parts;
  std::stringstream ss(v);
  for (std::string p; std::getline(ss, p, '.');) parts.push_back(std::stol(p));
  return parts;
}

// Terminal header: "5.12" when the minor is unique among the columns, else the full version.
std::vector<std::string> short_headers(const Grid& g) {
  std::map<std::string, int> minors;
  auto minor = [](const std::string& v) {
    const auto parts = numeric_parts(v);
    return parts.size() >= 2 ? fmt::format("{}.{}", parts[0], parts[1]) : v;
  };
  for (const auto& v : g.versions) ++minors[minor(v)];
  std::vector<std::string> out;
  for (const auto& v : g.versions) out.push_back(minors[minor(v)] == 1 ? minor(v) : v);
  return out;
}

std::string square_text(const GridSquare& s) {
  if (s.empty) return "";
  std::string t;
  switch (s.outcome) {
    case Outcome::Pass:
      t = "pass";
      break;
    case Outcome::XFail:
      t = s.hazard.empty() ? "xfail" : s.hazard;
      break;
    case Outcome::Fail:
      t = "FAIL";
      break;
    case Outcome::XPass:
      t = "XPASS";
      break;
    case Outcome::EnvError:
      t = "ENV";
      break;
    case Outcome::NotRun:
      t = "-";
      break;
  }
  if (s.replay_only && s.outcome != Outcome::NotRun && s.outcome != Outcome::EnvError) t += "*";
  return t;
}

const char* ansi_of(Outcome o) {
  switch (o) {
    case Outcome::Pass:
      return "\x1b[30;42m";
    case Outcome::XFail:
      return "\x1b[30;45m";
    case Outcome::Fail:
      return "\x1b[1;97;41m";
    case Outcome::XPass:
      return "\x1b[30;43m";
    case Outcome::EnvError:
      return "\x1b[97;100m";
    case Outcome::NotRun:
      return "\x1b[2m";
  }
  return "";
}

const char* emoji_of(Outcome o) {
  switch (o) {
    case Outcome::Pass:
      return "🟩";
    case Outcome::XFail:
      return "🟪";
    case Outcome::Fail:
      return "🟥";
    case Outcome::XPass:
      return "🟧";
    case Outcome::EnvError:
      return "⬛";
    case Outcome::NotRun:
      return "⬜";
  }
  return "";
}

size_t display_width(const std::string& s) {  // UTF-8 code points (the grid's glyphs are one column)
  size_t n = 0;
  for (unsigned char ch : s) n += (ch & 0xC0) != 0x80;
  return n;
}

std::string pad(const std::string& s, size_t width) {
  const size_t w = display_width(s);
  return w >= width ? s : s + std::string(width - w, ' ');
}

const char* kGridLegendText =
    "pass | H<n>: expected failure with that hazard | FAIL | XPASS: unexpected pass | ENV: environment could not be "
    "installed | -: not run | *: golden replay only | ▶: first release where the row's outcome changes\n";

// ------------------------------------------------------------------------------------------
// History
// ------------------------------------------------------------------------------------------
std::string history_glyph(const std::optional<json>& r) {
  if (!r) return " ";
  const auto v = str(*r, "verdict");
  if (v == "pass") return "P";
  if (v == "xfail") return "x";
  if (v == "xpass") return "X";
  if (v == "not-run") return "-";
  if (v == "env-error") return "E";
  return "F";
}

std::optional<double> max_abs_of(const json& r) {
  if (!r.contains("comparison") || !r["comparison"].is_object()) return std::nullopt;
  return number(r["comparison"].value("max_abs", json()));
}

}  // namespace

const char* outcome_name(Outcome o) {
  switch (o) {
    case Outcome::Pass:
      return "pass";
    case Outcome::XFail:
      return "xfail";
    case Outcome::Fail:
      return "fail";
    case Outcome::XPass:
      return "xpass";
    case Outcome::EnvError:
      return "env-error";
    case Outcome::NotRun:
      return "not-run";
  }
  return "?";
}

std::vector<json> load_results(const fs::path& dir) {
  std::vector<json> out;
  if (!fs::is_directory(dir)) return out;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() != ".json") continue;
    std::ifstream in(e.path());
    try {
      out.push_back(json::parse(in));
    } catch (const json::exception&) {
      out.push_back(
          {{"name", e.path().filename().string()}, {"verdict", "fail"}, {"summary", "unreadable result file"}});
    }
  }
  std::sort(out.begin(), out.end(), [](const json& a, const json& b) { return str(a, "name") < str(b, "name"); });
  return out;
}

std::map<std::string, json> load_env_statuses(const fs::path& dir) {
  std::map<std::string, json> out;
  if (!fs::is_directory(dir)) return out;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() != ".json") continue;
    std::ifstream in(e.path());
    try {
      out[e.path().stem().string()] = json::parse(in);
    } catch (const json::exception&) {
      out[e.path().stem().string()] = {{"status", "env-error"},
                                       {"reason", "unreadable status file " + e.path().string()}};
    }
  }
  return out;
}

std::vector<json> complete_results(std::vector<json> results, const Matrix* matrix,
                                   const std::map<std::string, json>& env_statuses) {
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < results.size(); ++i) index[str(results[i], "name")] = i;
  if (matrix != nullptr) {
    for (const auto& c : matrix->cells) {
      const json tag = {{"env", c.env->name}, {"variant", c.variant}, {"version", c.env->transformers}};
      auto it = index.find(c.name);
      if (it != index.end()) {
        results[it->second]["report"] = tag;
        continue;
      }
      index[c.name] = results.size();
      results.push_back({{"name", c.name},
                         {"labels", c.labels},
                         {"expect", c.expect},
                         {"backend", c.reference.backend},
                         {"precision", c.reference.precision},
                         {"verdict", "not-run"},
                         {"summary",
                          "no result file: the cell did not run (its environment, capture or toy fixture "
                          "did not run or failed; see the ctest log)"},
                         {"report", tag},
                         {"synthesized", true}});
    }
  }
  for (auto& r : results) {
    auto p = place_of(r);
    auto st = env_statuses.find(p.env);
    if (st == env_statuses.end()) continue;
    const auto& s = st->second;
    if (!r.contains("report")) r["report"] = {{"env", p.env}, {"variant", p.variant}, {"version", p.version}};
    const auto declared = str(s, "declared_transformers");
    if (!declared.empty() && !matrix) r["report"]["version"] = declared;
    if (!str(s, "transformers").empty()) r["report"]["resolved"] = str(s, "transformers");
    const auto status = str(s, "status");
    const auto verdict = str(r, "verdict");
    if (status == "env-error" && (verdict == "not-run" || verdict.empty())) {
      r["original_verdict"] = verdict;
      r["verdict"] = "env-error";
      std::string why = fmt::format("environment {} could not be installed", p.env);
      if (!str(s, "package").empty()) why += ": " + str(s, "package");
      if (!str(s, "resolver_message").empty())
        why += ": " + str(s, "resolver_message");
      else if (!str(s, "reason").empty())
        why += ": " + str(s, "reason");
      r["summary"] = why;
    } else if (status == "unavailable" && verdict == "not-run" && r.value("synthesized", false)) {
      r["summary"] = fmt::format("environment {} is unavailable here: {}", p.env, str(s, "reason"));
    }
  }
  std::sort(results.begin(), results.end(),
            [](const json& a, const json& b) { return str(a, "name") < str(b, "name"); });
  return results;
}

bool version_less(const std::string& a, const std::string& b) {
  const auto na = numeric_parts(a), nb = numeric_parts(b);
  const int ka = !na.empty() ? 0 : a == "latest" ? 1 : 2, kb = !nb.empty() ? 0 : b == "latest" ? 1 : 2;
  if (ka != kb) return ka < kb;
  if (ka == 0 && na != nb) return std::lexicographical_compare(na.begin(), na.end(), nb.begin(), nb.end());
  return a < b;
}

Grid build_grid(const std::vector<json>& results) {
  Grid g;
  std::set<std::string> versions;
  std::map<std::string, std::string> resolved;  // "latest" -> "5.23.0"
  std::set<std::string> variants;
  for (const auto& r : results) {
    const auto p = place_of(r);
    versions.insert(p.version);
    variants.insert(p.variant);
    if (r.contains("report") && !str(r["report"], "resolved").empty())
      resolved[p.version] = str(r["report"], "resolved");
    else if (p.version == "latest" && r.contains("capture") && r["capture"].is_object())
      if (auto v = str(r["capture"].value("environment", json::object()), "transformers"); !v.empty())
        resolved[p.version] = v;
  }
  g.versions.assign(versions.begin(), versions.end());
  std::sort(g.versions.begin(), g.versions.end(), version_less);
  for (const auto& v : g.versions)
    g.headers.push_back(resolved.count(v) && resolved[v] != v ? fmt::format("{} ({})", v, resolved[v]) : v);
  std::vector<std::string> rows(variants.begin(), variants.end());
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return variant_key(a) < variant_key(b); });
  std::map<std::string, size_t> col, row_index;
  for (size_t i = 0; i < g.versions.size(); ++i) col[g.versions[i]] = i;
  for (const auto& v : rows) {
    row_index[v] = g.rows.size();
    g.rows.push_back({v, std::vector<GridSquare>(g.versions.size()), std::nullopt, ""});
  }
  // Cells of each square, worst first.
  std::map<std::pair<size_t, size_t>, std::vector<const json*>> members;
  for (const auto& r : results) {
    const auto p = place_of(r);
    members[{row_index[p.variant], col[p.version]}].push_back(&r);
  }
  for (auto& [key, cells] : members) {
    std::stable_sort(cells.begin(), cells.end(), [](const json* a, const json* b) {
      return severity(outcome_of(str(*a, "verdict"))) > severity(outcome_of(str(*b, "verdict")));
    });
    auto& sq = g.rows[key.first].squares[key.second];
    sq.empty = false;
    sq.outcome = outcome_of(str(*cells.front(), "verdict"));
    std::set<std::string> hazards;
    bool any_ran = false, all_replay = true;
    for (const json* c : cells) {
      sq.cells.push_back(short_name(str(*c, "name")));
      sq.verdicts.push_back(str(*c, "verdict"));
      const auto o = outcome_of(str(*c, "verdict"));
      if (o == Outcome::XFail && sq.outcome == Outcome::XFail) hazards.insert(expected_hazard(*c));
      if (decides_colour(o)) {
        any_ran = true;
        all_replay = all_replay && is_replay(*c);
      }
    }
    for (const auto& h : hazards) sq.hazard += (sq.hazard.empty() ? "" : ",") + h;
    sq.replay_only = any_ran && all_replay;
  }
  // The first release where a row's outcome (colour, or the hazard it names) changes; versions
  // that did not run (not run, env-error) neither start nor break a run of one outcome.
  for (auto& row : g.rows) {
    std::optional<size_t> prev;
    for (size_t i = 0; i < row.squares.size(); ++i) {
      const auto& s = row.squares[i];
      if (s.empty || !decides_colour(s.outcome)) continue;
      if (prev) {
        const auto& p = row.squares[*prev];
        if (p.outcome != s.outcome || p.hazard != s.hazard) {
          row.change = i;
          row.squares[i].first_change = true;
          row.change_text =
              fmt::format("{} → {}: {} → {}", g.versions[*prev], g.versions[i], outcome_words(p), outcome_words(s));
          break;
        }
      }
      prev = i;
    }
  }
  return g;
}

std::string render_grid_terminal(const Grid& g, const RenderOptions& o) {
  const auto headers = short_headers(g);
  size_t label_w = std::string("model x patch set").size();
  for (const auto& r : g.rows) label_w = std::max(label_w, r.variant.size());
  std::vector<size_t> w;
  for (size_t i = 0; i < g.versions.size(); ++i) {
    size_t width = std::max<size_t>(headers[i].size(), 5);
    for (const auto& r : g.rows) width = std::max(width, display_width(square_text(r.squares[i])) + 1);
    w.push_back(width);
  }
  std::string out = pad("model x patch set", label_w);
  for (size_t i = 0; i < headers.size(); ++i) out += " " + pad(headers[i], w[i]);
  out += "  first change\n";
  for (const auto& r : g.rows) {
    out += pad(r.variant, label_w);
    for (size_t i = 0; i < r.squares.size(); ++i) {
      const auto& s = r.squares[i];
      const auto text = pad((s.first_change ? "▶" : "") + square_text(s), w[i]);
      out += " ";
      if (o.color && !s.empty) {
        out += ansi_of(s.outcome);
        if (!o.html_link.empty())
          out += fmt::format("\x1b]8;;file://{}#{}\x1b\\{}\x1b]8;;\x1b\\", o.html_link,
                             anchor_of("cell/" + s.cells.front()), text);
        else
          out += text;
        out += "\x1b[0m";
      } else {
        out += text;
      }
    }
    out += "  " + (r.change_text.empty() ? std::string("-") : r.change_text) + "\n";
  }
  for (size_t i = 0; i < g.versions.size(); ++i)
    if (g.headers[i] != g.versions[i]) out += fmt::format("{} = {}\n", headers[i], g.headers[i]);
  out += kGridLegendText;
  return out;
}

std::string render_grid_markdown(const Grid& g) {
  std::string out = "| model × patch set |";
  for (const auto& h : g.headers) out += " " + md_cell(h) + " |";
  out += " first change |\n|---|";
  for (size_t i = 0; i < g.headers.size(); ++i) out += ":-:|";
  out += "---|\n";
  for (const auto& r : g.rows) {
    out += "| `" + r.variant + "` |";
    for (const auto& s : r.squares) {
      if (s.empty) {
        out += " |";
        continue;
      }
      std::string text = std::string(emoji_of(s.outcome)) + " " +
                         (s.outcome == Outcome::XFail    ? (s.hazard.empty() ? "xfail" : s.hazard)
                          : s.outcome == Outcome::Fail   ? "**FAIL**"
                          : s.outcome == Outcome::XPass  ? "**XPASS**"
                          : s.outcome == Outcome::NotRun ? "not run"
                                                         : outcome_name(s.outcome));
      if (s.replay_only) text += "\\*";
      if (s.first_change) text = "▶ " + text;
      out += fmt::format(" [{}](#{}) |", text, anchor_of("cell/" + s.cells.front()));
    }
    out += " " + md_cell(r.change_text.empty() ? "-" : r.change_text) + " |\n";
  }
  out += "\n🟩 pass · 🟪 expected failure (hazard id) · 🟥 FAIL · 🟧 unexpected pass · ";
  out += "⬛ environment could not be installed · ⬜ not run · \\* golden replay only · ";
  out += "▶ first release where the row's outcome changes\n";
  return out;
}

std::string render_grid_html(const Grid& g) {
  std::string out = R"(<table class="grid"><tr><th class="variant">model &times; patch set</th>)";
  for (const auto& h : g.headers) out += "<th>" + html_escape(h) + "</th>";
  out += "<th class=\"change-text\">first change</th></tr>\n";
  for (const auto& r : g.rows) {
    out += "<tr><th class=\"variant\">" + html_escape(r.variant) + "</th>";
    for (const auto& s : r.squares) {
      if (s.empty) {
        out += "<td class=\"empty\"></td>";
        continue;
      }
      std::string title;
      for (size_t k = 0; k < s.cells.size(); ++k)
        title += (title.empty() ? "" : "\n") + s.cells[k] + ": " + s.verdicts[k];
      out += fmt::format(R"(<td class="{}{}" title="{}"><a href="#{}">{}{}</a></td>)", outcome_name(s.outcome),
                         s.first_change ? " change" : "", html_escape(title), anchor_of("cell/" + s.cells.front()),
                         s.first_change ? "&#9654;&nbsp;" : "", html_escape(square_text(s)));
    }
    out += "<td class=\"change-text\">" + html_escape(r.change_text.empty() ? "-" : r.change_text) + "</td></tr>\n";
  }
  out +=
      "</table>\n<p class=\"legend\"><span class=\"pass\">pass</span> <span class=\"xfail\">H<i>n</i>: expected "
      "failure (hazard)</span> <span class=\"fail\">FAIL</span> <span class=\"xpass\">XPASS: unexpected pass</span> "
      "<span class=\"env-error\">ENV: environment could not be installed</span> <span class=\"not-run\">-: not "
      "run</span> &nbsp;*: golden replay only &nbsp;&#9654;: first release where the row's outcome changes</p>\n";
  return out;
}

std::vector<HistoryRun> load_history(const std::vector<fs::path>& dirs) {
  // Labels: the part of the paths that differs (".../2026-11-20/build/matrix/results" -> "2026-11-20").
  std::vector<std::vector<std::string>> parts;
  for (const auto& d : dirs) {
    std::vector<std::string> p;
    for (const auto& e : fs::weakly_canonical(fs::absolute(d))) p.push_back(e.string());
    parts.push_back(p);
  }
  size_t prefix = 0, suffix = 0;
  if (dirs.size() > 1) {
    const size_t shortest =
        std::min_element(parts.begin(), parts.end(), [](auto& a, auto& b) { return a.size() < b.size(); })->size();
    auto same_at = [&](auto index) {
      for (const auto& p : parts)
        if (index(p) != index(parts.front())) return false;
      return true;
    };
    while (prefix + 1 < shortest && same_at([&](const auto& p) { return p[prefix]; })) ++prefix;
    while (suffix + prefix + 1 < shortest && same_at([&](const auto& p) { return p[p.size() - 1 - suffix]; })) ++suffix;
  }
  std::vector<HistoryRun> runs;
  for (size_t i = 0; i < dirs.size(); ++i) {
    HistoryRun run;
    std::string label;
    for (size_t k = prefix; k + suffix < parts[i].size(); ++k) label += (label.empty() ? "" : "/") + parts[i][k];
    run.label = label.empty() ? dirs[i].string() : label;
    for (auto& r : load_results(dirs[i])) {
      const auto name = str(r, "name");  // before the move: json's operator= takes its argument by value
      run.cells[name] = std::move(r);
    }
    runs.push_back(std::move(run));
  }
  return runs;
}

std::vector<CellHistory> build_history(const std::vector<HistoryRun>& runs) {
  std::set<std::string> names;
  for (const auto& run : runs)
    for (const auto& [name, r] : run.cells) names.insert(name);
  std::vector<CellHistory> out;
  for (const auto& name : names) {
    CellHistory h;
    h.cell = name;
    std::optional<size_t> prev;
    for (size_t i = 0; i < runs.size(); ++i) {
      auto it = runs[i].cells.find(name);
      if (it == runs[i].cells.end()) {
        h.runs.push_back(std::nullopt);
        continue;
      }
      h.runs.push_back(it->second);
      const auto verdict = str(it->second, "verdict");
      if (prev && !h.change) {
        const auto before = str(*h.runs[*prev], "verdict");
        if (before != verdict) {
          h.change = i;
          h.change_text = fmt::format("run {} ({}): {} → {}", i + 1, runs[i].label, before, verdict);
        }
      }
      prev = i;
    }
    out.push_back(std::move(h));
  }
  return out;
}

std::string history_svg(const std::vector<HistoryRun>& runs, const CellHistory& h) {
  const int width = 420, height = 90, left = 44, right = 12, top = 8, bottom = 22;
  const double lo = -9, hi = 2;
  const size_t n = std::max<size_t>(runs.size(), 1);
  auto x_of = [&](size_t i) {
    return left + (n == 1 ? 0.0 : static_cast<double>(i) * (width - left - right) / static_cast<double>(n - 1));
  };
  auto y_of = [&](double v) {
    const double l = std::isnan(v) || v >= INFINITY ? hi : v > 0 ? std::clamp(std::log10(v), lo, hi) : lo;
    return top + (hi - l) / (hi - lo) * (height - top - bottom);
  };
  std::string svg =
      fmt::format(R"(<svg xmlns="http://www.w3.org/2000/svg" class="history" width="{}" height="{}" font-size="9">)",
                  width, height);
  for (int e = -8; e <= 2; e += 2)
    svg += fmt::format(
        R"(<line x1="{}" x2="{}" y1="{:.1f}" y2="{:.1f}" stroke="#eee"/><text x="2" y="{:.1f}" fill="#666">1e{}</text>)",
        left, width - right, y_of(std::pow(10.0, e)), y_of(std::pow(10.0, e)), y_of(std::pow(10.0, e)) + 3, e);
  std::optional<double> tol;
  for (const auto& r : h.runs)
    if (r && r->contains("comparison") && (*r)["comparison"].contains("tolerance"))
      tol = (*r)["comparison"]["tolerance"].value("logits_max_abs", 1e-4);
  if (tol)
    svg += fmt::format(
        R"(<line x1="{}" x2="{}" y1="{:.1f}" y2="{:.1f}" stroke="#c00" stroke-dasharray="3,2"><title>tolerance {:.0e}</title></line>)",
        left, width - right, y_of(*tol), y_of(*tol), *tol);
  if (h.change) {
    const double x = x_of(*h.change);
    svg += fmt::format(
        R"(<line class="change" x1="{0:.1f}" x2="{0:.1f}" y1="{1}" y2="{2}" stroke="#e08020" stroke-width="2"/>)"
        R"(<text x="{3:.1f}" y="{4}" fill="#e08020">{5}</text>)",
        x, top, height - bottom, std::min(x + 3, static_cast<double>(width - 80)), top + 8,
        html_escape(h.change_text.substr(0, h.change_text.find(':'))) + " changed");
  }
  std::string path;
  static const std::map<std::string, std::string> colour = {{"pass", "#2e7d32"}, {"xfail", "#6a4fb0"},
                                                            {"fail", "#c00"},    {"xpass", "#e08020"},
                                                            {"not-run", "#999"}, {"env-error", "#333"}};
  std::string marks;
  for (size_t i = 0; i < h.runs.size(); ++i) {
    const double x = x_of(i);
    svg += fmt::format(R"(<text x="{:.1f}" y="{}" fill="#666" text-anchor="middle">{}</text>)", x, height - 6, i + 1);
    if (!h.runs[i]) continue;
    const auto verdict = str(*h.runs[i], "verdict");
    const auto c = colour.count(verdict) ? colour.at(verdict) : "#c00";
    const auto v = max_abs_of(*h.runs[i]);
    const auto title = fmt::format("run {} ({}): {}{}", i + 1, runs[i].label, verdict,
                                   v ? fmt::format(", max|Δlogit| {:.3e}", *v) : "");
    if (v) {
      path += fmt::format("{}{:.1f},{:.1f}", path.empty() ? "M" : " L", x, y_of(*v));
      marks += fmt::format(R"(<circle cx="{:.1f}" cy="{:.1f}" r="3.5" fill="{}"><title>{}</title></circle>)", x,
                           y_of(*v), c, html_escape(title));
    } else {  // no comparison (not run, capture failed): a hollow mark on the axis
      marks += fmt::format(R"(<circle cx="{:.1f}" cy="{}" r="3.5" fill="white" stroke="{}"><title>{}</title></circle>)",
                           x, height - bottom, c, html_escape(title));
    }
  }
  if (!path.empty()) svg += R"(<path fill="none" stroke="#4a7ebb" d=")" + path + "\"/>";
  return svg + marks + "</svg>";
}

std::string render_history_terminal(const std::vector<HistoryRun>& runs, const std::vector<CellHistory>& history) {
  std::string out = fmt::format("history: {} runs (oldest first):", runs.size());
  for (size_t i = 0; i < runs.size(); ++i) out += fmt::format(" {}={}", i + 1, runs[i].label);
  out += "\n";
  size_t w = 4;
  for (const auto& h : history) w = std::max(w, short_name(h.cell).size());
  for (const auto& h : history) {
    std::string series;
    for (const auto& r : h.runs) series += history_glyph(r);
    std::string last = "-";
    for (auto it = h.runs.rbegin(); it != h.runs.rend(); ++it)
      if (*it) {
        if (auto v = max_abs_of(**it)) last = fmt::format("{:.2e}", *v);
        break;
      }
    out += fmt::format("{:<{}}  {}  {:>9}  {}\n", short_name(h.cell), w, series, last, h.change ? h.change_text : "-");
  }
  out +=
      "P pass, x expected failure, F FAIL, X unexpected pass, E env-error, - not run, blank: not in that run; "
      "last column: latest max|Δlogit|, first verdict change\n";
  return out;
}

std::string render_history_markdown(const std::vector<HistoryRun>& runs, const std::vector<CellHistory>& history) {
  std::string out = "| cell |";
  for (size_t i = 0; i < runs.size(); ++i) out += " " + md_cell(runs[i].label) + " |";
  out += " first verdict change |\n|---|";
  for (size_t i = 0; i < runs.size(); ++i) out += "---|";
  out += "---|\n";
  for (const auto& h : history) {
    out += "| `" + short_name(h.cell) + "` |";
    for (size_t i = 0; i < h.runs.size(); ++i) {
      if (!h.runs[i]) {
        out += " |";
        continue;
      }
      const auto v = max_abs_of(*h.runs[i]);
      out += fmt::format(" {}{}{} |", h.change == i ? "▶ " : "", str(*h.runs[i], "verdict"),
                         v ? fmt::format(" {:.1e}", *v) : "");
    }
    out += " " + md_cell(h.change ? h.change_text : "-") + " |\n";
  }
  return out;
}

ReportCounts count_verdicts(const std::vector<json>& results) {
  ReportCounts c;
  for (const auto& r : results) {
    const auto v = str(r, "verdict");
    if (v == "pass")
      ++c.pass;
    else if (v == "xfail")
      ++c.xfail;
    else if (v == "xpass")
      ++c.xpass;
    else if (v == "not-run")
      ++c.not_run;
    else if (v == "env-error")
      ++c.env_error;
    else
      ++c.fail;
  }
  return c;
}

namespace {
// Cells the matrix declares that left no result file: in the grid, and listed compactly (not as
// table rows).
bool unrun_placeholder(const json& r) { return r.value("synthesized", false) && str(r, "verdict") == "not-run"; }

std::string counts_line(const std::vector<json>& results, bool markdown) {
  const auto n = count_verdicts(results);
  return fmt::format("{} cells: {} pass, {} expected failures, {} {}, {} unexpected pass, {} env-error, {} not run{}\n",
                     results.size(), n.pass, n.xfail, n.fail, markdown ? "fail" : "FAIL", n.xpass, n.env_error,
                     n.not_run, markdown ? "." : "");
}
}  // namespace

std::string render_table(const std::vector<json>& results, const RenderOptions& options, const ReportHistory* history) {
  std::string out = render_grid_terminal(build_grid(results), options) + "\n";
  if (history) out += render_history_terminal(history->runs, history->cells) + "\n";
  std::vector<Row> rows;
  size_t unrun = 0;
  for (const auto& r : results) {
    if (unrun_placeholder(r))
      ++unrun;
    else
      rows.push_back(row_of(r));
  }
  std::vector<std::string> head{"cell",    "transformers", "reference", "expect",
                                "verdict", "max|Δlogit|",  "top-1",     "diagnosis"};
  std::vector<size_t> w(head.size());
  for (size_t i = 0; i < head.size(); ++i) w[i] = display_width(head[i]);
  auto cols = [](const Row& r) {
    return std::vector<std::string>{r.cell,    r.version, r.reference, r.expect,
                                    r.verdict, r.max_abs, r.top1,      r.diagnosis};
  };
  for (const auto& r : rows) {
    const auto c = cols(r);
    for (size_t i = 0; i + 1 < c.size(); ++i) w[i] = std::max(w[i], display_width(c[i]));
  }
  auto line = [&](const std::vector<std::string>& c) {
    std::string s;
    for (size_t i = 0; i < c.size(); ++i) s += (i + 1 < c.size() ? pad(c[i], w[i]) : c[i]) + "  ";
    while (!s.empty() && s.back() == ' ') s.pop_back();
    return s + "\n";
  };
  out += line(head);
  for (const auto& r : rows) out += line(cols(r));
  if (unrun > 0)
    out += fmt::format("({} more cells of the matrix left no result file: not run, see the grid)\n", unrun);
  out += "\n" + counts_line(results, false);
  return out;
}

std::string render_markdown(const std::vector<json>& results, const ReportHistory* history) {
  std::string out =
      "# opensci-compat matrix\n\n" + counts_line(results, true) + "\n" + render_grid_markdown(build_grid(results));
  if (history) out += "\n## History\n\n" + render_history_markdown(history->runs, history->cells);
  out +=
      "\n## Cells\n\n| cell | transformers | reference | expect | verdict | max\\|Δlogit\\| | top-1 | diagnosis |\n"
      "|---|---|---|---|---|---|---|---|\n";
  std::string unrun;
  for (const auto& r : results) {
    const auto row = row_of(r);
    if (unrun_placeholder(r)) {
      unrun += fmt::format("- <a id=\"{}\"></a>`{}`\n", anchor_of(str(r, "name")), row.cell);
      continue;
    }
    out += fmt::format("| <a id=\"{}\"></a>`{}` | {} | {} | {} | **{}** | {} | {} | {} |\n", anchor_of(str(r, "name")),
                       row.cell, row.version, row.reference, row.expect, row.verdict, row.max_abs, row.top1,
                       md_cell(row.diagnosis));
  }
  if (!unrun.empty())
    out +=
        "\n## Not run\n\nCells of the matrix that left no result file (their environment, capture or toy "
        "did not run here):\n\n" +
        unrun;
  return out;
}

std::string render_html(const std::vector<json>& results, const ReportHistory* history) {
  std::string out = R"(<!doctype html><html><head><meta charset="utf-8"><title>opensci-compat matrix</title><style>
body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}
.pass{background:#cdeccd}.xfail{background:#ddd3f3}.fail{background:#f4a3a3;font-weight:bold}.xpass{background:#ffcf80;font-weight:bold}
.env-error{background:#555;color:#fff}.not-run{background:#eee;color:#777}
table.grid td{text-align:center;min-width:3.2em;white-space:nowrap}table.grid td a{color:inherit;text-decoration:none;display:block}
table.grid th.variant{text-align:left;font-family:monospace;font-weight:normal;white-space:nowrap}
table.grid td.change{outline:3px solid #111;outline-offset:-3px}table.grid td.empty{background:#fff;border-color:#f2f2f2}
table.grid td.change-text{text-align:left;font-size:12px;white-space:nowrap}
p.legend span{display:inline-block;padding:1px 6px;margin-right:4px;font-size:12px}
details{margin:0.6em 0}pre{background:#f6f6f6;padding:6px;white-space:pre-wrap}</style></head><body>
<h1>opensci-compat matrix</h1>
)";
  out += "<p>" + html_escape(counts_line(results, true)) + "</p>\n";
  out += render_grid_html(build_grid(results));
  if (history) {
    out += "<h2>History</h2><p>" + std::to_string(history->runs.size()) + " runs, oldest first:";
    for (size_t i = 0; i < history->runs.size(); ++i)
      out += fmt::format(" {}&nbsp;=&nbsp;{}", i + 1, html_escape(history->runs[i].label));
    out +=
        ". max|&Delta;logit| per run (log scale; red: tolerance; orange: the first run whose verdict changed).</p>\n"
        "<table class=\"history\"><tr><th>cell</th><th>max|&Delta;logit| over the runs</th><th>first verdict "
        "change</th></tr>\n";
    for (const auto& h : history->cells)
      out += fmt::format("<tr><td><a href=\"#{}\">{}</a></td><td>{}</td><td>{}</td></tr>\n", anchor_of(h.cell),
                         html_escape(short_name(h.cell)), history_svg(history->runs, h),
                         html_escape(h.change ? h.change_text : "-"));
    out += "</table>\n";
  }
  out +=
      R"(<h2>Cells</h2><table><tr><th>cell</th><th>transformers</th><th>reference</th><th>expect</th><th>verdict</th><th>max|&Delta;logit|</th><th>top-1</th><th>diagnosis</th></tr>
)";
  for (const auto& r : results) {
    if (unrun_placeholder(r)) continue;
    const auto row = row_of(r);
    out += fmt::format(
        R"(<tr class="{}"><td><a href="#{}">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>)",
        html_escape(row.verdict), anchor_of(str(r, "name")), html_escape(row.cell), html_escape(row.version),
        html_escape(row.reference), html_escape(row.expect), html_escape(row.verdict), row.max_abs, row.top1,
        html_escape(row.diagnosis));
    out += "\n";
  }
  out += "</table>\n";
  size_t unrun = 0;
  for (const auto& r : results) unrun += unrun_placeholder(r);
  if (unrun > 0)
    out += fmt::format(
        "<p>{} more cells of the matrix left no result file (not run here); their details follow the "
        "others.</p>\n",
        unrun);
  std::vector<const json*> ordered;  // details: cells with results first, then the placeholders
  for (const auto& r : results)
    if (!unrun_placeholder(r)) ordered.push_back(&r);
  for (const auto& r : results)
    if (unrun_placeholder(r)) ordered.push_back(&r);
  for (const json* rp : ordered) {
    const auto& r = *rp;
    const auto row = row_of(r);
    out += fmt::format(R"(<details id="{}"><summary>{} — {}</summary><p>{}</p>)", anchor_of(str(r, "name")),
                       html_escape(row.cell), html_escape(row.verdict), html_escape(str(r, "summary")));
    if (r.contains("diagnosis") && r["diagnosis"].contains("findings"))
      for (const auto& f : r["diagnosis"]["findings"])
        out += fmt::format("<p><b>{}</b> {}: {}</p>", html_escape(str(f, "hazard")), html_escape(str(f, "title")),
                           html_escape(str(f, "evidence")));
    if (r.contains("comparison"))
      out += "<p>per-layer max|&Delta;| (log scale; red: tolerance)</p>" + layer_plot_svg(r["comparison"]);
    if (r.contains("capture") && r["capture"].contains("stderr_tail") && r["capture"]["stderr_tail"].is_string() &&
        !r["capture"]["stderr_tail"].get<std::string>().empty())
      out += "<pre>" + html_escape(r["capture"]["stderr_tail"].get<std::string>()) + "</pre>";
    out += "</details>\n";
  }
  // A square's link opens the cell's details.
  out +=
      "<script>function openHash(){var e=document.getElementById(location.hash.slice(1));if(e&&e.tagName=='DETAILS')"
      "e.open=true;}window.addEventListener('hashchange',openHash);openHash();</script>\n";
  return out + "</body></html>\n";
}

}  // namespace opensci::harness
