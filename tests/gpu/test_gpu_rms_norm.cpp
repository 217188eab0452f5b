// gpu/rms_norm: RMSNorm over model rows and the per-head q/k norm (in place) against
// opensci::ops::rms_norm<double>.
#include "gpu_test.hpp"
#include "opensci/ops.hpp"

using namespace opensci::gpu;
using namespace opensci::gpu::test;

namespace {

// fp32: the fp32 sum of squares over dim <= 4099 terms (random-walk error ~ sqrt(dim) u), rsqrtf
// (<= 2 ulp on NVIDIA) and two products per element: a normwise error of a few eps; 32 eps
// leaves room without hiding an indexing bug (which shows as O(1)).
// bf16: two roundings to bf16 per element (the normalised row, then the weighted product), each
// <= u = eps/2 relative: <= 1 eps; 2 eps for the fp32 part on top.
Tolerance tolerance(DType dt) {
  return dt == DType::F32 ? Tolerance{32, "fp32 sum of squares, rsqrtf 2 ulp, 2 products"}
                          : Tolerance{2, "2 bf16 roundings per element (normalised row, weighted product)"};
}

}  // namespace

int main() {
  Suite suite("gpu/rms_norm");
  return run_suite(suite, [&] {
    struct Case {
      int64_t rows, dim;
      bool in_place;  // the per-head q/k norm runs in place on [tokens, heads, head_dim]
      const char* what;
    };
    const Case cases[] = {{7, 96, false, "model rows"},        {3, 2048, false, "model rows, 1.7B hidden"},
                          {5, 4099, false, "odd dim"},         {1, 1, false, "one element"},
                          {11 * 4, 24, true, "q norm, hd 24"}, {9 * 32, 64, true, "q norm, 32 heads of 64"},
                          {6 * 2, 128, true, "k norm, hd 128"}};
    const float eps = 1e-5f;
    uint64_t salt = 100;
    for (const DType dt : {DType::F32, DType::BF16})
      for (const Case& c : cases) {
        auto rng = suite.rng(++salt);
        const auto x = random_values(rng, static_cast<size_t>(c.rows * c.dim), dt, 0.3, 2.0);
        const auto w = random_values(rng, static_cast<size_t>(c.dim), dt, 1.0, 0.1);
        auto d_x = GuardedBuffer::of_values(dt, x);
        auto d_w = GuardedBuffer::of_values(dt, w);
        GuardedBuffer d_out(x.size() * dtype_size(dt));
        const GuardedBuffer& result = c.in_place ? d_x : d_out;
        if (c.in_place)
          head_rms_norm(dt, d_x.data(), d_w.data(), c.rows, 1, c.dim, eps, Stream{});
        else
          rms_norm(dt, d_out.data(), d_x.data(), d_w.data(), c.rows, c.dim, eps, Stream{});

        const auto xd = to_double(x), wd = to_double(w);
        std::vector<double> ref(x.size());
        opensci::ops::rms_norm(ref.data(), xd.data(), wd.data(), c.rows, c.dim, static_cast<double>(eps));
        const auto name = fmt::format("rms_norm rows={} dim={} ({})", c.rows, c.dim, c.what);
        suite.check(name, dt, rel_err(result.values(dt), ref), tolerance(dt));
        suite.expect(result.guards_intact(), name + ": output guard regions intact");
      }
  });
}
