// `report`: the matrix at a glance (grid), the cells, their history across runs.
#include <fmt/core.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <set>

#include "commands.hpp"
#include "opensci/error.hpp"
#include "opensci/harness/matrix.hpp"
#include "opensci/harness/measurements.hpp"
#include "opensci/harness/report.hpp"

namespace opensci::cli {
namespace fs = std::filesystem;

void add_report_command(CLI::App& app) {
  struct Args {
    std::string results, matrix = OPENSCI_SOURCE_DIR "/matrix/matrix.json", envs, markdown, html, png_dir,
                         color = "auto";
    std::vector<std::string> history;
    bool nightly = false;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("report", "Render cell results: the grid, a table, Markdown and HTML, their history");
  cmd->add_option("--results", a->results, "directory of cell result JSON files (default: the last --history dir)");
  cmd->add_option("--matrix", a->matrix,
                  "matrix JSON whose cells without a result are shown as not run ('none': results only)")
      ->capture_default_str();
  cmd->add_flag(
      "--nightly", a->nightly,
      "the run emitted the cells of tier nightly (-DOPENSCI_NIGHTLY=ON): show those without a result as not run");
  cmd->add_option("--envs", a->envs, "environment status files <env>.json (default: <results>/../envs)");
  cmd->add_option("--markdown", a->markdown, "write Markdown here");
  cmd->add_option("--html", a->html, "write a self-contained HTML page here");
  cmd->add_option("--png-dir", a->png_dir, "write each compared cell's per-layer plot as <cell>.png here");
  cmd->add_option("--history", a->history, "results directories of earlier runs and this one, oldest first");
  cmd->add_option("--color", a->color,
                  "ANSI colours in the terminal grid: auto (on a TTY, unless NO_COLOR), always, never")
      ->check(CLI::IsMember({"auto", "always", "never"}));
  cmd->callback([a] {
    if (a->results.empty()) {
      if (a->history.empty()) fail("report: give --results DIR (or --history DIR...)");
      a->results = a->history.back();
    }
    auto results = harness::load_results(a->results);
    std::optional<harness::Matrix> matrix;
    size_t nightly_left_out = 0;
    if (a->matrix != "none" && !a->matrix.empty()) {
      if (!fs::exists(a->matrix)) fail("report: matrix {} does not exist (--matrix none: results only)", a->matrix);
      matrix = harness::load_matrix(a->matrix);
      // A build without -DOPENSCI_NIGHTLY=ON emits no cells of tier nightly: they are not this
      // run's missing results (as in `matrix tally`); a result of one is still shown.
      std::set<std::string> have;
      for (const auto& r : results) have.insert(r.value("name", std::string()));
      nightly_left_out = std::erase_if(matrix->cells, [&](const harness::MatrixCell& c) {
        return !harness::cell_emitted(c, a->nightly) && !have.count(c.name);
      });
    }
    const auto envs_dir = a->envs.empty() ? fs::path(a->results).parent_path() / "envs" : fs::path(a->envs);
    const auto statuses = harness::load_env_statuses(envs_dir);
    if (results.empty() && !matrix) fail("{}: no cell results (run the matrix first: ctest -L matrix)", a->results);
    const size_t found = results.size();
    results = harness::complete_results(std::move(results), matrix ? &*matrix : nullptr, statuses);
    std::optional<harness::ReportHistory> history;
    if (!a->history.empty()) {
      std::vector<fs::path> dirs(a->history.begin(), a->history.end());
      history.emplace();
      history->runs = harness::load_history(dirs);
      history->cells = harness::build_history(history->runs);
    }
    harness::RenderOptions o;
    const char* no_color = std::getenv("NO_COLOR");
    o.color =
        a->color == "always" || (a->color == "auto" && isatty(STDOUT_FILENO) && (no_color == nullptr || !*no_color));
    if (o.color && !a->html.empty()) o.html_link = fs::absolute(a->html).string();
    fmt::print(
        "{} results from {}{}{}{}\n\n", found, a->results,
        matrix ? fmt::format(", {} cells declared in {}", matrix->cells.size(), a->matrix) : "",
        nightly_left_out ? fmt::format(" ({} cells of tier nightly not in this run left out: --nightly shows them)",
                                       nightly_left_out)
                         : "",
        statuses.empty() ? "" : fmt::format(", {} environment status files in {}", statuses.size(), envs_dir.string()));
    fmt::print("{}", harness::render_table(results, o, history ? &*history : nullptr));
    if (!a->markdown.empty())
      std::ofstream(a->markdown) << harness::render_markdown(results, history ? &*history : nullptr);
    if (!a->html.empty()) std::ofstream(a->html) << harness::render_html(results, history ? &*history : nullptr);
    if (!a->png_dir.empty()) {
      fs::create_directories(a->png_dir);
      for (const auto& r : results) {
        if (!r.contains("comparison")) continue;
        const auto name = r.value("name", std::string("cell"));
        const auto bytes = harness::layer_plot_png(r["comparison"], name);
        if (bytes.empty()) continue;
        auto flat = name.starts_with("cell/") ? name.substr(5) : name;
        std::replace(flat.begin(), flat.end(), '/', '+');
        std::ofstream(fs::path(a->png_dir) / (flat + ".png"), std::ios::binary)
            .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
      }
    }
    const auto n = harness::count_verdicts(results);
    if (n.fail + n.xpass > 0) throw CLI::RuntimeError(1);
  });
}

}  // namespace opensci::cli
