// toyify: a published-size model (headers only: the payloads are sparse files) shrunk to a toy
// that keeps the source's names, shards, dtypes, code and config keys, and the relations between
// its dimensions; refusals name the key or tensor.
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <set>
#include <nlohmann/json.hpp>

#include "opensci/checkpoint.hpp"
#include "opensci/config.hpp"
#include "opensci/error.hpp"
#include "opensci/harness/toy.hpp"
#include "opensci/harness/toyify.hpp"
#include "opensci/safetensors.hpp"
#include "test_helpers.hpp"

using namespace opensci;
using namespace opensci::harness;
using nlohmann::json;
using opensci::test::read_text;
using opensci::test::ScratchDir;
using opensci::test::write_text;
namespace fs = std::filesystem;

namespace {

// A model directory whose safetensors shards have real headers and sparse (all-zero) payloads.
void write_source(const fs::path& dir, const json& config, const std::map<std::string, std::vector<int64_t>>& tensors,
                  const std::string& dtype = "BF16", int shards = 2, const std::string& code = "# remote code\n") {
  fs::create_directories(dir);
  write_text(dir / "config.json", config.dump(2));
  write_text(dir / "modeling_x.py", code);
  std::vector<std::string> names;
  for (const auto& [n, _] : tensors) names.push_back(n);
  json weight_map = json::object();
  for (int s = 0; s < shards; ++s) {
    const auto file = shards == 1 ? std::string("model.safetensors")
                                  : fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, shards);
    json header = {{"__metadata__", {{"format", "pt"}}}};
    size_t offset = 0;
    for (size_t i = static_cast<size_t>(s); i < names.size(); i += static_cast<size_t>(shards)) {
      const auto& shape = tensors.at(names[i]);
      const auto bytes = static_cast<size_t>(element_count(shape)) * (names[i].ends_with("inv_freq") ? 4 : 2);
      header[names[i]] = {{"dtype", names[i].ends_with("inv_freq") ? "F32" : dtype}, {"shape", shape}, {"data_offsets", {offset, offset + bytes}}};
      offset += bytes;
      weight_map[names[i]] = file;
    }
    auto text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    std::string head(8, '\0');
    const uint64_t n = text.size();
    std::memcpy(head.data(), &n, 8);
    write_text(dir / file, head + text);
    REQUIRE(truncate((dir / file).c_str(), static_cast<off_t>(8 + text.size() + offset)) == 0);
  }
  if (shards > 1) write_text(dir / "model.safetensors.index.json", json{{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}}.dump());
}

json published_config() {
  return {{"architectures", {"OpensciForCausalLM"}},
          {"auto_map", {{"AutoConfig", "configuration_opensci.OpensciConfig"}}},
          {"model_type", "opensci"},
          {"vocab_size", 50304},
          {"hidden_size", 2048},
          {"intermediate_size", 8192},
          {"num_hidden_layers", 24},
          {"num_attention_heads", 32},
          {"num_key_value_heads", 32},
          {"head_dim", 64},
          {"max_position_embeddings", 4096},
          {"initializer_range", 0.02},
          {"rms_norm_eps", 1e-05},
          {"rope_theta", 10000},
          {"rope_scaling", nullptr},
          {"attention_bias", true},
          {"mlp_bias", true},
          {"qk_layernorm", true},
          {"pretraining_tp", 1},
          {"bos_token_id", 0},
          {"eos_token_id", 0},
          {"torch_dtype", "bfloat16"},
          {"transformers_version", "4.48.3"}};
}

json read_json(const fs::path& p) { return json::parse(read_text(p)); }

}  // namespace

TEST_CASE("toyify keeps a published model's names, shards, dtypes, code and config keys") {
  ScratchDir dir("toyify-pub");
  const auto cfg = published_config();
  const auto expected = expected_parameters(parse_config(cfg, "published"));
  write_source(dir / "src", cfg, expected);
  ToyifyOptions o;
  o.out = dir / "toy";
  o.ffn = 160;
  const auto r = toyify(read_local_source(dir / "src"), o);
  CHECK(r.warnings.empty());
  CHECK(r.tensors == 2 + 3 * 18);  // embed, norm (tied: no lm_head) + 18 per layer
  const auto toy = read_json(dir / "toy/config.json");
  // Every key not shrunk is byte-for-byte the source's; each shrunk one is recorded with its reason.
  std::set<std::string> changed;
  for (const auto& c : toy["_toyified_from"]["changes"]) {
    changed.insert(c["key"].get<std::string>());
    CHECK(c["from"] == cfg[c["key"].get<std::string>()]);
    CHECK(c["to"] == toy[c["key"].get<std::string>()]);
    CHECK_FALSE(c["why"].get<std::string>().empty());
  }
  CHECK(changed == std::set<std::string>{"num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim",
                                         "intermediate_size", "vocab_size", "num_hidden_layers"});
  for (const auto& [k, v] : cfg.items())
    if (!changed.count(k)) CHECK(toy[k] == v);
  CHECK_FALSE(toy.contains("tie_word_embeddings"));  // absent stays absent (H5 depends on it)
  CHECK(read_text(dir / "toy/modeling_x.py") == "# remote code\n");
  const auto c = parse_config(toy, "toy");
  CHECK(c.head_dim * c.num_heads == c.hidden_size);
  CHECK(c.num_kv_heads == c.num_heads);
  // Same shards as the source, each tensor where the source had it, in the source's dtype.
  const auto src_index = read_json(dir / "src/model.safetensors.index.json")["weight_map"];
  const auto toy_index = read_json(dir / "toy/model.safetensors.index.json")["weight_map"];
  REQUIRE(toy_index.size() == r.tensors);
  for (const auto& [name, shard] : toy_index.items()) {
    CHECK(src_index[name] == shard);
    const SafetensorsFile f(dir / "toy" / shard.get<std::string>());
    CHECK(f.at(name).dtype == DType::BF16);
  }
  const Checkpoint ck(dir / "toy");
  validate_checkpoint(ck);
  // The same bytes for the same source and seed; and the toy builder's values for that config.
  ToyifyOptions o2 = o;
  o2.out = dir / "toy2";
  toyify(read_local_source(dir / "src"), o2);
  for (const auto& [name, shard] : toy_index.items())
    CHECK(read_text(dir / "toy" / shard.get<std::string>()) == read_text(dir / "toy2" / shard.get<std::string>()));
  const auto q = ck.read<float>("model.layers.1.self_attn.q_proj.weight", {96, 96});
  const auto want = toy_values("model.layers.1.self_attn.q_proj.weight", 96 * 96, c, 1);
  for (size_t i = 0; i < q.size(); ++i) REQUIRE(q[i] == bf16_to_f32(f32_to_bf16(want[i])));
}

TEST_CASE("toyify keeps GQA, head_dim != hidden/heads, an untied head and q_norm naming (OpenSci-Qwen3)") {
  ScratchDir dir("toyify-qwen3");
  json cfg = {{"model_type", "opensci"}, {"vocab_size", 151936}, {"hidden_size", 1024}, {"intermediate_size", 3072},
              {"num_hidden_layers", 28}, {"num_attention_heads", 16}, {"num_key_value_heads", 8},
              {"max_position_embeddings", 40960}, {"rms_norm_eps", 1e-6}, {"rope_theta", 1000000},
              {"tie_word_embeddings", false}, {"eos_token_id", 151645}, {"use_sliding_window", false},
              {"sliding_window", nullptr}, {"max_window_layers", 28}};  // no head_dim: 128 for this config class
  const auto orig = parse_config(cfg, "qwen3");
  REQUIRE(orig.head_dim == 128);
  write_source(dir / "src", cfg, expected_parameters(orig), "F32", 1);
  ToyifyOptions o;
  o.out = dir / "toy";
  const auto r = toyify(read_local_source(dir / "src"), o);
  CHECK(r.warnings.empty());
  const auto c = load_config(dir / "toy/config.json");
  CHECK(c.num_heads / c.num_kv_heads == 2);         // GQA ratio kept
  CHECK(c.head_dim * c.num_heads == 2 * c.hidden_size);  // head_dim = 2 x hidden/heads, as 128 = 2 x 1024/16
  CHECK_FALSE(c.tie_word_embeddings);
  const Checkpoint ck(dir / "toy");
  CHECK(ck.contains("lm_head.weight"));
  CHECK(ck.contains("model.layers.0.self_attn.q_norm.weight"));
  CHECK(ck.info("model.norm.weight").dtype == DType::F32);
  CHECK(read_json(dir / "toy/config.json")["eos_token_id"] == c.vocab_size - 1);
  CHECK_FALSE(fs::exists(dir / "toy/model.safetensors.index.json"));  // one file in, one file out
}

TEST_CASE("toyify keeps MoE routing and dense layers among sparse ones") {
  ScratchDir dir("toyify-moe");
  json cfg = {{"model_type", "qwen3_moe"}, {"vocab_size", 151936}, {"hidden_size", 2048}, {"intermediate_size", 6144},
              {"num_hidden_layers", 48}, {"num_attention_heads", 32}, {"num_key_value_heads", 4}, {"head_dim", 128},
              {"num_experts", 128}, {"num_experts_per_tok", 8}, {"moe_intermediate_size", 768},
              {"decoder_sparse_step", 1}, {"norm_topk_prob", true}, {"tie_word_embeddings", false},
              {"mlp_only_layers", {47}}};
  const auto orig = parse_config(cfg, "moe");
  // The fused v5 layout in the source: [E, 2I, H] / [E, H, I].
  auto tensors = expected_parameters(orig, ExpertLayout::Fused);
  write_source(dir / "src", cfg, tensors, "BF16", 3);
  ToyifyOptions o;
  o.out = dir / "toy";
  toyify(read_local_source(dir / "src"), o);
  const auto c = load_config(dir / "toy/config.json");
  CHECK(c.num_experts == 4);
  CHECK(c.num_experts_per_tok == 3);  // top-8 of 128 -> still fewer than the experts
  CHECK(c.mlp_only_layers == std::vector<int64_t>{0});
  CHECK(c.num_heads / c.num_kv_heads == 8);
  const Checkpoint ck(dir / "toy");
  validate_checkpoint(ck);
  CHECK(ck.contains("model.layers.0.mlp.gate_proj.weight"));  // the dense layer (source layer 47)
  CHECK(ck.info("model.layers.1.mlp.experts.gate_up_proj").shape ==
        std::vector<int64_t>{4, 2 * c.moe_intermediate_size, c.hidden_size});
  const auto rec = read_json(dir / "toy/config.json")["_toyified_from"]["tensors"]["toy_layer_from_source_layer"];
  CHECK(rec["0"] == 47);
  CHECK(rec["1"] == 1);
}

TEST_CASE("toyify keeps renamed and extra tensors, by their dimensions") {
  ScratchDir dir("toyify-extra");
  const auto cfg = published_config();
  auto tensors = expected_parameters(parse_config(cfg, "published"));
  for (int l = 0; l < 24; ++l) tensors[fmt::format("model.layers.{}.self_attn.rotary_emb.inv_freq", l)] = {32};
  tensors["model.extra_scale"] = {2048};
  write_source(dir / "src", cfg, tensors);
  ToyifyOptions o;
  o.out = dir / "toy";
  const auto r = toyify(read_local_source(dir / "src"), o);
  const Checkpoint ck(dir / "toy");
  CHECK(ck.info("model.extra_scale").shape == std::vector<int64_t>{96});
  const auto inv = ck.read<double>("model.layers.2.self_attn.rotary_emb.inv_freq", {12});
  for (int i = 0; i < 12; ++i) CHECK(inv[static_cast<size_t>(i)] == Approx(1.0 / std::pow(10000.0, i / 12.0)).epsilon(1e-6));
  // The reference does not know model.extra_scale: said now, not as a failing cell later.
  REQUIRE(r.warnings.size() == 1);
  CHECK(r.warnings[0].find("model.extra_scale") != std::string::npos);
}

TEST_CASE("toyify refuses what it cannot shrink faithfully, naming the key or tensor") {
  ScratchDir dir("toyify-refuse");
  auto cfg = published_config();
  const auto tensors = expected_parameters(parse_config(cfg, "published"));
  ToyifyOptions o;
  o.out = dir / "toy";
  SECTION("an unknown size key") {
    cfg["num_shared_experts"] = 2;
    write_source(dir / "src", cfg, tensors);
    REQUIRE_ERROR_MENTIONS(toyify(read_local_source(dir / "src"), o), "'num_shared_experts'", "= 2");
  }
  SECTION("heads that break the GQA ratio") {
    cfg["num_key_value_heads"] = 8;
    auto t = expected_parameters(parse_config(cfg, "gqa"));
    write_source(dir / "src", cfg, t);
    o.heads = 6;
    REQUIRE_ERROR_MENTIONS(toyify(read_local_source(dir / "src"), o), "--heads 6", "GQA ratio 4");
  }
  SECTION("mixed layer types") {
    cfg["layer_types"] = json::array();
    for (int l = 0; l < 24; ++l) cfg["layer_types"].push_back(l % 2 ? "sliding_attention" : "full_attention");
    write_source(dir / "src", cfg, tensors);
    REQUIRE_ERROR_MENTIONS(toyify(read_local_source(dir / "src"), o), "'layer_types'");
  }
  SECTION("a tensor dimension that is none of the config's sizes") {
    auto t = tensors;
    t["model.mystery"] = {777};
    write_source(dir / "src", cfg, t);
    REQUIRE_ERROR_MENTIONS(toyify(read_local_source(dir / "src"), o), "'model.mystery'", "777");
  }
  SECTION("a model type the reference does not run") {
    cfg["model_type"] = "llama";
    write_source(dir / "src", cfg, tensors);
    REQUIRE_ERROR_MENTIONS(toyify(read_local_source(dir / "src"), o), "model_type 'llama'");
  }
  CHECK_FALSE(fs::exists(dir / "toy/config.json"));
}
