// opensci-compat: one CLI, one subcommand per step of the matrix (see commands.hpp).
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include "commands.hpp"
#include "opensci/error.hpp"

int main(int argc, char** argv) {
  CLI::App app{"opensci-compat: does your OpenSci model still compute what it was trained to compute?"};
  app.require_subcommand(1);
  opensci::cli::add_toy_command(app);
  opensci::cli::add_forward_command(app);
  opensci::cli::add_convert_command(app);
  opensci::cli::add_compare_command(app);
  opensci::cli::add_matrix_command(app);
  opensci::cli::add_capture_command(app);
  opensci::cli::add_env_command(app);
  opensci::cli::add_worker_command(app);
  opensci::cli::add_cell_command(app);
  opensci::cli::add_patch_command(app);
  opensci::cli::add_report_command(app);
  opensci::cli::add_toyify_command(app);
  opensci::cli::add_download_command(app);
  opensci::cli::add_matrix_merge_command(app);  // after add_matrix_command
  opensci::cli::add_run_command(app);
  opensci::cli::add_parallel_commands(app);  // parallel/src/cli_parallel.cpp
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {  // includes CLI::RuntimeError(code) thrown by a failed check
    return app.exit(e);
  } catch (const opensci::Error& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 2;
  }
  return 0;
}
