// gpu/swiglu: gate = silu(gate) * up against opensci::ops::swiglu<double>.
#include "gpu_test.hpp"
#include "opensci/ops.hpp"

using namespace opensci::gpu;
using namespace opensci::gpu::test;

int main() {
  Suite suite("gpu/swiglu");
  return run_suite(suite, [&] {
    uint64_t salt = 400;
    for (const DType dt : {DType::F32, DType::BF16})
      for (const int64_t n : {int64_t{1}, int64_t{1000}, int64_t{4099}, int64_t{65537}}) {
        auto rng = suite.rng(++salt);
        const auto gate = random_values(rng, static_cast<size_t>(n), dt, 0.0, 3.0);
        const auto up = random_values(rng, static_cast<size_t>(n), dt);
        auto d_gate = GuardedBuffer::of_values(dt, gate), d_up = GuardedBuffer::of_values(dt, up);
        swiglu(dt, d_gate.data(), d_up.data(), n, Stream{});
        auto ref = to_double(gate);
        const auto upd = to_double(up);
        opensci::ops::swiglu(ref.data(), upd.data(), n);
        // fp32: expf <= 2 ulp, one add, one division, one product: < 8 eps per element.
        // bf16: silu rounded to bf16 (torch's silu output tensor), then the product: 2 roundings.
        const Tolerance tol = dt == DType::F32 ? Tolerance{8, "expf 2 ulp, add, divide, multiply"}
                                               : Tolerance{2, "silu output and product rounded to bf16"};
        const auto name = fmt::format("swiglu n={}", n);
        suite.check(name, dt, rel_err(d_gate.values(dt), ref), tol);
        suite.expect(d_gate.guards_intact(), name + ": guard regions intact");
      }
  });
}
