// `compare A B`: metrics between two forward outputs, printed and written as JSON.
#include <fmt/core.h>

#include <fstream>

#include "commands.hpp"
#include "opensci/error.hpp"
#include "opensci/harness/compare.hpp"

namespace opensci::cli {

void add_compare_command(CLI::App& app) {
  struct Args {
    std::string a, b, json_out, tolerance_file, tolerance = "fp32-cpu";
  };
  auto args = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("compare", "Compare two forward outputs (candidate A against reference B)");
  cmd->add_option("a", args->a, "candidate output (.safetensors)")->required()->check(CLI::ExistingFile);
  cmd->add_option("b", args->b, "reference output (.safetensors)")->required()->check(CLI::ExistingFile);
  cmd->add_option("--json", args->json_out, "write the metrics as JSON here");
  cmd->add_option("--tolerance-file", args->tolerance_file, "tolerances JSON (default: matrix/tolerances.json)");
  cmd->add_option("--tolerance", args->tolerance, "tolerance profile name");
  cmd->callback([args] {
    const auto file = args->tolerance_file.empty() ? std::string(OPENSCI_SOURCE_DIR "/matrix/tolerances.json")
                                                   : args->tolerance_file;
    const auto tol = harness::load_tolerance(file, args->tolerance);
    const auto c = harness::compare_outputs(args->a, args->b, tol);
    fmt::print("{}", harness::format_comparison(c, tol));
    if (!args->json_out.empty()) {
      std::ofstream(args->json_out) << harness::to_json(c, tol).dump(2) << "\n";
    }
    if (!c.passed()) throw CLI::RuntimeError(1);
  });
}

}  // namespace opensci::cli
