#include <cmath>
#include <nlohmann/json.hpp>

#include "opensci/error.hpp"
#include "opensci/forward.hpp"
#include "opensci/harness/toy.hpp"
#include "opensci/ops.hpp"
#include "test_helpers.hpp"

using namespace opensci;
using opensci::test::ScratchDir;

namespace {

std::filesystem::path make_toy(const ScratchDir& dir, const std::string& config, uint64_t seed = 1) {
  harness::ToyOptions o;
  o.config = opensci::test::source_dir() / "toy_configs" / (config + ".json");
  o.seed = seed;
  o.out = dir / config;
  harness::build_toy(o);
  return o.out;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(double(a[i]) - double(b[i])));
  return m;
}

void edit_config(const std::filesystem::path& dir, const std::function<void(nlohmann::json&)>& edit) {
  auto j = nlohmann::json::parse(opensci::test::read_text(dir / "config.json"));
  edit(j);
  opensci::test::write_text(dir / "config.json", j.dump());
}

}  // namespace

TEST_CASE("ops: hand-computable cases") {
  // RMSNorm of (3, 4): mean square 12.5, so x / sqrt(12.5) times the weight.
  const double x[2] = {3, 4}, w[2] = {1, 2};
  double out[2];
  ops::rms_norm(out, x, w, 1, 2, 0.0);
  CHECK(out[0] == Approx(3 / std::sqrt(12.5)));
  CHECK(out[1] == Approx(8 / std::sqrt(12.5)));
  // RoPE at position 0 is the identity; at position 1 it rotates pairs (i, i + d/2).
  double v[4] = {1, 2, 3, 4};
  const int64_t pos0 = 0, pos1 = 1;
  ops::rope(v, &pos0, 1, 1, 4, ops::rope_inv_freq(4, 10000));
  CHECK(v[0] == 1);
  CHECK(v[3] == 4);
  double u[4] = {1, 0, 0, 0};
  ops::rope(u, &pos1, 1, 1, 4, ops::rope_inv_freq(4, 10000));
  CHECK(u[0] == Approx(std::cos(1.0)));
  CHECK(u[2] == Approx(std::sin(1.0)));
  // Attention over a single visible key returns its value; a query with no visible key gets zeros.
  const double q[2] = {0.3, -1}, k[2] = {2, 5}, val[2] = {7, -8};
  const int64_t mask1[1] = {1}, mask0[1] = {0};
  double o[2];
  ops::causal_attention(o, q, k, val, mask1, 1, 1, 1, 1, 2);
  CHECK(o[0] == Approx(7));
  CHECK(o[1] == Approx(-8));
  ops::causal_attention(o, q, k, val, mask0, 1, 1, 1, 1, 2);
  CHECK(o[0] == 0);
  // SwiGLU: silu(1) * 2.
  double g[1] = {1};
  const double up[1] = {2};
  ops::swiglu(g, up, 1);
  CHECK(g[0] == Approx(2 / (1 + std::exp(-1.0))));
}

TEST_CASE("toy checkpoints are deterministic and realistic in scale") {
  ScratchDir a("toy"), b("toy");
  const auto pa = make_toy(a, "opensci-ref", 7), pb = make_toy(b, "opensci-ref", 7);
  CHECK(opensci::test::read_text(pa / "model.safetensors") == opensci::test::read_text(pb / "model.safetensors"));
  const Checkpoint ck(pa);
  CHECK_FALSE(ck.contains("lm_head.weight"));  // tied
  CHECK(ck.contains("model.layers.0.self_attn.q_layernorm.weight"));
  CHECK(ck.contains("model.layers.0.self_attn.o_proj.bias"));
  CHECK(ck.contains("model.layers.2.mlp.down_proj.bias"));
  // Pinned values: the generator is integer-only, so these hold on every IEEE-754 machine.
  const auto emb = ck.file_of("model.embed_tokens.weight").read_f32("model.embed_tokens.weight");
  double sum2 = 0;
  for (float v : emb) sum2 += double(v) * v;
  CHECK(std::sqrt(sum2 / double(emb.size())) == Approx(0.02).epsilon(0.05));  // std ≈ initializer_range
  ScratchDir c("toy");
  const auto pc = make_toy(c, "opensci-ref", 8);
  CHECK(opensci::test::read_text(pc / "model.safetensors") != opensci::test::read_text(pa / "model.safetensors"));
}

TEST_CASE("golden and fast paths agree on every toy config") {
  ScratchDir dir("fwd");
  for (const auto* name : {"opensci-ref", "opensci-qwen3", "opensci-ref-theta"}) {
    INFO(name);
    const Checkpoint ck(make_toy(dir, name));
    const auto tokens = TokenBatch::from_list({1, 5, 9, 200, 17, 3, 3, 250});
    const auto golden = forward(ck, tokens, {Precision::Golden, true});
    const auto fast = forward(ck, tokens, {Precision::Fast, true});
    // fp32 vs fp64: see matrix/tolerances.json "fp32-cpu" for why 1e-4 holds at toy sizes.
    CHECK(max_abs_diff(golden.logits, fast.logits) < 1e-4);
    REQUIRE(golden.hiddens.size() == fast.hiddens.size());
    REQUIRE(golden.hiddens.size() == size_t(3 * ck.config().num_layers + 2));
    // Logits are not degenerate: spread well above fp32 noise.
    double mx = 0;
    for (float v : golden.logits) mx = std::max(mx, std::abs(double(v)));
    CHECK(mx > 0.05);
  }
}

TEST_CASE("a left-padded row computes what the unpadded row computes") {
  ScratchDir dir("pad");
  const Checkpoint ck(make_toy(dir, "opensci-qwen3"));
  const std::vector<int64_t> ids{11, 42, 7, 99};
  const auto single = forward(ck, TokenBatch::from_list(ids), {Precision::Golden, false});
  opensci::test::write_text(dir / "tokens.json", R"({"input_ids": [[0, 0, 11, 42, 7, 99], [5, 6, 11, 42, 7, 99]],
                                                     "attention_mask": [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]})");
  const auto batch = TokenBatch::from_json_file(dir / "tokens.json");
  CHECK(batch.position_ids == std::vector<int64_t>{0, 0, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5});
  const auto padded = forward(ck, batch, {Precision::Golden, false});
  const int64_t V = padded.vocab;
  for (int64_t s = 0; s < 4; ++s)
    for (int64_t v = 0; v < V; ++v)
      REQUIRE(padded.logits[size_t((2 + s) * V + v)] == Approx(single.logits[size_t(s * V + v)]).margin(1e-6));
  // The second row sees different context: its logits differ.
  CHECK(std::abs(padded.logits[size_t((6 + 2) * V)] - single.logits[0]) > 1e-6);
}

TEST_CASE("bad inputs are clear errors naming file and tensor and shape") {
  ScratchDir dir("bad");
  const auto model = make_toy(dir, "opensci-ref");
  const auto ids = TokenBatch::from_list({1, 2, 3});
  SECTION("token id out of range") {
    REQUIRE_ERROR_MENTIONS(forward(Checkpoint(model), TokenBatch::from_list({1, 384}), {}), "token id 384", "[0, 1]",
                           "[0, 384)");
  }
  SECTION("a shape that does not match the config") {
    edit_config(model, [](auto& j) { j["intermediate_size"] = 170; });
    REQUIRE_ERROR_MENTIONS(forward(Checkpoint(model), ids, {}), "model.safetensors", "'model.layers.0.mlp.down_proj.weight'",
                           "[96, 160]", "[96, 170]");
    edit_config(model, [](auto& j) {
      j["intermediate_size"] = 160;
      j["num_key_value_heads"] = 2;
    });
    REQUIRE_ERROR_MENTIONS(forward(Checkpoint(model), ids, {}), "model.safetensors", "'model.layers.0.self_attn.k_proj.bias'",
                           "[96]", "[48]");
  }
  SECTION("a config missing a key") {
    edit_config(model, [](auto& j) { j.erase("num_hidden_layers"); });
    REQUIRE_ERROR_MENTIONS(Checkpoint(model), "config.json", "num_hidden_layers");
  }
  SECTION("a lineage mismatch: q_norm tensors under an open-sci-ref config") {
    edit_config(model, [](auto& j) { j.erase("qk_layernorm"); });
    REQUIRE_ERROR_MENTIONS(forward(Checkpoint(model), ids, {}), "missing tensor", "k_norm.weight", "opensci-qwen3");
  }
  SECTION("untied config without lm_head") {
    edit_config(model, [](auto& j) { j["tie_word_embeddings"] = false; });
    REQUIRE_ERROR_MENTIONS(forward(Checkpoint(model), ids, {}), "missing tensor 'lm_head.weight'", "[384, 96]");
  }
  SECTION("truncated checkpoint") {
    const auto bytes = opensci::test::read_text(model / "model.safetensors");
    opensci::test::write_text(model / "model.safetensors", bytes.substr(0, bytes.size() / 2));
    REQUIRE_ERROR_MENTIONS(Checkpoint(model), "model.safetensors", "truncated");
  }
  SECTION("malformed tokens file") {
    opensci::test::write_text(dir / "t.json", R"({"input_ids": [[1, 2], [3]]})");
    REQUIRE_ERROR_MENTIONS(TokenBatch::from_json_file(dir / "t.json"), "t.json", "different lengths");
    opensci::test::write_text(dir / "t.json", R"({"input_ids": [[1, 2]], "attention_mask": [[1, 2]]})");
    REQUIRE_ERROR_MENTIONS(TokenBatch::from_json_file(dir / "t.json"), "t.json", "attention_mask[0, 1] is 2");
  }
}

TEST_CASE("CLI exits non-zero with the message on bad input") {
  ScratchDir dir("cli");
  const auto model = make_toy(dir, "opensci-ref");
  const auto cmd = std::string(OPENSCI_CLI) + " forward --model " + model.string() + " --tokens 1,999 --out " +
                   (dir / "o.safetensors").string() + " 2> " + (dir / "err.txt").string();
  const int status = std::system(cmd.c_str());
  CHECK(WEXITSTATUS(status) == 2);
  CHECK(opensci::test::read_text(dir / "err.txt").find("token id 999") != std::string::npos);
}
