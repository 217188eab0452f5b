// The sharded reference forward on real MPI ranks (mpiexec as a subprocess, oversubscribed):
// layouts the matrix cells do not cover (3 ranks with uneven head and position blocks, sp x ep
// on the same two ranks, a batch where a dp group gets no rows), fused checkpoints read by
// block, traffic equal to the analytic all-to-all minimum, and that the bit-identity check can
// fail (a rank using local RoPE positions).
#include <fmt/format.h>

#include "opensci/convert.hpp"
#include "opensci/error.hpp"
#include "opensci/forward.hpp"
#include "opensci/harness/toy.hpp"
#include "opensci/parallel/cell_parallel.hpp"
#include "opensci/parallel/launcher.hpp"
#include "opensci/parallel/layout.hpp"
#include "../unit/test_helpers.hpp"

using namespace opensci;
using namespace opensci::parallel;
using opensci::test::ScratchDir;
namespace fs = std::filesystem;

namespace {

bool mpi_or_skip() {
  std::string why;
  if (launcher_available(&why)) return true;
  fmt::print("OPENSCI-SKIPPED: {}\n", why);
  return false;
}

fs::path toy(const ScratchDir& dir, const std::string& name, const std::string& remote_code = "") {
  harness::ToyOptions t;
  t.config = test::source_dir() / "toy_configs" / (name + ".json");
  t.seed = 1;
  t.out = dir / name;
  if (!remote_code.empty()) t.remote_code = test::source_dir() / "fixtures/remote_code" / remote_code;
  harness::build_toy(t);
  return t.out;
}

TokenBatch padded_batch() { return TokenBatch::from_json_file(test::source_dir() / "fixtures/tokens/padded-batch.json"); }

// Runs the sharded forward and returns (launch, its output).
std::pair<LaunchResult, ForwardResult> run_sharded(const ScratchDir& dir, const fs::path& model, const TokenBatch& tokens,
                                                    int sp, int ep, int world, const std::string& precision = "fp64",
                                                    const std::string& fault = "") {
  const auto tag = fmt::format("{}-sp{}-ep{}-w{}-{}{}", model.filename().string(), sp, ep, world, precision, fault);
  write_tokens_json(tokens, dir / (tag + ".tokens.json"));
  LaunchOptions o;
  o.program = OPENSCI_CLI;
  o.model = model;
  o.tokens_file = dir / (tag + ".tokens.json");
  o.work = dir / tag;
  o.sp = sp;
  o.ep = ep;
  o.world = world;
  o.precision = precision;
  o.inject_fault = fault;
  o.timeout = std::chrono::seconds(60);
  auto launch = launch_sharded(o);
  INFO("launch: " << launch.summary << "\ncommand: " << launch.command);
  REQUIRE(launch.ok);
  return {launch, read_forward_output(launch.output)};
}

// Every value's bits, logits and hidden states.
int64_t differing_values(const ForwardResult& a, const ForwardResult& b) {
  int64_t n = a.logits.size() == b.logits.size() ? 0 : 1;
  for (size_t i = 0; i < std::min(a.logits.size(), b.logits.size()); ++i) n += a.logits[i] != b.logits[i];
  std::map<std::string, const std::vector<float>*> theirs;
  for (const auto& [name, v] : b.hiddens) theirs[name] = &v;
  for (const auto& [name, v] : a.hiddens) {
    if (!theirs.count(name) || theirs[name]->size() != v.size()) {
      ++n;
      continue;
    }
    for (size_t i = 0; i < v.size(); ++i) n += v[i] != (*theirs[name])[i];
  }
  return n + static_cast<int64_t>(a.hiddens.size() != b.hiddens.size());
}

}  // namespace

TEST_CASE("blocks split items contiguously, larger blocks first") {
  CHECK(block(10, 4, 0).begin == 0);
  CHECK(block(10, 4, 0).end == 3);
  CHECK(block(10, 4, 1).end == 6);
  CHECK(block(10, 4, 2).size() == 2);
  CHECK(block(10, 4, 3).end == 10);
  CHECK(block(3, 4, 3).size() == 0);  // an empty block: that dp group holds no rows
  CHECK(block_of(6, 4, 5) == 3);      // 6 experts over 4 ranks: 2, 2, 1, 1
  CHECK(block_of(6, 4, 3) == 1);
  // GQA: 4 query heads, 2 kv heads; over 4 ranks each kv head goes to two ranks.
  CHECK(kv_heads_for({1, 2}, 4, 2).begin == 0);
  CHECK(kv_heads_for({2, 3}, 4, 2).begin == 1);
  // 8 heads / 2 kv over 3 ranks: heads 3..5 read kv heads 0 and 1.
  CHECK(kv_heads_for({3, 6}, 8, 2).size() == 2);
}

TEST_CASE("the sp x ep grid: sp groups are contiguous, ep groups span the dp groups") {
  // sp2 x ep2 on 4 ranks: sp groups {0,1} {2,3}; ep groups {0,2} {1,3}.
  const auto r2 = Layout::make(4, 2, 2, 2);
  CHECK(r2.dp_rank() == 1);
  CHECK(r2.sp_rank() == 0);
  CHECK(r2.ep_group() == 0);
  CHECK(r2.ep_rank() == 1);
  CHECK(Layout::make(4, 2, 2, 1).ep_group() == 1);
  CHECK(r2.describe() == "rank 2 of 4: dp 1/2 sp 0/2 ep 1/2");
  REQUIRE_ERROR_MENTIONS(Layout::make(4, 3, 1, 0), "sp 3 does not divide the 4 ranks");
  REQUIRE_ERROR_MENTIONS(Layout::make(2, 1, 4, 0), "ep 4 does not divide the 2 ranks");
}

TEST_CASE("uneven layouts on real ranks are bit-identical to the unsharded golden forward") {
  if (!mpi_or_skip()) return;
  ScratchDir dir("sharded");
  const auto tokens = padded_batch();
  SECTION("sp3: heads 2,1,1 and positions 4,3,3; 8 heads over 3 ranks read 2 kv heads unevenly") {
    for (const auto& [name, code] : {std::pair{"opensci-qwen3", "opensci_qwen3"}, std::pair{"opensci-moe", "opensci_moe"}}) {
      INFO(name);
      const auto model = toy(dir, name, code);
      const auto ref = forward(Checkpoint(model), tokens, {Precision::Golden, true});
      const auto [launch, out] = run_sharded(dir, model, tokens, 3, 1, 3);
      CHECK(differing_values(out, ref) == 0);
    }
  }
  SECTION("sp2 x ep2 on the same 2 ranks, and ep2 x dp2 on 4 with a single-row batch (empty dp groups)") {
    const auto model = toy(dir, "qwen3-moe");
    const auto ref = forward(Checkpoint(model), tokens, {Precision::Golden, true});
    CHECK(differing_values(run_sharded(dir, model, tokens, 2, 2, 2).second, ref) == 0);
    const auto single = TokenBatch::from_json_file(test::source_dir() / "fixtures/tokens/single.json");
    const auto ref1 = forward(Checkpoint(model), single, {Precision::Golden, true});
    const auto [launch, out] = run_sharded(dir, model, single, 1, 4, 4);  // dp 4, one row: 3 ranks have no tokens
    CHECK(differing_values(out, ref1) == 0);
    int moe_layers = 0;  // rank 3 holds no token, and still takes part in both sparse layers' all-to-alls
    for (const auto& l : launch.rank_status[3]["layers"]) moe_layers += l["kind"] == "moe" ? 1 : 0;
    CHECK(moe_layers == 2);
  }
}

TEST_CASE("every rank reads its expert block of a fused checkpoint") {
  if (!mpi_or_skip()) return;
  ScratchDir dir("fused");
  const auto model = toy(dir, "opensci-moe", "opensci_moe");
  convert::ConvertOptions c;
  c.input = model;
  c.output = dir / "opensci-moe-fused";
  c.to = convert::Format::HfFused;
  convert::convert_checkpoint(c);
  REQUIRE(detect_expert_layouts(Checkpoint(c.output))[1] == ExpertLayout::Fused);
  const auto tokens = padded_batch();
  const auto ref = forward(Checkpoint(model), tokens, {Precision::Golden, true});  // per-expert, unsharded
  CHECK(differing_values(run_sharded(dir, c.output, tokens, 1, 4, 4).second, ref) == 0);
}

TEST_CASE("all-to-all bytes equal the analytic minimum, and ranks send nothing else per layer") {
  if (!mpi_or_skip()) return;
  ScratchDir dir("traffic");
  const auto model = toy(dir, "opensci-moe", "opensci_moe");
  const auto [launch, out] = run_sharded(dir, model, padded_batch(), 2, 2, 4, "fp32");
  const auto cfg = load_config(model / "config.json");
  for (const auto& st : launch.rank_status) {
    INFO(st.dump());
    REQUIRE(st["layers"].size() == static_cast<size_t>(cfg.num_layers + 2));  // 4 attention + 2 MoE layers
    for (const auto& l : st["layers"]) {
      CHECK(l["sent"] == l["minimum"]);
      CHECK(l["sent"].get<uint64_t>() > 0);
    }
    // Attention, rank r holds 10/2 positions x its dp rows: q (8 heads) + k, v (2 kv heads), 4 bytes,
    // half of the heads go to the other sp rank, and the other half of the output comes back.
    const int rows = st["rank"].get<int>() < 2 ? 2 : 1;  // 3 rows over dp 2: 2 and 1
    const auto D = static_cast<uint64_t>(cfg.head_dim), half = static_cast<uint64_t>(cfg.num_heads / 2);
    const uint64_t tokens = static_cast<uint64_t>(rows) * 5;
    REQUIRE(cfg.num_kv_heads == 2);  // the other half of the query heads reads one kv head
    const uint64_t expected = tokens * (half + 2 * 1) * D * 4 + tokens * half * D * 4;
    CHECK(st["layers"][0]["sent"].get<uint64_t>() == expected);
  }
}

TEST_CASE("the bit-identity check fails a rank that uses local RoPE positions") {
  if (!mpi_or_skip()) return;
  ScratchDir dir("positions");
  const auto model = toy(dir, "opensci-ref", "opensci_ref");
  const auto tokens = padded_batch();
  const auto ref = forward(Checkpoint(model), tokens, {Precision::Golden, true});
  const auto [launch, out] = run_sharded(dir, model, tokens, 2, 1, 2, "fp64", "1:positions");
  const auto n = differing_values(out, ref);
  CHECK(n > 0);
  // Rank 1 holds positions 5..9: its logits differ by far more than any tolerance.
  double worst = 0;
  for (size_t i = 0; i < out.logits.size(); ++i) worst = std::max(worst, std::abs(double(out.logits[i]) - ref.logits[i]));
  CHECK(worst > 1e-3);
}
