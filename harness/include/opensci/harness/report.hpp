// Renders cell results (the JSON files `opensci-compat cell` writes) as a terminal table,
// Markdown, and a self-contained HTML page with per-layer divergence plots (inline SVG).
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace opensci::harness {

std::vector<nlohmann::json> load_results(const std::filesystem::path& results_dir);  // sorted by name

std::string render_table(const std::vector<nlohmann::json>& results);
std::string render_markdown(const std::vector<nlohmann::json>& results);
std::string render_html(const std::vector<nlohmann::json>& results);

struct ReportCounts {
  int pass = 0, fail = 0, xfail = 0, xpass = 0, not_run = 0;
};
ReportCounts count_verdicts(const std::vector<nlohmann::json>& results);

}  // namespace opensci::harness
