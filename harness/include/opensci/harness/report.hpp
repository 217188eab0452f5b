// Renders cell results (the JSON files `opensci-compat cell` writes) as a terminal table,
// Markdown, and a self-contained HTML page with per-layer divergence plots (inline SVG).
//
// Every rendering leads with the grid: rows = model x patch set, columns = transformers versions
// in release order (4.48 < 4.57 < 5.0 < 5.2 < 5.12 < latest), each square the outcome of the
// cells of that model, patch set and version: pass / expected failure (with the hazard id) /
// FAIL / unexpected pass / env-error / not run, linking to the cells' details. The first release
// where a row's outcome changes is marked. Cells the matrix declares but that left no result file
// are "not run"; environment status files (<work>/envs/<env>.json, written by
// `opensci-compat env provision --status-file`) turn the cells of an environment that could not
// be installed into env-error squares with the package and the resolver's message.
//
// With a history (results directories of several runs, oldest first) the report also draws each
// cell's max|Δlogit| over the runs and marks the first run where its verdict changed.
#pragma once

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace opensci::harness {

struct Matrix;

std::vector<nlohmann::json> load_results(const std::filesystem::path& results_dir);  // sorted by name

// Status files <dir>/<env>.json by environment name (missing dir: none).
std::map<std::string, nlohmann::json> load_env_statuses(const std::filesystem::path& dir);

// The results plus a "not-run" entry for every cell of `matrix` without a result file, each
// tagged with its environment, variant and declared transformers version; the cells of an
// environment whose status is "env-error" (and that did not run) become verdict "env-error"
// with the package and the resolver's message in the summary.
std::vector<nlohmann::json> complete_results(std::vector<nlohmann::json> results, const Matrix* matrix,
                                             const std::map<std::string, nlohmann::json>& env_statuses);

// "4.48.0" < "4.57.6" < "5.0.0" < "5.2.0" < "5.12.1" < "latest" < other names (alphabetical).
bool version_less(const std::string& a, const std::string& b);

enum class Outcome { Pass, XFail, Fail, XPass, EnvError, NotRun };
const char* outcome_name(Outcome o);  // pass, xfail, fail, xpass, env-error, not-run

struct GridSquare {
  bool empty = true;  // no cell of this row has this version
  Outcome outcome = Outcome::NotRun;
  std::string hazard;                 // xfail: the hazard id(s), "H2" or "H1,H2"
  std::vector<std::string> cells;     // cell names (without "cell/"), worst first
  std::vector<std::string> verdicts;  // theirs
  bool replay_only = false;           // every cell that ran replayed a golden capture
  bool first_change = false;          // the row's outcome changes here, first time
};
struct GridRow {
  std::string variant;              // "<model>" or "<model>+<patch set>"
  std::vector<GridSquare> squares;  // one per column
  std::optional<size_t> change;     // column of the first change
  std::string change_text;          // "4.57.6 -> 5.0.0: pass -> xfail H2"
};
struct Grid {
  std::vector<std::string> versions;  // column keys in release order
  std::vector<std::string> headers;   // shown: "5.12.1", "latest (5.23.0)"
  std::vector<GridRow> rows;
};
Grid build_grid(const std::vector<nlohmann::json>& results);  // results from complete_results()

struct RenderOptions {
  bool color = false;     // ANSI colours in the terminal grid (only ever on a TTY)
  std::string html_link;  // terminal: OSC 8 hyperlinks of squares to this HTML file
};
std::string render_grid_terminal(const Grid& grid, const RenderOptions& options = {});
std::string render_grid_markdown(const Grid& grid);
std::string render_grid_html(const Grid& grid);

// A series of runs for `report --history`: each a results directory, oldest first.
struct HistoryRun {
  std::string label;                            // what tells the runs apart in their paths ("2026-11-20")
  std::map<std::string, nlohmann::json> cells;  // by cell name
};
std::vector<HistoryRun> load_history(const std::vector<std::filesystem::path>& dirs);
struct CellHistory {
  std::string cell;
  std::vector<std::optional<nlohmann::json>> runs;  // the result in each run (nullopt: absent)
  std::optional<size_t> change;                     // first run whose verdict differs from the run before
  std::string change_text;                          // "run 3 (2026-11-22): pass -> fail"
};
std::vector<CellHistory> build_history(const std::vector<HistoryRun>& runs);
std::string render_history_terminal(const std::vector<HistoryRun>& runs, const std::vector<CellHistory>& history);
std::string render_history_markdown(const std::vector<HistoryRun>& runs, const std::vector<CellHistory>& history);
std::string history_svg(const std::vector<HistoryRun>& runs, const CellHistory& cell);

struct ReportHistory {
  std::vector<HistoryRun> runs;
  std::vector<CellHistory> cells;
};
std::string render_table(const std::vector<nlohmann::json>& results, const RenderOptions& options = {},
                         const ReportHistory* history = nullptr);
std::string render_markdown(const std::vector<nlohmann::json>& results, const ReportHistory* history = nullptr);
std::string render_html(const std::vector<nlohmann::json>& results, const ReportHistory* history = nullptr);

struct ReportCounts {
  int pass = 0, fail = 0, xfail = 0, xpass = 0, not_run = 0, env_error = 0;
};
ReportCounts count_verdicts(const std::vector<nlohmann::json>& results);

}  // namespace opensci::harness
