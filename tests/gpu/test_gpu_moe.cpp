// gpu/moe: routing (fp32 softmax, top-k with ties to the lower index, renormalisation), bucketing
// by expert, the gather and the weighted scatter-add of the expert dispatch, and the dispatch
// end to end. The oracle is the Qwen3-MoE routing as the CPU reference implements it
// (reference/src/forward.cpp, Forward::route): written out here in double.
#include <algorithm>
#include <numeric>

#include "gpu_test.hpp"

using namespace opensci::gpu;
using namespace opensci::gpu::test;

namespace {

struct Routing {
  std::vector<int32_t> expert;  // [T, K]
  std::vector<double> weight;   // [T, K]
};

Routing route_reference(const std::vector<float>& logits, int64_t T, int64_t E, int64_t K, bool renorm) {
  Routing r;
  for (int64_t t = 0; t < T; ++t) {
    const float* row = logits.data() + t * E;
    const double mx = *std::max_element(row, row + E);
    std::vector<double> p(static_cast<size_t>(E));
    double sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += p[static_cast<size_t>(e)] = std::exp(row[e] - mx);
    for (auto& x : p) x /= sum;
    std::vector<int64_t> order(static_cast<size_t>(E));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return p[static_cast<size_t>(a)] > p[static_cast<size_t>(b)]; });
    double top = 0;
    for (int64_t k = 0; k < K; ++k) top += p[static_cast<size_t>(order[static_cast<size_t>(k)])];
    for (int64_t k = 0; k < K; ++k) {
      const auto e = order[static_cast<size_t>(k)];
      r.expert.push_back(static_cast<int32_t>(e));
      r.weight.push_back(renorm ? p[static_cast<size_t>(e)] / top : p[static_cast<size_t>(e)]);
    }
  }
  return r;
}

}  // namespace

int main() {
  Suite suite("gpu/moe");
  return run_suite(suite, [&] {
    struct Case {
      int64_t tokens, experts, k;
      bool renorm, ties;
    };
    const Case cases[] = {{30, 6, 2, true, false},
                          {17, 128, 8, true, false},
                          {9, 8, 3, false, false},
                          {5, 8, 4, true, true},
                          {1, 4, 4, false, false}};
    uint64_t salt = 700;
    for (const DType dt : {DType::F32, DType::BF16})
      for (const Case& c : cases) {
        auto rng = suite.rng(++salt);
        const int64_t T = c.tokens, E = c.experts, K = c.k, H = 40;
        // Logits on a grid 0.125 apart (exact in bf16) plus a shuffle per token: no near-ties
        // that rounding could reorder, unless the case asks for exact ties (all logits equal).
        std::vector<float> logits(static_cast<size_t>(T * E), 0.0f);
        if (!c.ties)
          for (int64_t t = 0; t < T; ++t) {
            std::vector<int64_t> levels(static_cast<size_t>(E));
            std::iota(levels.begin(), levels.end(), 0);
            std::shuffle(levels.begin(), levels.end(), rng);
            for (int64_t e = 0; e < E; ++e)
              logits[static_cast<size_t>(t * E + e)] =
                  0.125f * static_cast<float>(levels[static_cast<size_t>(e)] % 64) - 2.0f +
                  (levels[static_cast<size_t>(e)] >= 64 ? 0.0625f : 0.0f);
          }
        const auto ref = route_reference(logits, T, E, K, c.renorm);
        const auto shape =
            fmt::format("tokens={} experts={} k={}{}{}", T, E, K, c.renorm ? " renorm" : "", c.ties ? " ties" : "");

        auto d_logits = GuardedBuffer::of_values(dt, logits);
        GuardedBuffer d_expert(static_cast<size_t>(T * K) * sizeof(int32_t)),
            d_weight(static_cast<size_t>(T * K) * sizeof(float));
        moe_route(dt, d_logits.data(), d_expert.as<int32_t>(), d_weight.as<float>(), T, E, K, c.renorm, Stream{});
        const auto experts = d_expert.raw<int32_t>();
        suite.expect(experts == ref.expert, "moe_route " + shape + ": top-k experts and their order");
        // Routing weights are fp32 whatever the storage dtype: softmax with expf (<= 2 ulp) and
        // an fp32 sum over E terms, a division, the renormalising division: 16 fp32 eps.
        suite.check("moe_route weights " + shape, DType::F32, rel_err(d_weight.raw<float>(), ref.weight),
                    {16, "fp32 softmax over E, renormalisation"});
        suite.expect(d_expert.guards_intact() && d_weight.guards_intact(), "moe_route " + shape + ": guards intact");

        // Buckets: (token, slot) pairs per expert, tokens ascending.
        GuardedBuffer d_offsets(static_cast<size_t>(E + 1) * sizeof(int32_t)),
            d_token(static_cast<size_t>(T * K) * sizeof(int32_t)), d_slot(static_cast<size_t>(T * K) * sizeof(int32_t));
        moe_bucket(d_expert.as<int32_t>(), T, K, E, d_offsets.as<int32_t>(), d_token.as<int32_t>(),
                   d_slot.as<int32_t>(), Stream{});
        std::vector<int32_t> offsets{0}, token_of, slot_of;
        for (int64_t e = 0; e < E; ++e) {
          for (int64_t i = 0; i < T * K; ++i)
            if (ref.expert[static_cast<size_t>(i)] == e) {
              token_of.push_back(static_cast<int32_t>(i / K));
              slot_of.push_back(static_cast<int32_t>(i % K));
            }
          offsets.push_back(static_cast<int32_t>(token_of.size()));
        }
        suite.expect(d_offsets.raw<int32_t>() == offsets && d_token.raw<int32_t>() == token_of &&
                         d_slot.raw<int32_t>() == slot_of,
                     "moe_bucket " + shape + ": offsets, tokens and slots per expert");
        suite.expect(d_offsets.guards_intact() && d_token.guards_intact() && d_slot.guards_intact(),
                     "moe_bucket " + shape + ": guards intact");

        // Dispatch end to end with identity experts: gather each bucket, "run" the expert (y = x),
        // scatter-add weight * y, experts in increasing index. out[t] = sum_k w_k h[t].
        const auto h = random_values(rng, static_cast<size_t>(T * H), dt);
        auto d_h = GuardedBuffer::of_values(dt, h);
        GuardedBuffer d_out(static_cast<size_t>(T * H) * dtype_size(dt));
        OPENSCI_GPU_CHECK(rt::memset(d_out.data(), 0, static_cast<size_t>(T * H) * dtype_size(dt), Stream{}));
        GuardedBuffer d_x(static_cast<size_t>(T * H) * dtype_size(dt));
        for (int64_t e = 0; e < E; ++e) {
          const int32_t begin = offsets[static_cast<size_t>(e)], n = offsets[static_cast<size_t>(e + 1)] - begin;
          if (n == 0) continue;
          gather_rows(dt, d_x.data(), d_h.data(), d_token.as<int32_t>() + begin, n, H, Stream{});
          scatter_add_weighted(dt, d_out.data(), d_x.data(), d_token.as<int32_t>() + begin,
                               d_slot.as<int32_t>() + begin, d_weight.as<float>(), K, n, H, Stream{});
        }
        std::vector<double> want(static_cast<size_t>(T * H), 0.0);
        for (int64_t t = 0; t < T; ++t)
          for (int64_t k = 0; k < K; ++k)
            for (int64_t d = 0; d < H; ++d)
              want[static_cast<size_t>(t * H + d)] +=
                  ref.weight[static_cast<size_t>(t * K + k)] * h[static_cast<size_t>(t * H + d)];
        // Per (token, expert): the weight cast to the storage dtype, the product and the add each
        // round once (transformers' bf16 index_add_ loop); K adds per token: (K + 2) / 2 eps, + 1
        // for the fp32 routing weights.
        const Tolerance tol{static_cast<double>(K + 2) / 2 + 1, "weight cast, product, K accumulating adds"};
        suite.check("moe dispatch (gather, scatter_add_weighted) " + shape, dt, rel_err(d_out.values(dt), want), tol);
        suite.expect(d_out.guards_intact() && d_x.guards_intact(), "moe dispatch " + shape + ": guards intact");
      }
  });
}
