// gpu/embedding: the embedding gather against a CPU gather (forward.cpp's copy_n), bitwise.
#include "gpu_test.hpp"

using namespace opensci::gpu;
using namespace opensci::gpu::test;

int main() {
  Suite suite("gpu/embedding");
  return run_suite(suite, [&] {
    struct Case {
      int64_t vocab, hidden, tokens;
    };
    const Case cases[] = {{384, 96, 17}, {50, 2048, 5}, {1000, 33, 64}, {7, 1, 3}};
    uint64_t salt = 0;
    for (const DType dt : {DType::F32, DType::BF16})
      for (const Case& c : cases) {
        auto rng = suite.rng(++salt);
        const auto table = random_values(rng, static_cast<size_t>(c.vocab * c.hidden), dt);
        std::vector<int64_t> ids(static_cast<size_t>(c.tokens));
        std::uniform_int_distribution<int64_t> pick(0, c.vocab - 1);
        for (auto& id : ids) id = pick(rng);
        ids.back() = c.vocab - 1;  // the last row of the table
        auto d_table = GuardedBuffer::of_values(dt, table);
        auto d_ids = GuardedBuffer::of(ids);
        GuardedBuffer out(static_cast<size_t>(c.tokens * c.hidden) * dtype_size(dt));
        embedding(dt, out.data(), d_table.data(), d_ids.as<int64_t>(), c.tokens, c.hidden, c.vocab, Stream{});

        std::vector<double> ref(static_cast<size_t>(c.tokens * c.hidden));
        for (int64_t t = 0; t < c.tokens; ++t)
          for (int64_t i = 0; i < c.hidden; ++i)
            ref[static_cast<size_t>(t * c.hidden + i)] =
                table[static_cast<size_t>(ids[static_cast<size_t>(t)] * c.hidden + i)];
        const auto name = fmt::format("embedding vocab={} hidden={} tokens={}", c.vocab, c.hidden, c.tokens);
        suite.check(name, dt, rel_err(out.values(dt), ref), {0.0, "a gather copies bits"});
        suite.expect(out.guards_intact(), name + ": output guard regions intact");
      }
  });
}
