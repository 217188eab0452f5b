// gpu/elementwise: bias add, bias broadcast and residual add against the CPU (ops::add_inplace
// and the bias loop of ops::linear_loops).
#include "gpu_test.hpp"
#include "opensci/ops.hpp"

using namespace opensci::gpu;
using namespace opensci::gpu::test;

int main() {
  Suite suite("gpu/elementwise");
  return run_suite(suite, [&] {
    struct Case {
      int64_t rows, cols;
    };
    const Case cases[] = {{1, 1}, {7, 96}, {33, 4099}, {300, 257}};
    // One fp32 add rounds once (u = eps/2): 1 eps. bf16 likewise, one rounding to bf16: 1 eps.
    const Tolerance one_add{1, "one rounded add per element"};
    uint64_t salt = 500;
    for (const DType dt : {DType::F32, DType::BF16})
      for (const Case& c : cases) {
        auto rng = suite.rng(++salt);
        const size_t n = static_cast<size_t>(c.rows * c.cols);
        const auto x = random_values(rng, n, dt), y = random_values(rng, n, dt),
                   bias = random_values(rng, static_cast<size_t>(c.cols), dt);
        const auto shape = fmt::format("rows={} cols={}", c.rows, c.cols);

        {  // add_bias: x[r, c] += bias[c]
          auto d_x = GuardedBuffer::of_values(dt, x), d_b = GuardedBuffer::of_values(dt, bias);
          add_bias(dt, d_x.data(), d_b.data(), c.rows, c.cols, Stream{});
          std::vector<double> ref(n);
          for (size_t i = 0; i < n; ++i) ref[i] = static_cast<double>(x[i]) + bias[i % static_cast<size_t>(c.cols)];
          suite.check("add_bias " + shape, dt, rel_err(d_x.values(dt), ref), one_add);
          suite.expect(d_x.guards_intact(), "add_bias " + shape + ": guard regions intact");
        }
        {  // broadcast_rows: out[r, :] = bias (the GEMM's C input for biased linears)
          auto d_b = GuardedBuffer::of_values(dt, bias);
          GuardedBuffer out(n * dtype_size(dt));
          broadcast_rows(dt, out.data(), d_b.data(), c.rows, c.cols, Stream{});
          std::vector<double> ref(n);
          for (size_t i = 0; i < n; ++i) ref[i] = bias[i % static_cast<size_t>(c.cols)];
          suite.check("broadcast_rows " + shape, dt, rel_err(out.values(dt), ref), {0, "a copy"});
          suite.expect(out.guards_intact(), "broadcast_rows " + shape + ": guard regions intact");
        }
        {  // add_inplace: residual
          auto d_x = GuardedBuffer::of_values(dt, x), d_y = GuardedBuffer::of_values(dt, y);
          add_inplace(dt, d_x.data(), d_y.data(), static_cast<int64_t>(n), Stream{});
          auto ref = to_double(x);
          const auto yd = to_double(y);
          opensci::ops::add_inplace(ref.data(), yd.data(), static_cast<int64_t>(n));
          suite.check("add_inplace " + shape, dt, rel_err(d_x.values(dt), ref), one_add);
          suite.expect(d_x.guards_intact(), "add_inplace " + shape + ": guard regions intact");
        }
      }
  });
}
