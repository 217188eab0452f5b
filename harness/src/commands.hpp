// Each subcommand of opensci-compat lives in its own cli_*.cpp and registers itself here.
// A command's callback throws opensci::Error on bad input; main() prints it and exits 2.
#pragma once

#include <CLI/CLI.hpp>

namespace opensci::cli {

void add_toy_command(CLI::App& app);
void add_forward_command(CLI::App& app);
void add_convert_command(CLI::App& app);
void add_compare_command(CLI::App& app);
void add_matrix_command(CLI::App& app);
void add_capture_command(CLI::App& app);
void add_env_command(CLI::App& app);
void add_worker_command(CLI::App& app);  // `env workers` (after add_env_command)
void add_cell_command(CLI::App& app);
void add_patch_command(CLI::App& app);
void add_report_command(CLI::App& app);
void add_toyify_command(CLI::App& app);  // cli_user.cpp
void add_download_command(CLI::App& app);  // cli_user.cpp
void add_matrix_merge_command(CLI::App& app);  // cli_user.cpp: `matrix merge`
void add_run_command(CLI::App& app);  // cli_user.cpp
void add_parallel_commands(CLI::App& app);  // forward-sharded (parallel/src/cli_parallel.cpp)

}  // namespace opensci::cli
