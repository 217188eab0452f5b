// The Qwen3-MoE semantics of the reference: config keys, routing, the MoE block in the forward
// pass (hand-checkable equivalences with dense MLPs), golden vs fast, and both expert layouts.
#include <cmath>
#include <nlohmann/json.hpp>

#include "checkpoint_builder.hpp"
#include "opensci/checkpoint.hpp"
#include "opensci/config.hpp"
#include "opensci/convert.hpp"
#include "opensci/error.hpp"
#include "opensci/forward.hpp"
#include "opensci/ops.hpp"
#include "test_helpers.hpp"

using namespace opensci;
using nlohmann::json;
using opensci::test::ScratchDir;
namespace fs = std::filesystem;

namespace {

json toy(const char* name) { return test::load_json(test::source_dir() / "toy_configs" / name); }

ForwardResult run_forward(const fs::path& dir, Precision p) {
  ForwardOptions o;
  o.precision = p;
  const auto tokens = TokenBatch::from_list({1, 7, 3, 12, 9, 4, 15, 2, 11});
  return forward(Checkpoint(dir), tokens, o);
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(static_cast<double>(a[i]) - b[i]));
  return m;
}

std::vector<int64_t> argmax_rows(const ForwardResult& r) {
  std::vector<int64_t> out;
  for (int64_t t = 0; t < r.batch * r.seq; ++t) {
    const auto* row = r.logits.data() + t * r.vocab;
    out.push_back(std::max_element(row, row + r.vocab) - row);
  }
  return out;
}

// One sparse layer (E = 4, top-2, I = 3) between nothing else: vocab 16, H = 8.
json one_layer_moe(bool renormalise) {
  return json{{"model_type", "qwen3_moe"},  {"vocab_size", 16},       {"hidden_size", 8},
              {"intermediate_size", 6},     {"moe_intermediate_size", 3}, {"num_hidden_layers", 1},
              {"num_attention_heads", 2},   {"num_key_value_heads", 1},   {"head_dim", 4},
              {"num_experts", 4},           {"num_experts_per_tok", 2},   {"norm_topk_prob", renormalise},
              {"tie_word_embeddings", false}};
}

// The same model with layer 0 dense (intermediate_size `dense_i`).
json one_layer_dense(int64_t dense_i) {
  auto j = one_layer_moe(true);
  j["mlp_only_layers"] = {0};
  j["intermediate_size"] = dense_i;
  return j;
}

std::vector<float> scaled(std::vector<float> v, float f) {
  for (auto& x : v) x *= f;
  return v;
}

}  // namespace

TEST_CASE("topk routing: hand-computed softmax, renormalisation on and off, tie order", "[moe]") {
  // softmax(log [1, 2, 3, 4]) = [0.1, 0.2, 0.3, 0.4]
  const double logits[] = {std::log(1.0), std::log(2.0), std::log(3.0), std::log(4.0)};
  auto r = ops::topk_routing(logits, 4, 2, false);
  REQUIRE(r.size() == 2);
  CHECK(r[0].first == 3);
  CHECK(r[0].second == Approx(0.4).epsilon(1e-15));
  CHECK(r[1].first == 2);
  CHECK(r[1].second == Approx(0.3).epsilon(1e-15));
  r = ops::topk_routing(logits, 4, 2, true);
  CHECK(r[0].second == Approx(4.0 / 7.0).epsilon(1e-15));
  CHECK(r[1].second == Approx(3.0 / 7.0).epsilon(1e-15));
  r = ops::topk_routing(logits, 4, 4, true);  // k = E with renormalisation: plain softmax
  CHECK(r[3].first == 0);
  CHECK(r[3].second == Approx(0.1).epsilon(1e-15));
  // Ties go to the lower expert index, like torch.topk on CPU.
  const float flat[] = {0.5f, 0.5f, 0.5f, 0.5f, 0.5f};
  const auto t = ops::topk_routing(flat, 5, 3, false);
  CHECK(t[0].first == 0);
  CHECK(t[1].first == 1);
  CHECK(t[2].first == 2);
  CHECK(t[2].second == Approx(0.2f));
  const float tie_mid[] = {0.0f, 2.0f, 1.0f, 2.0f};
  const auto m = ops::topk_routing(tie_mid, 4, 2, true);
  CHECK(m[0].first == 1);
  CHECK(m[1].first == 3);
  CHECK(m[0].second == Approx(0.5f));
}

TEST_CASE("MoE toy configs: lineages, Qwen3-MoE semantics, pairwise-distinct dims", "[moe][config]") {
  const auto q = parse_config(toy("qwen3-moe.json"), "qwen3-moe.json");
  const auto o = parse_config(toy("opensci-moe.json"), "opensci-moe.json");
  CHECK(q.lineage == Lineage::Qwen3Moe);
  CHECK(o.lineage == Lineage::OpenSciMoe);
  CHECK(lineage_name(o.lineage) == "opensci-moe");
  CHECK(q.norm_topk_prob != o.norm_topk_prob);
  for (const auto* c : {&q, &o}) {
    CHECK(c->num_experts >= 4);
    CHECK(c->num_experts_per_tok >= 2);
    int dense = 0, sparse = 0;
    for (int64_t l = 0; l < c->num_layers; ++l) (c->is_sparse_layer(l) ? sparse : dense) += 1;
    CHECK(dense >= 1);
    CHECK(sparse >= 1);
    const int64_t dims[] = {c->hidden_size, c->moe_intermediate_size, 2 * c->moe_intermediate_size,
                            c->intermediate_size};
    for (int i = 0; i < 4; ++i)
      for (int j = i + 1; j < 4; ++j) CHECK(dims[i] != dims[j]);
    CHECK(c->q_norm_name() == "q_norm");
  }
  CHECK_FALSE(q.mlp_bias);
  CHECK_FALSE(q.tie_word_embeddings);
  CHECK(o.mlp_bias);  // dense layers of opensci_moe carry biases
  CHECK(o.attention_bias);
  CHECK(o.tie_word_embeddings);
  CHECK_FALSE(o.is_sparse_layer(0));
  CHECK(o.is_sparse_layer(1));
  CHECK_FALSE(q.is_sparse_layer(1));  // mlp_only_layers [1]
  // expected parameters: dense layers have biased MLPs (opensci_moe), experts never.
  const auto p = expected_parameters(o);
  CHECK(p.count("model.layers.0.mlp.gate_proj.bias"));
  CHECK_FALSE(p.count("model.layers.1.mlp.experts.0.gate_proj.bias"));
  CHECK(expected_parameters(o, ExpertLayout::Fused).at("model.layers.1.mlp.experts.gate_up_proj") ==
        std::vector<int64_t>{8, 96, 128});
}

TEST_CASE("MoE config keys: 4.x/5.x spellings, native defaults, refused options", "[moe][config]") {
  auto j = one_layer_moe(true);
  SECTION("num_local_experts (5.x) is accepted; a disagreement with num_experts is an error") {
    j.erase("num_experts");
    j["num_local_experts"] = 4;
    CHECK(parse_config(j, "v5.json").num_experts == 4);
    j["num_experts"] = 8;
    REQUIRE_ERROR_MENTIONS(parse_config(j, "both.json"), "both.json", "num_experts 8 disagrees with num_local_experts 4");
    j.erase("num_experts");
    j.erase("num_local_experts");
    REQUIRE_ERROR_MENTIONS(parse_config(j, "none.json"), "none.json", "'num_experts'", "num_local_experts");
  }
  SECTION("native qwen3_moe: MLPs never biased, untied by default, 4 kv heads by default") {
    j["mlp_bias"] = true;
    j.erase("tie_word_embeddings");
    j.erase("num_key_value_heads");
    j["num_attention_heads"] = 8;
    const auto c = parse_config(j, "c.json");
    CHECK_FALSE(c.mlp_bias);
    CHECK_FALSE(c.tie_word_embeddings);
    CHECK(c.num_kv_heads == 4);  // Qwen3MoeConfig's default, not num_attention_heads
    j["model_type"] = "opensci_moe";
    const auto o = parse_config(j, "o.json");
    CHECK(o.mlp_bias);
    CHECK(o.tie_word_embeddings);
    CHECK(o.num_kv_heads == 8);
  }
  SECTION("refused: sliding window, top-k above E, a zero sparse step") {
    j["use_sliding_window"] = true;
    REQUIRE_ERROR_MENTIONS(parse_config(j, "c.json"), "use_sliding_window");
    j["use_sliding_window"] = false;
    j["num_experts_per_tok"] = 5;
    REQUIRE_ERROR_MENTIONS(parse_config(j, "c.json"), "num_experts_per_tok 5 exceeds num_experts 4");
    j["num_experts_per_tok"] = 2;
    j["decoder_sparse_step"] = 0;
    REQUIRE_ERROR_MENTIONS(parse_config(j, "c.json"), "decoder_sparse_step");
  }
}

TEST_CASE("a sparse layer with identical experts and renormalisation equals the dense MLP", "[moe][forward]") {
  // With every expert equal to one SwiGLU f and weights summing to 1, MoE(h) = f(h) exactly up
  // to rounding, whatever the router says.
  ScratchDir s("moe-identical");
  auto moe = test::toy_tensors(s.path(), one_layer_moe(true), 3);
  auto dense = test::toy_tensors(s.path(), one_layer_dense(3), 3);
  for (const char* k : {"gate_proj", "up_proj", "down_proj"}) {
    const auto& w = dense.at(fmt::format("model.layers.0.mlp.{}.weight", k));
    for (int e = 0; e < 4; ++e) moe[fmt::format("model.layers.0.mlp.experts.{}.{}.weight", e, k)] = w;
  }
  for (const auto& [name, t] : dense)
    if (!name.starts_with("model.layers.0.mlp.")) REQUIRE(moe.at(name) == t);  // same attention, norms, head
  test::write_checkpoint(s / "moe", one_layer_moe(true), moe);
  test::write_checkpoint(s / "dense", one_layer_dense(3), dense);
  const auto a = run_forward(s / "moe", Precision::Golden), b = run_forward(s / "dense", Precision::Golden);
  CHECK(max_abs_diff(a.logits, b.logits) < 1e-12);  // 1 - (p1 + p2) / (p1 + p2) rounding only
  // Without renormalisation the same checkpoint differs: the weights sum to p1 + p2 < 1 (the toy's
  // small init keeps the MLP's share of the logits small: the gap is ~2e-4, 1e8 x the rounding).
  test::write_checkpoint(s / "moe_raw", one_layer_moe(false), moe);
  CHECK(max_abs_diff(run_forward(s / "moe_raw", Precision::Golden).logits, b.logits) > 1e-5);
}

TEST_CASE("zero router: ties route to experts 0 and 1, weights 1/E unnormalised, 1/k renormalised", "[moe][forward]") {
  // A zero router gives every expert probability 1/4; top-2 takes experts 0 and 1 (ties to the
  // lower index). Their weighted sum w*(e0(h) + e1(h)) is one dense SwiGLU with I = 6:
  // gate = [g0; g1], up = [u0; u1], down = [w*d0, w*d1] (columns). w = 1/4 (no renorm) or 1/2.
  for (const bool renorm : {false, true}) {
    DYNAMIC_SECTION("norm_topk_prob " << renorm) {
      ScratchDir s("moe-zero-router");
      auto moe = test::toy_tensors(s.path(), one_layer_moe(renorm), 4);
      moe["model.layers.0.mlp.gate.weight"] = test::f32_tensor({4, 8}, std::vector<float>(32, 0.0f));
      auto dense = test::toy_tensors(s.path(), one_layer_dense(6), 4);
      const float w = renorm ? 0.5f : 0.25f;  // exact in binary
      const auto ex = [&](int e, const char* k) {
        return test::f32_values(moe.at(fmt::format("model.layers.0.mlp.experts.{}.{}.weight", e, k)));
      };
      for (const char* k : {"gate_proj", "up_proj"}) {
        auto v = ex(0, k);
        const auto v1 = ex(1, k);
        v.insert(v.end(), v1.begin(), v1.end());
        dense[fmt::format("model.layers.0.mlp.{}.weight", k)] = test::f32_tensor({6, 8}, v);
      }
      const auto d0 = scaled(ex(0, "down_proj"), w), d1 = scaled(ex(1, "down_proj"), w);  // [8, 3] each
      std::vector<float> down;
      for (int h = 0; h < 8; ++h) {
        down.insert(down.end(), d0.begin() + h * 3, d0.begin() + h * 3 + 3);
        down.insert(down.end(), d1.begin() + h * 3, d1.begin() + h * 3 + 3);
      }
      dense["model.layers.0.mlp.down_proj.weight"] = test::f32_tensor({8, 6}, down);
      test::write_checkpoint(s / "moe", one_layer_moe(renorm), moe);
      test::write_checkpoint(s / "dense", one_layer_dense(6), dense);
      const auto a = run_forward(s / "moe", Precision::Golden), b = run_forward(s / "dense", Precision::Golden);
      CHECK(max_abs_diff(a.logits, b.logits) < 1e-12);
    }
  }
}

TEST_CASE("golden and fast MoE forward agree, and per-expert and fused layouts give identical logits", "[moe][forward]") {
  for (const char* name : {"qwen3-moe.json", "opensci-moe.json"}) {
    DYNAMIC_SECTION(name) {
      ScratchDir s("moe-forward");
      const auto cfg = toy(name);
      test::write_checkpoint(s / "pe", cfg, test::toy_tensors(s.path(), cfg, 17));
      convert::ConvertOptions o;
      o.input = s / "pe";
      o.output = s / "fused";
      o.to = convert::Format::HfFused;
      convert::convert_checkpoint(o);
      const auto golden = run_forward(s / "pe", Precision::Golden);
      const auto fast = run_forward(s / "pe", Precision::Fast);
      // fp32 vs fp64 on a 3-4 layer toy: accumulation noise ~1e-6; 1e-4 is the matrix's fp32 tolerance.
      CHECK(max_abs_diff(golden.logits, fast.logits) < 1e-4);
      CHECK(argmax_rows(golden) == argmax_rows(fast));
      // Same values, same order of operations: the layout must not change a single bit.
      CHECK(run_forward(s / "fused", Precision::Golden).logits == golden.logits);
      CHECK(run_forward(s / "fused", Precision::Fast).logits == fast.logits);
    }
  }
}

TEST_CASE("validate_checkpoint: a sparse layer with no experts names both accepted layouts", "[moe]") {
  ScratchDir s("moe-validate");
  const auto cfg = one_layer_moe(true);
  auto t = test::toy_tensors(s.path(), cfg, 5);
  for (int e = 0; e < 4; ++e)
    for (const char* k : {"gate_proj", "up_proj", "down_proj"}) t.erase(fmt::format("model.layers.0.mlp.experts.{}.{}.weight", e, k));
  test::write_checkpoint(s / "none", cfg, t);
  REQUIRE_ERROR_MENTIONS(validate_checkpoint(Checkpoint(s / "none")), "missing tensor",
                         "model.layers.0.mlp.experts.0.down_proj.weight", "all 4 experts",
                         "mlp.experts.gate_up_proj [E, 2I, H]");
}
