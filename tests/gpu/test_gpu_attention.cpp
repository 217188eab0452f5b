// gpu/attention: the fused flash-style causal GQA attention with key padding against
// opensci::ops::causal_attention<double>, across head dims (each kernel instantiation), key
// tile boundaries, GQA ratios, left padding and sequences longer than one block.
#include "gpu_test.hpp"
#include "opensci/ops.hpp"

using namespace opensci::gpu;
using namespace opensci::gpu::test;

int main() {
  Suite suite("gpu/attention");
  return run_suite(suite, [&] {
    struct Case {
      int64_t batch, seq, heads, kv_heads, head_dim;
      int64_t pad;     // left padding of the last batch row
      double q_scale;  // larger: peakier softmax (online max rescaling matters)
    };
    const Case cases[] = {
        {1, 1, 2, 2, 32, 0, 1.0},     // one token
        {2, 45, 4, 2, 24, 7, 1.0},    // GQA 2, padding, hd 24 (kernel hd<=32)
        {1, 130, 4, 1, 64, 0, 1.0},   // MQA, 5 query blocks, 5 key tiles of 32
        {2, 70, 2, 2, 128, 33, 1.0},  // hd 128 (key tile 16), a whole padded query block
        {1, 97, 2, 2, 64, 0, 4.0},    // peaky scores
        {2, 33, 2, 1, 96, 33, 1.0},   // a fully padded row: every query sees nothing -> zeros
    };
    uint64_t salt = 300;
    for (const DType dt : {DType::F32, DType::BF16})
      for (const Case& c : cases) {
        auto rng = suite.rng(++salt);
        const auto T = c.batch * c.seq;
        const auto q = random_values(rng, static_cast<size_t>(T * c.heads * c.head_dim), dt, 0.0, c.q_scale);
        const auto k = random_values(rng, static_cast<size_t>(T * c.kv_heads * c.head_dim), dt);
        const auto v = random_values(rng, static_cast<size_t>(T * c.kv_heads * c.head_dim), dt);
        std::vector<int64_t> mask(static_cast<size_t>(T), 1);
        for (int64_t s = 0; s < c.pad; ++s) mask[static_cast<size_t>((c.batch - 1) * c.seq + s)] = 0;

        auto d_q = GuardedBuffer::of_values(dt, q), d_k = GuardedBuffer::of_values(dt, k),
             d_v = GuardedBuffer::of_values(dt, v);
        auto d_mask = GuardedBuffer::of(mask);
        GuardedBuffer out(q.size() * dtype_size(dt));
        causal_attention(dt, out.data(), d_q.data(), d_k.data(), d_v.data(), d_mask.as<int64_t>(), c.batch, c.seq,
                         c.heads, c.kv_heads, c.head_dim, Stream{});

        const auto qd = to_double(q), kd = to_double(k), vd = to_double(v);
        std::vector<double> ref(q.size());
        opensci::ops::causal_attention(ref.data(), qd.data(), kd.data(), vd.data(), mask.data(), c.batch, c.seq,
                                       c.heads, c.kv_heads, c.head_dim);
        // fp32: head_dim-term dot products, exp (<= 2 ulp), the online max rescaling once per key
        // tile and sums over <= seq keys: errors of a few tens of u; 128 eps stays far below
        // what a wrong mask, tile edge or head mapping gives (O(1)).
        // bf16: P is rounded to bf16 before P.V (flash-attention's precision point; u per weight,
        // averaging over the keys) and the output once more (u): 4 eps covers both with margin.
        const Tolerance tol = dt == DType::F32 ? Tolerance{128, "fp32 dots, exp, per-tile rescaling, key sums"}
                                               : Tolerance{4, "P and the output rounded to bf16"};
        const auto name = fmt::format("attention b={} s={} h={}/{} hd={} pad={} qscale={:g}", c.batch, c.seq, c.heads,
                                      c.kv_heads, c.head_dim, c.pad, c.q_scale);
        const auto got = out.values(dt);
        suite.check(name, dt, rel_err(got, ref), tol);
        suite.expect(out.guards_intact(), name + ": output guard regions intact");
        if (c.pad == c.seq) {  // queries with no visible key must be exactly 0, like the CPU reference
          bool zeros = true;
          for (int64_t i = (c.batch - 1) * c.seq * c.heads * c.head_dim; i < T * c.heads * c.head_dim; ++i)
            zeros = zeros && got[static_cast<size_t>(i)] == 0.0f;
          suite.expect(zeros, name + ": fully padded row gives zeros");
        }
      }
  });
}
