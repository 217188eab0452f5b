// gpu/gemm: the linear layers' GEMM (vendor BLAS where this build has it, and our tiled kernel
// always) against opensci::ops::linear_loops<double>, with and without the bias epilogue.
#include <cmath>

#include "gpu_test.hpp"
#include "opensci/gpu/gemm.hpp"
#include "opensci/ops.hpp"

using namespace opensci::gpu;
using namespace opensci::gpu::test;

int main() {
  Suite suite("gpu/gemm");
  return run_suite(suite, [&] {
    struct Case {
      int64_t rows, in, outf;
      bool bias;
    };
    // Tile edges (64 x 64 x 16) hit from both sides, K not a multiple of 16, one row, and the
    // 1.7B model's K = 2048.
    const Case cases[] = {{1, 96, 384, false},   {17, 96, 160, true}, {70, 130, 100, true},
                          {64, 2048, 64, false}, {3, 33, 5, true},    {129, 17, 65, true}};
    std::vector<GemmBackend> backends{GemmBackend::Tiled};
    if (Gemm::vendor_available()) backends.push_back(GemmBackend::Vendor);
    uint64_t salt = 600;
    for (const GemmBackend backend : backends) {
      const Gemm gemm(backend);
      for (const DType dt : {DType::F32, DType::BF16})
        for (const Case& c : cases) {
          auto rng = suite.rng(++salt);
          const auto x = random_values(rng, static_cast<size_t>(c.rows * c.in), dt);
          const auto w = random_values(rng, static_cast<size_t>(c.outf * c.in), dt, 0.0,
                                       1.0 / std::sqrt(static_cast<double>(c.in)));
          const auto b = random_values(rng, static_cast<size_t>(c.outf), dt);
          auto d_x = GuardedBuffer::of_values(dt, x), d_w = GuardedBuffer::of_values(dt, w),
               d_b = GuardedBuffer::of_values(dt, b);
          GuardedBuffer out(static_cast<size_t>(c.rows * c.outf) * dtype_size(dt));
          if (c.bias) broadcast_rows(dt, out.data(), d_b.data(), c.rows, c.outf, Stream{});
          gemm.linear(dt, out.data(), d_x.data(), d_w.data(), c.rows, c.in, c.outf, c.bias ? 1.0f : 0.0f, Stream{});

          const auto xd = to_double(x), wd = to_double(w), bd = to_double(b);
          std::vector<double> ref(static_cast<size_t>(c.rows * c.outf));
          opensci::ops::linear_loops(ref.data(), xd.data(), wd.data(), c.bias ? bd.data() : nullptr, c.rows, c.in,
                                     c.outf);
          // fp32: K-term dot products accumulated in fp32; with random signs the error grows like
          // sqrt(K) u (any summation order, blocked or split-K): 4 sqrt(K) + 8 eps.
          // bf16: exact bf16 inputs, fp32 accumulation, one rounding of acc + bias on store
          // (u = eps/2): 1 eps.
          const Tolerance tol = dt == DType::F32 ? Tolerance{4 * std::sqrt(static_cast<double>(c.in)) + 8,
                                                             "fp32 accumulation over K terms"}
                                                 : Tolerance{1, "one rounding of the fp32 result to bf16"};
          const auto name =
              fmt::format("gemm[{}] rows={} in={} out={}{}", gemm.name(), c.rows, c.in, c.outf, c.bias ? " +bias" : "");
          suite.check(name, dt, rel_err(out.values(dt), ref), tol);
          suite.expect(out.guards_intact(), name + ": output guard regions intact");
        }
    }
  });
}
