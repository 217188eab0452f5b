// The checkpoint converter (reference/include/opensci/convert.hpp): layouts, bit-exact round
// trips, Megatron QKV/fc1 layouts and tensor parallelism, and every error path.
#include <cstdio>
#include <nlohmann/json.hpp>
#include <regex>

#include "checkpoint_builder.hpp"
#include "opensci/checkpoint.hpp"
#include "opensci/convert.hpp"
#include "opensci/error.hpp"
#include "test_helpers.hpp"

using namespace opensci;
using namespace opensci::convert;
using nlohmann::json;
using opensci::test::ScratchDir;
using opensci::test::TensorMap;
namespace fs = std::filesystem;

namespace {

// qwen3_moe, layers 0 and 2 sparse, layer 1 dense. H = 10, I = 6 (2I = 12), dense I = 14:
// pairwise distinct, so a dispatch bug cannot hide behind equal dims.
json small_moe(int64_t hidden = 10, int64_t moe_i = 6) {
  return json{{"model_type", "qwen3_moe"},     {"vocab_size", 16},          {"hidden_size", hidden},
              {"intermediate_size", 14},       {"moe_intermediate_size", moe_i}, {"num_hidden_layers", 3},
              {"num_attention_heads", 4},      {"num_key_value_heads", 2},  {"head_dim", 4},
              {"num_experts", 4},              {"num_experts_per_tok", 2},  {"norm_topk_prob", true},
              {"mlp_only_layers", {1}},        {"tie_word_embeddings", false}};
}

ConvertReport run(const fs::path& in, const fs::path& out, Format to, int tp = 1,
                  MegatronExperts experts = MegatronExperts::Sequential, uint64_t max_shard = 0) {
  ConvertOptions o;
  o.input = in;
  o.output = out;
  o.to = to;
  o.tp = tp;
  o.megatron_experts = experts;
  o.max_shard_bytes = max_shard;
  return convert_checkpoint(o);
}

// Experts 0 and 1 of every layer in shard 0, experts 2 and 3 in shard 1, the rest by layer:
// every sparse layer straddles the shard boundary.
int straddle(const std::string& name) {
  static const std::regex expert(R"(.*\.experts\.(\d+)\..*)");
  std::smatch m;
  if (std::regex_match(name, m, expert)) return std::stoi(m[1].str()) < 2 ? 0 : 1;
  return name < "model.layers.1" ? 0 : 1;
}

std::vector<std::byte> cat(std::initializer_list<const std::vector<std::byte>*> parts) {
  std::vector<std::byte> out;
  for (const auto* p : parts) out.insert(out.end(), p->begin(), p->end());
  return out;
}

bool has_safetensors(const fs::path& dir) {
  if (!fs::exists(dir)) return false;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.path().extension() == ".safetensors") return true;
  return false;
}

}  // namespace

TEST_CASE("per-expert -> fused -> per-expert is bit-exact, dtype kept, gate rows first", "[convert]") {
  for (const auto dtype : {DType::F32, DType::BF16}) {
    DYNAMIC_SECTION("dtype " << dtype_name(dtype)) {
      ScratchDir s("convert-rt");
      const auto cfg = small_moe();
      const auto toy = test::toy_tensors(s.path(), cfg, 5, dtype);
      test::write_checkpoint(s / "per_expert", cfg, toy, straddle);
      const auto report = run(s / "per_expert", s / "fused", Format::HfFused);
      CHECK(report.input_shards == 2);
      CHECK(report.output_bytes == report.input_bytes);
      const auto fused = test::read_tensors(s / "fused");
      for (int l : {0, 2}) {
        const auto pre = fmt::format("model.layers.{}.mlp.experts.", l);
        const auto& gu = fused.at(pre + "gate_up_proj");
        const auto& dn = fused.at(pre + "down_proj");
        CHECK(gu.dtype == dtype);
        CHECK(gu.shape == std::vector<int64_t>{4, 12, 10});  // [E, 2I, H]
        CHECK(dn.shape == std::vector<int64_t>{4, 10, 6});   // [E, H, I]
        std::vector<std::byte> want_gu, want_dn;
        for (int e = 0; e < 4; ++e) {
          const auto ex = fmt::format("{}{}.", pre, e);
          const auto g = cat({&toy.at(ex + "gate_proj.weight").bytes, &toy.at(ex + "up_proj.weight").bytes});
          want_gu.insert(want_gu.end(), g.begin(), g.end());
          const auto& d = toy.at(ex + "down_proj.weight").bytes;
          want_dn.insert(want_dn.end(), d.begin(), d.end());
          CHECK_FALSE(fused.count(ex + "gate_proj.weight"));
        }
        CHECK(gu.bytes == want_gu);
        CHECK(dn.bytes == want_dn);
      }
      CHECK(fused.at("model.layers.1.mlp.gate_proj.weight") == toy.at("model.layers.1.mlp.gate_proj.weight"));
      validate_checkpoint(Checkpoint(s / "fused"));  // the reference accepts the fused layout

      run(s / "fused", s / "back", Format::HfPerExpert);
      CHECK(test::read_tensors(s / "back") == toy);
    }
  }
}

TEST_CASE("already-fused v5 tensors pass through untouched", "[convert]") {
  ScratchDir s("convert-pass");
  const auto cfg = small_moe();
  test::write_checkpoint(s / "pe", cfg, test::toy_tensors(s.path(), cfg, 6));
  run(s / "pe", s / "fused", Format::HfFused);
  run(s / "fused", s / "fused2", Format::HfFused);
  CHECK(test::read_tensors(s / "fused2") == test::read_tensors(s / "fused"));
}

TEST_CASE("the transposed fused layout [E, H, 2I] / [E, I, H] is recognised by shape", "[convert]") {
  ScratchDir s("convert-transposed");
  const auto cfg = small_moe();
  test::write_checkpoint(s / "pe", cfg, test::toy_tensors(s.path(), cfg, 7));
  run(s / "pe", s / "fused", Format::HfFused);
  auto tensors = test::read_tensors(s / "fused");
  auto transpose = [](const test::TensorData& t) {  // [E, a, b] -> [E, b, a], F32
    const auto v = test::f32_values(t);
    const int64_t E = t.shape[0], a = t.shape[1], b = t.shape[2];
    std::vector<float> out(v.size());
    for (int64_t e = 0; e < E; ++e)
      for (int64_t i = 0; i < a; ++i)
        for (int64_t j = 0; j < b; ++j) out[static_cast<size_t>((e * b + j) * a + i)] = v[static_cast<size_t>((e * a + i) * b + j)];
    return test::f32_tensor({E, b, a}, out);
  };
  auto transposed = tensors;
  for (int l : {0, 2})
    for (const char* k : {"gate_up_proj", "down_proj"}) {
      const auto name = fmt::format("model.layers.{}.mlp.experts.{}", l, k);
      transposed[name] = transpose(tensors.at(name));
    }
  test::write_checkpoint(s / "tr", cfg, transposed);
  SECTION("the reference refuses it with a hint") {
    REQUIRE_ERROR_MENTIONS(validate_checkpoint(Checkpoint(s / "tr")), "model.layers.0.mlp.experts.down_proj",
                           "[4, 6, 10]", "expected [4, 10, 6]", "transposed", "convert");
  }
  SECTION("to fused: re-laid out to the v5 bytes") {
    const auto report = run(s / "tr", s / "v5", Format::HfFused);
    CHECK(test::read_tensors(s / "v5") == tensors);
    REQUIRE(report.notes.size() == 4);
    CHECK(report.notes[0].find("transposed") != std::string::npos);
  }
  SECTION("to per-expert and to megatron, bit-exact") {
    run(s / "tr", s / "pe2", Format::HfPerExpert);
    CHECK(test::read_tensors(s / "pe2") == test::read_tensors(s / "pe"));
    run(s / "tr", s / "mg", Format::Megatron, 2);
    run(s / "mg", s / "pe3", Format::HfPerExpert);
    CHECK(test::read_tensors(s / "pe3") == test::read_tensors(s / "pe"));
  }
}

TEST_CASE("fused tensors of an unknown or ambiguous shape are hard errors naming tensor and shapes", "[convert]") {
  ScratchDir s("convert-shape");
  SECTION("a shape that fits neither layout") {
    const auto cfg = small_moe();
    test::write_checkpoint(s / "pe", cfg, test::toy_tensors(s.path(), cfg, 8));
    run(s / "pe", s / "fused", Format::HfFused);
    auto t = test::read_tensors(s / "fused");
    t["model.layers.2.mlp.experts.gate_up_proj"] = test::f32_tensor({4, 12, 11}, std::vector<float>(4 * 12 * 11));
    test::write_checkpoint(s / "bad", cfg, t);
    REQUIRE_ERROR_MENTIONS(run(s / "bad", s / "out", Format::HfPerExpert), "model.layers.2.mlp.experts.gate_up_proj",
                           "model.safetensors", "[4, 12, 11]", "[E, 2I, H] = [4, 12, 10]", "[E, H, 2I] = [4, 10, 12]");
    CHECK_FALSE(has_safetensors(s / "out"));
  }
  SECTION("2I == H: gate_up_proj fits both layouts") {
    const auto cfg = small_moe(12, 6);
    test::write_checkpoint(s / "pe", cfg, test::toy_tensors(s.path(), cfg, 8));
    run(s / "pe", s / "fused", Format::HfFused);  // per-expert input is unambiguous by name
    REQUIRE_ERROR_MENTIONS(run(s / "fused", s / "out", Format::HfPerExpert), "gate_up_proj", "[4, 12, 12]",
                           "ambiguous", "2 * moe_intermediate_size == hidden_size", "--fused-input");
    CHECK_FALSE(has_safetensors(s / "out"));
    // Stated, the layout is no longer a guess: v5 round-trips bit-exact.
    ConvertOptions o;
    o.input = s / "fused";
    o.output = s / "back";
    o.to = Format::HfPerExpert;
    o.fused_input = FusedInput::V5;
    convert_checkpoint(o);
    CHECK(test::read_tensors(s / "back") == test::read_tensors(s / "pe"));
  }
  SECTION("a stated layout the shape does not fit") {
    const auto cfg = small_moe();
    test::write_checkpoint(s / "pe", cfg, test::toy_tensors(s.path(), cfg, 8));
    run(s / "pe", s / "fused", Format::HfFused);
    ConvertOptions o;
    o.input = s / "fused";
    o.output = s / "out";
    o.to = Format::HfPerExpert;
    o.fused_input = FusedInput::Transposed;
    REQUIRE_ERROR_MENTIONS(convert_checkpoint(o), "model.layers.0.mlp.experts.gate_up_proj", "has shape [4, 12, 10]",
                           "[E, H, 2I] = [4, 10, 12] (transposed fused, as --fused-input says)");
  }
  SECTION("I == H: down_proj fits both layouts") {
    const auto cfg = small_moe(6, 6);
    test::write_checkpoint(s / "pe", cfg, test::toy_tensors(s.path(), cfg, 8));
    run(s / "pe", s / "fused", Format::HfFused);
    REQUIRE_ERROR_MENTIONS(run(s / "fused", s / "out", Format::HfPerExpert), "model.layers.0.mlp.experts.down_proj",
                           "[4, 6, 6]", "ambiguous", "moe_intermediate_size == hidden_size");
  }
  SECTION("a per-expert tensor of the wrong shape") {
    const auto cfg = small_moe();
    auto t = test::toy_tensors(s.path(), cfg, 8);
    t["model.layers.0.mlp.experts.1.up_proj.weight"] = test::f32_tensor({10, 6}, std::vector<float>(60));
    test::write_checkpoint(s / "bad", cfg, t);
    REQUIRE_ERROR_MENTIONS(run(s / "bad", s / "out", Format::HfFused), "model.layers.0.mlp.experts.1.up_proj.weight",
                           "has shape [10, 6], expected [6, 10]");
  }
}

TEST_CASE("missing, out-of-range and duplicate experts and partial layers are reported together", "[convert]") {
  ScratchDir s("convert-experts");
  const auto cfg = small_moe();
  auto t = test::toy_tensors(s.path(), cfg, 9);
  SECTION("missing and out of range") {
    t.erase("model.layers.0.mlp.experts.3.up_proj.weight");
    for (int e : {2, 3})
      for (const char* k : {"gate_proj", "up_proj", "down_proj"}) t.erase(fmt::format("model.layers.2.mlp.experts.{}.{}.weight", e, k));
    t["model.layers.0.mlp.experts.4.gate_proj.weight"] = t.at("model.layers.0.mlp.experts.0.gate_proj.weight");
    t["model.layers.1.mlp.experts.0.gate_proj.weight"] = t.at("model.layers.0.mlp.experts.0.gate_proj.weight");
    test::write_checkpoint(s / "bad", cfg, t, straddle);
    REQUIRE_ERROR_MENTIONS(run(s / "bad", s / "out", Format::HfFused), "6 problems",
                           "layer 0: up_proj missing for expert 3 (3 of 4 present)",
                           "layer 2: gate_proj missing for experts 2, 3 (2 of 4 present)",
                           "layer 2: down_proj missing for experts 2, 3",
                           "model.layers.0.mlp.experts.4.gate_proj.weight", "expert index 4 is out of range (num_experts 4)",
                           "model.layers.1.mlp.experts.0.gate_proj.weight", "layer 1 is dense in the config");
    CHECK_FALSE(has_safetensors(s / "out"));
  }
  SECTION("the same expert in two shards") {
    test::write_checkpoint(s / "dup", cfg, t, straddle);
    const auto dup = "model.layers.0.mlp.experts.3.down_proj.weight";
    // Add a second copy to shard 1's neighbour, shard 0, behind the index's back.
    const auto shard0 = s / "dup" / "model-00001-of-00002.safetensors";
    SafetensorsWriter w;
    {
      const SafetensorsFile f(shard0);
      for (const auto& info : f.tensors()) {
        const auto b = f.bytes(info);
        w.add(info.name, info.dtype, info.shape, {b.begin(), b.end()});
      }
    }
    w.add(dup, DType::F32, t.at(dup).shape, t.at(dup).bytes);
    w.write(shard0);
    REQUIRE_ERROR_MENTIONS(run(s / "dup", s / "out", Format::HfFused), "duplicate tensor", dup,
                           "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors");
  }
  SECTION("per-expert and fused tensors in one layer") {
    test::write_checkpoint(s / "pe", cfg, t);
    run(s / "pe", s / "fused", Format::HfFused);
    auto mixed = test::read_tensors(s / "fused");
    mixed["model.layers.2.mlp.experts.0.gate_proj.weight"] = t.at("model.layers.2.mlp.experts.0.gate_proj.weight");
    test::write_checkpoint(s / "mixed", cfg, mixed);
    REQUIRE_ERROR_MENTIONS(run(s / "mixed", s / "out", Format::HfPerExpert), "layer 2 mixes expert layouts",
                           "model.layers.2.mlp.experts.0.gate_proj.weight", "model.layers.2.mlp.experts.down_proj");
    REQUIRE_ERROR_MENTIONS(validate_checkpoint(Checkpoint(s / "mixed")), "layer 2 mixes expert layouts");
  }
  SECTION("layers may differ in layout (one per-expert, one fused)") {
    test::write_checkpoint(s / "pe", cfg, t);
    run(s / "pe", s / "fused", Format::HfFused);
    auto per_layer = test::read_tensors(s / "fused");
    for (const char* k : {"gate_up_proj", "down_proj"}) per_layer.erase(fmt::format("model.layers.2.mlp.experts.{}", k));
    for (const auto& [name, v] : t)
      if (name.starts_with("model.layers.2.mlp.experts.")) per_layer[name] = v;
    test::write_checkpoint(s / "per_layer", cfg, per_layer);
    validate_checkpoint(Checkpoint(s / "per_layer"));
    const auto r = run(s / "per_layer", s / "out", Format::HfPerExpert);
    CHECK(r.from.find("per-expert layers [2], fused layers [0]") != std::string::npos);
    CHECK(test::read_tensors(s / "out") == t);
  }
}

TEST_CASE("megatron linear_qkv is laid out per query group (GQA), split by groups over TP", "[convert][megatron]") {
  // Dense qwen3: 4 query heads, 2 kv groups, head_dim 2, H = 3. Rows tagged by value:
  // q row r = 100 + r, k = 200 + r, v = 300 + r; biases 1000 / 2000 / 3000 + r.
  ScratchDir s("convert-qkv");
  json cfg = {{"model_type", "qwen3"},        {"vocab_size", 4},         {"hidden_size", 3},
              {"intermediate_size", 4},       {"num_hidden_layers", 1},  {"num_attention_heads", 4},
              {"num_key_value_heads", 2},     {"head_dim", 2},           {"attention_bias", true},
              {"tie_word_embeddings", false}};
  auto t = test::toy_tensors(s.path(), cfg, 1);
  auto tagged = [](int64_t rows, int64_t cols, float base) {
    std::vector<float> v(static_cast<size_t>(rows * cols));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) v[static_cast<size_t>(r * cols + c)] = base + static_cast<float>(r);
    return v;
  };
  const auto sa = std::string("model.layers.0.self_attn.");
  t[sa + "q_proj.weight"] = test::f32_tensor({8, 3}, tagged(8, 3, 100));
  t[sa + "k_proj.weight"] = test::f32_tensor({4, 3}, tagged(4, 3, 200));
  t[sa + "v_proj.weight"] = test::f32_tensor({4, 3}, tagged(4, 3, 300));
  t[sa + "q_proj.bias"] = test::f32_tensor({8}, tagged(8, 1, 1000));
  t[sa + "k_proj.bias"] = test::f32_tensor({4}, tagged(4, 1, 2000));
  t[sa + "v_proj.bias"] = test::f32_tensor({4}, tagged(4, 1, 3000));
  test::write_checkpoint(s / "hf", cfg, t);
  auto row_tags = [](const test::TensorData& d, int64_t cols) {
    const auto v = test::f32_values(d);
    std::vector<float> tags;
    for (size_t r = 0; r < v.size() / static_cast<size_t>(cols); ++r) tags.push_back(v[r * static_cast<size_t>(cols)]);
    return tags;
  };
  const auto qkv = std::string("decoder.layers.0.self_attention.linear_qkv.");
  SECTION("tp = 1: [q heads of group 0, k0, v0, q heads of group 1, k1, v1]") {
    run(s / "hf", s / "mg", Format::Megatron, 1);
    const auto m = test::read_tensors(s / "mg");
    CHECK(m.at("mp_rank_00/" + qkv + "weight").shape == std::vector<int64_t>{16, 3});
    CHECK(row_tags(m.at("mp_rank_00/" + qkv + "weight"), 3) ==
          std::vector<float>{100, 101, 102, 103, 200, 201, 300, 301, 104, 105, 106, 107, 202, 203, 302, 303});
    CHECK(row_tags(m.at("mp_rank_00/" + qkv + "bias"), 1) ==
          std::vector<float>{1000, 1001, 1002, 1003, 2000, 2001, 3000, 3001, 1004, 1005, 1006, 1007, 2002, 2003,
                             3002, 3003});
  }
  SECTION("tp = 2: one query group per rank") {
    run(s / "hf", s / "mg", Format::Megatron, 2);
    const auto m = test::read_tensors(s / "mg");
    CHECK(row_tags(m.at("mp_rank_00/" + qkv + "weight"), 3) == std::vector<float>{100, 101, 102, 103, 200, 201, 300, 301});
    CHECK(row_tags(m.at("mp_rank_01/" + qkv + "weight"), 3) == std::vector<float>{104, 105, 106, 107, 202, 203, 302, 303});
    CHECK(row_tags(m.at("mp_rank_01/" + qkv + "bias"), 1) == std::vector<float>{1004, 1005, 1006, 1007, 2002, 2003, 3002, 3003});
    run(s / "mg", s / "back", Format::HfPerExpert);
    CHECK(test::read_tensors(s / "back") == t);
  }
  SECTION("tp = 4 does not split 2 query groups") {
    REQUIRE_ERROR_MENTIONS(run(s / "hf", s / "mg", Format::Megatron, 4), "num_key_value_heads (query groups) = 2",
                           "tensor-parallel size 4");
  }
}

TEST_CASE("megatron linear_fc1 is [gate; up] per rank, linear_fc2 / linear_proj split columns, norms TE-fused",
          "[convert][megatron]") {
  ScratchDir s("convert-fc");
  const auto cfg = small_moe();
  const auto t = test::toy_tensors(s.path(), cfg, 3);
  test::write_checkpoint(s / "hf", cfg, t);
  run(s / "hf", s / "mg", Format::Megatron, 2);
  const auto m = test::read_tensors(s / "mg");
  auto rows = [](const test::TensorData& d, int64_t cols, int64_t r0, int64_t r1) {
    const auto v = test::f32_values(d);
    return std::vector<float>(v.begin() + r0 * cols, v.begin() + r1 * cols);
  };
  auto col_block = [](const test::TensorData& d, int64_t nrows, int64_t cols, int64_t c0, int64_t w) {
    const auto v = test::f32_values(d);
    std::vector<float> out;
    for (int64_t r = 0; r < nrows; ++r) out.insert(out.end(), v.begin() + r * cols + c0, v.begin() + r * cols + c0 + w);
    return out;
  };
  auto concat = [](std::vector<float> a, const std::vector<float>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  for (int r : {0, 1}) {
    const auto rk = fmt::format("mp_rank_{:02d}/decoder.layers.", r);
    // dense layer 1: I = 14, 7 rows per rank
    CHECK(test::f32_values(m.at(rk + "1.mlp.linear_fc1.weight")) ==
          concat(rows(t.at("model.layers.1.mlp.gate_proj.weight"), 10, 7 * r, 7 * r + 7),
                 rows(t.at("model.layers.1.mlp.up_proj.weight"), 10, 7 * r, 7 * r + 7)));
    CHECK(test::f32_values(m.at(rk + "1.mlp.linear_fc2.weight")) ==
          col_block(t.at("model.layers.1.mlp.down_proj.weight"), 10, 14, 7 * r, 7));
    // expert 2 of layer 0: moe I = 6, 3 rows per rank
    CHECK(test::f32_values(m.at(rk + "0.mlp.experts.local_experts.2.linear_fc1.weight")) ==
          concat(rows(t.at("model.layers.0.mlp.experts.2.gate_proj.weight"), 10, 3 * r, 3 * r + 3),
                 rows(t.at("model.layers.0.mlp.experts.2.up_proj.weight"), 10, 3 * r, 3 * r + 3)));
    CHECK(test::f32_values(m.at(rk + "0.self_attention.linear_proj.weight")) ==
          col_block(t.at("model.layers.0.self_attn.o_proj.weight"), 10, 16, 8 * r, 8));
    // TE-fused norm names, q/k norms, router: replicated on every rank
    CHECK(m.at(rk + "0.self_attention.linear_qkv.layer_norm_weight") == t.at("model.layers.0.input_layernorm.weight"));
    CHECK(m.at(rk + "1.mlp.linear_fc1.layer_norm_weight") == t.at("model.layers.1.post_attention_layernorm.weight"));
    CHECK(m.at(rk + "0.pre_mlp_layernorm.weight") == t.at("model.layers.0.post_attention_layernorm.weight"));
    CHECK(m.at(rk + "0.self_attention.q_layernorm.weight") == t.at("model.layers.0.self_attn.q_norm.weight"));
    CHECK(m.at(rk + "2.self_attention.k_layernorm.weight") == t.at("model.layers.2.self_attn.k_norm.weight"));
    CHECK(m.at(rk + "2.mlp.router.weight") == t.at("model.layers.2.mlp.gate.weight"));
  }
  CHECK(test::f32_values(m.at("mp_rank_01/embedding.word_embeddings.weight")) ==
        rows(t.at("model.embed_tokens.weight"), 10, 8, 16));
  CHECK(test::f32_values(m.at("mp_rank_01/output_layer.weight")) == rows(t.at("lm_head.weight"), 10, 8, 16));
  CHECK_FALSE(m.count("mp_rank_00/decoder.layers.0.mlp.linear_fc1.layer_norm_weight"));  // MoE layer: pre_mlp_layernorm
}

TEST_CASE("HF <-> megatron round trips are bit-exact for every lineage, TP merged and split", "[convert][megatron]") {
  for (const char* name : {"opensci-ref.json", "opensci-ref-theta.json", "opensci-qwen3.json", "qwen3-moe.json",
                           "opensci-moe.json"}) {
    DYNAMIC_SECTION(name) {
      ScratchDir s("convert-mg");
      const auto cfg = test::load_json(test::source_dir() / "toy_configs" / name);
      const auto t = test::toy_tensors(s.path(), cfg, 21);
      test::write_checkpoint(s / "hf", cfg, t);
      run(s / "hf", s / "tp2", Format::Megatron, 2, MegatronExperts::Sequential, 200000);
      run(s / "tp2", s / "tp1", Format::Megatron, 1, MegatronExperts::Grouped);
      run(s / "tp1", s / "back", Format::HfPerExpert);
      CHECK(test::read_tensors(s / "back") == t);
      run(s / "tp1", s / "tp2b", Format::Megatron, 2);
      run(s / "tp2b", s / "fused", Format::HfFused);
      run(s / "fused", s / "back2", Format::HfPerExpert);
      CHECK(test::read_tensors(s / "back2") == t);
      const auto c = load_config(s / "hf" / "config.json");
      if (c.lineage == Lineage::OpenSciRef && c.qk_norm) {  // q_layernorm <-> q_layernorm
        CHECK(test::read_tensors(s / "tp1").at("mp_rank_00/decoder.layers.0.self_attention.q_layernorm.weight") ==
              t.at("model.layers.0.self_attn.q_layernorm.weight"));
      }
    }
  }
}

TEST_CASE("megatron inputs: plain norm names accepted, two names of one tensor, ranks, replicas", "[convert][megatron]") {
  ScratchDir s("convert-mg-err");
  const auto cfg = small_moe();
  const auto t = test::toy_tensors(s.path(), cfg, 4);
  test::write_checkpoint(s / "hf", cfg, t);
  run(s / "hf", s / "mg", Format::Megatron, 2);
  auto m = test::read_tensors(s / "mg");
  const auto te = std::string("decoder.layers.1.mlp.linear_fc1.layer_norm_weight");
  const auto plain = std::string("decoder.layers.1.pre_mlp_layernorm.weight");
  SECTION("non-TE names (input_layernorm, pre_mlp_layernorm) convert the same") {
    for (int r : {0, 1}) {
      const auto rk = fmt::format("mp_rank_{:02d}/", r);
      m[rk + plain] = m.at(rk + te);
      m.erase(rk + te);
      m[rk + "decoder.layers.0.input_layernorm.weight"] = m.at(rk + "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight");
      m.erase(rk + "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight");
    }
    test::write_checkpoint(s / "plain", cfg, m);
    run(s / "plain", s / "back", Format::HfPerExpert);
    CHECK(test::read_tensors(s / "back") == t);
  }
  SECTION("both names of one tensor") {
    m["mp_rank_00/" + plain] = m.at("mp_rank_00/" + te);
    test::write_checkpoint(s / "both", cfg, m);
    REQUIRE_ERROR_MENTIONS(run(s / "both", s / "back", Format::HfPerExpert), "mp_rank_00", te.c_str(), plain.c_str(),
                           "two names of one tensor");
  }
  SECTION("replicated copies that differ between ranks") {
    auto& copy = m["mp_rank_01/decoder.final_layernorm.weight"];
    copy.bytes[0] = std::byte{static_cast<unsigned char>(static_cast<unsigned char>(copy.bytes[0]) ^ 1u)};
    test::write_checkpoint(s / "diff", cfg, m);
    REQUIRE_ERROR_MENTIONS(run(s / "diff", s / "back", Format::HfPerExpert), "replicated tensor",
                           "decoder.final_layernorm.weight", "mp_rank_00/model.safetensors",
                           "mp_rank_01/model.safetensors");
  }
  SECTION("a rank directory missing") {
    test::write_checkpoint(s / "gap", cfg, m);
    fs::rename(s / "gap" / "mp_rank_01", s / "gap" / "mp_rank_02");
    REQUIRE_ERROR_MENTIONS(run(s / "gap", s / "back", Format::HfPerExpert), "mp_rank_01 is missing");
  }
  SECTION("a shard of the wrong TP shape, unknown and mixed-form expert names") {
    m["mp_rank_01/decoder.layers.0.self_attention.linear_qkv.weight"] = test::f32_tensor({10, 10}, std::vector<float>(100));
    m["mp_rank_00/decoder.layers.0.mlp.experts.linear_fc1.weight1"] = m.at("mp_rank_00/decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight");
    m["mp_rank_00/decoder.layers.0.self_attention.linear_qkv._extra_state"] = test::f32_tensor({1}, {0});
    test::write_checkpoint(s / "bad", cfg, m);
    REQUIRE_ERROR_MENTIONS(run(s / "bad", s / "back", Format::HfPerExpert),
                           "decoder.layers.0.self_attention.linear_qkv.weight", "has shape [10, 10], expected [16, 10] for "
                           "tensor-parallel size 2",
                           "mix SequentialMLP", "unexpected tensor 'decoder.layers.0.self_attention.linear_qkv._extra_state'");
  }
  SECTION("pipeline-parallel directories are refused") {
    test::write_checkpoint(s / "pp", cfg, m);
    fs::rename(s / "pp" / "mp_rank_01", s / "pp" / "mp_rank_00_001");
    REQUIRE_ERROR_MENTIONS(run(s / "pp", s / "back", Format::HfPerExpert), "mp_rank_00_001", "pipeline-parallel");
  }
}

TEST_CASE("non-parameters: buffers and tied heads pass through HF outputs, are reported when dropped", "[convert]") {
  ScratchDir s("convert-extra");
  const auto cfg = test::load_json(test::source_dir() / "toy_configs" / "opensci-ref.json");  // tied
  auto t = test::toy_tensors(s.path(), cfg, 2);
  t["model.rotary_emb.inv_freq"] = test::f32_tensor({12}, std::vector<float>(12, 0.5f));
  t["lm_head.weight"] = t.at("model.embed_tokens.weight");
  test::write_checkpoint(s / "hf", cfg, t);
  run(s / "hf", s / "hf2", Format::HfFused);
  CHECK(test::read_tensors(s / "hf2") == t);
  const auto r = run(s / "hf", s / "mg", Format::Megatron);
  REQUIRE(r.dropped.size() == 2);
  CHECK(r.dropped[0].find("lm_head.weight") != std::string::npos);
  CHECK(r.dropped[1].find("model.rotary_emb.inv_freq") != std::string::npos);
  t["model.layers.0.mlp.extra.weight"] = test::f32_tensor({2}, {1, 2});
  test::write_checkpoint(s / "unknown", cfg, t);
  REQUIRE_ERROR_MENTIONS(run(s / "unknown", s / "x", Format::HfFused), "unexpected tensor 'model.layers.0.mlp.extra.weight'",
                         "F32 [2]", "opensci-ref config");
}

TEST_CASE("outputs: new or empty directory, --tp only for megatron, shard splitting with an index", "[convert]") {
  ScratchDir s("convert-out");
  const auto cfg = small_moe();
  test::write_checkpoint(s / "hf", cfg, test::toy_tensors(s.path(), cfg, 12));
  fs::create_directories(s / "full");
  test::write_text(s / "full" / "x", "x");
  REQUIRE_ERROR_MENTIONS(run(s / "hf", s / "full", Format::HfFused), "exists and is not an empty directory");
  REQUIRE_ERROR_MENTIONS(run(s / "hf", s / "hf", Format::HfFused), "is the input directory");
  REQUIRE_ERROR_MENTIONS(run(s / "hf", s / "o", Format::HfFused, 2), "--tp 2 applies to a megatron output only");
  const auto r = run(s / "hf", s / "split", Format::HfFused, 1, MegatronExperts::Sequential, 4000);
  CHECK(r.output_shards > 3);
  const Checkpoint ck(s / "split");  // index and shards agree (the Checkpoint loader checks)
  validate_checkpoint(ck);
  std::ifstream in(s / "split" / "model.safetensors.index.json");
  CHECK(json::parse(in)["metadata"]["total_size"].get<uint64_t>() == r.output_bytes);
}

TEST_CASE("CLI convert: report on success, exit status 2 and the message on error", "[convert][cli]") {
  ScratchDir s("convert-cli");
  const auto cfg = small_moe();
  test::write_checkpoint(s / "hf", cfg, test::toy_tensors(s.path(), cfg, 13));
  auto sh = [](const std::string& cmd, int& status) {
    std::string out;
    FILE* p = popen((cmd + " 2>&1").c_str(), "r");
    char buf[4096];
    while (size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
    status = WEXITSTATUS(pclose(p));
    return out;
  };
  int status = -1;
  auto out = sh(fmt::format("{} convert --in {} --out {} --to megatron --tp 2", OPENSCI_CLI, (s / "hf").string(),
                            (s / "mg").string()),
                status);
  INFO(out);
  CHECK(status == 0);
  CHECK(out.find("-> megatron") != std::string::npos);
  CHECK(out.find("tp 2") != std::string::npos);
  out = sh(fmt::format("{} convert --in {} --out {} --to hf-fused --tp 2", OPENSCI_CLI, (s / "hf").string(),
                       (s / "x").string()),
           status);
  CHECK(status == 2);
  CHECK(out.find("error: convert: --tp 2 applies to a megatron output only") != std::string::npos);
}
