// gpu/rope: rotate-half RoPE in place against opensci::ops::rope<double>.
#include <algorithm>

#include "gpu_test.hpp"
#include "opensci/ops.hpp"

using namespace opensci::gpu;
using namespace opensci::gpu::test;

int main() {
  Suite suite("gpu/rope");
  return run_suite(suite, [&] {
    struct Case {
      int64_t tokens, heads, head_dim;
      double theta;
      int64_t max_pos;
    };
    const Case cases[] = {{9, 4, 24, 1e4, 8}, {33, 2, 64, 1e4, 4095}, {17, 3, 128, 1e5, 2047}, {5, 1, 2, 1e4, 100}};
    uint64_t salt = 200;
    for (const DType dt : {DType::F32, DType::BF16})
      for (const Case& c : cases) {
        auto rng = suite.rng(++salt);
        const auto x = random_values(rng, static_cast<size_t>(c.tokens * c.heads * c.head_dim), dt);
        std::vector<int64_t> pos(static_cast<size_t>(c.tokens));
        std::uniform_int_distribution<int64_t> pick(0, c.max_pos);
        for (auto& p : pos) p = pick(rng);
        pos.front() = 0;  // a pad position
        pos.back() = c.max_pos;
        const auto inv_freq = opensci::ops::rope_inv_freq(c.head_dim, c.theta);
        std::vector<float> inv_freq_f(inv_freq.begin(), inv_freq.end());  // fp32, as transformers' buffer

        auto d_x = GuardedBuffer::of_values(dt, x);
        auto d_pos = GuardedBuffer::of(pos);
        auto d_inv = GuardedBuffer::of(inv_freq_f);
        rope(dt, d_x.data(), d_pos.as<int64_t>(), d_inv.as<float>(), c.tokens, c.heads, c.head_dim, Stream{});

        auto ref = to_double(x);
        opensci::ops::rope(ref.data(), pos.data(), c.tokens, c.heads, c.head_dim, inv_freq);
        // The angle pos * inv_freq is formed in fp32 (as transformers does; inv_freq itself is
        // fp32-rounded), so the rotation carries a phase error up to ~2 |angle| u <= 2 max_pos u
        // on top of the fp32 cos/sin and products (8 eps). bf16: cos/sin cast to bf16, both
        // products and their sum rounded: 3 roundings of u = eps/2 each, 2 eps.
        const Tolerance tol = dt == DType::F32 ? Tolerance{static_cast<double>(2 * c.max_pos + 8),
                                                           "fp32 angle: phase error ~2 pos u, + 8 eps"}
                                               : Tolerance{2, "cos/sin cast, 2 products and their sum rounded to bf16"};
        const auto name = fmt::format("rope tokens={} heads={} hd={} theta={:g} pos<={}", c.tokens, c.heads, c.head_dim,
                                      c.theta, c.max_pos);
        suite.check(name, dt, rel_err(d_x.values(dt), ref), tol);
        suite.expect(d_x.guards_intact(), name + ": guard regions intact");
      }
  });
}
