#include "opensci/harness/backends.hpp"

#include <fmt/ranges.h>

#include "opensci/error.hpp"

namespace opensci::harness {

std::vector<std::string> available_backends() { return {"cpu"}; }

ForwardResult run_reference(const std::string& backend, const Checkpoint& ck, const TokenBatch& tokens,
                            const std::string& precision, bool capture_hidden) {
  if (backend == "cpu") {
    if (precision != "fp64" && precision != "fp32")
      fail("backend cpu runs precision fp64 (golden) or fp32 (fast), not '{}'", precision);
    return forward(ck, tokens, {precision == "fp64" ? Precision::Golden : Precision::Fast, capture_hidden});
  }
  fail("reference backend '{}' is not built into this binary (available: {})", backend,
       fmt::join(available_backends(), ", "));
}

}  // namespace opensci::harness
