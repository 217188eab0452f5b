#include <nlohmann/json.hpp>

#include "opensci/config.hpp"
#include "opensci/error.hpp"
#include "test_helpers.hpp"

using namespace opensci;
using nlohmann::json;

namespace {

json base_config() {
  return json::parse(R"({"model_type": "opensci", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "qk_layernorm": true,
                         "attention_bias": true, "tie_word_embeddings": true})");
}

}  // namespace

TEST_CASE("every toy config parses with its lineage") {
  const auto dir = opensci::test::source_dir() / "toy_configs";
  CHECK(load_config(dir / "opensci-ref.json").lineage == Lineage::OpenSciRef);
  const auto q = load_config(dir / "opensci-qwen3.json");
  CHECK(q.lineage == Lineage::OpenSciQwen3);
  CHECK(q.qk_norm);
  CHECK(q.num_kv_heads < q.num_heads);
  CHECK_FALSE(q.tie_word_embeddings);
  const auto t = load_config(dir / "opensci-ref-theta.json");
  CHECK(t.rope_theta == 100000.0);
  CHECK(t.head_dim != t.hidden_size / t.num_heads);
}

TEST_CASE("lineage rule and defaults") {
  auto j = base_config();
  auto c = parse_config(j, "cfg.json");
  CHECK(c.lineage == Lineage::OpenSciRef);
  CHECK(c.q_norm_name() == "q_layernorm");
  CHECK(c.head_dim == 8);
  CHECK(c.num_kv_heads == 4);
  CHECK(c.mlp_bias);            // opensci default
  CHECK(c.rms_norm_eps == 1e-5);  // open-sci-ref default
  j.erase("qk_layernorm");
  j.erase("tie_word_embeddings");
  c = parse_config(j, "cfg.json");
  CHECK(c.lineage == Lineage::OpenSciQwen3);
  CHECK(c.head_dim == 128);               // Qwen3Config's default, not hidden / heads
  CHECK_FALSE(c.tie_word_embeddings);     // Qwen3Config's default
  CHECK(c.qk_norm);
  CHECK(c.k_norm_name() == "k_norm");
  j["model_type"] = "qwen3";
  // Native qwen3 takes Qwen3Config's num_key_value_heads default (32), which 4 heads cannot use.
  REQUIRE_ERROR_MENTIONS(parse_config(j, "cfg.json"), "num_key_value_heads 32");
  j["num_key_value_heads"] = 2;
  CHECK_FALSE(parse_config(j, "cfg.json").mlp_bias);
}

TEST_CASE("rope_theta from a v4 or a v5 config") {
  auto j = base_config();
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 500000.0}};
  CHECK(parse_config(j, "v5.json").rope_theta == 500000.0);
  j["rope_theta"] = 10000;
  REQUIRE_ERROR_MENTIONS(parse_config(j, "v5.json"), "v5.json", "disagrees");
  j.erase("rope_parameters");
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  REQUIRE_ERROR_MENTIONS(parse_config(j, "y.json"), "y.json", "yarn", "not supported");
}

TEST_CASE("a config missing a key or with a bad value is a clear error") {
  for (const char* key : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"}) {
    auto j = base_config();
    j.erase(key);
    REQUIRE_ERROR_MENTIONS(parse_config(j, "my/config.json"), "my/config.json", "missing required key", key);
  }
  auto j = base_config();
  j["hidden_size"] = "big";
  REQUIRE_ERROR_MENTIONS(parse_config(j, "c.json"), "c.json", "'hidden_size'", "positive integer");
  j = base_config();
  j["num_key_value_heads"] = 3;
  REQUIRE_ERROR_MENTIONS(parse_config(j, "c.json"), "num_key_value_heads 3");
  j = base_config();
  j["hidden_act"] = "gelu";
  REQUIRE_ERROR_MENTIONS(parse_config(j, "c.json"), "gelu");
  j = base_config();
  j["model_type"] = "gpt2";
  REQUIRE_ERROR_MENTIONS(parse_config(j, "c.json"), "gpt2");
  j = base_config();
  j["attention_bias"] = "yes";
  REQUIRE_ERROR_MENTIONS(parse_config(j, "c.json"), "'attention_bias'", "true or false");
  REQUIRE_ERROR_MENTIONS(load_config("/nonexistent/config.json"), "/nonexistent/config.json");
}
