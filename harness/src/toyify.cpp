#include "opensci/harness/toyify.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <regex>
#include <set>

#include "opensci/checkpoint.hpp"
#include "opensci/config.hpp"
#include "opensci/error.hpp"
#include "opensci/harness/hub.hpp"
#include "opensci/harness/toy.hpp"

namespace opensci::harness {
namespace fs = std::filesystem;
using nlohmann::json;

std::vector<SourceTensor> parse_safetensors_header(const json& header, const std::string& shard, const std::string& where) {
  if (!header.is_object()) fail("{}: safetensors header is not a JSON object", where);
  std::vector<SourceTensor> out;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape"))
      fail("{}: tensor '{}': header entry needs dtype and shape", where, name);
    SourceTensor t;
    t.name = name;
    t.shard = shard;
    t.dtype = dtype_from_name(entry["dtype"].get<std::string>());
    t.shape = entry["shape"].get<std::vector<int64_t>>();
    out.push_back(std::move(t));
  }
  return out;
}

namespace {

json read_json_file(const fs::path& p) {
  std::ifstream in(p);
  if (!in) fail("{}: cannot open", p.string());
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    fail("{}: not valid JSON: {}", p.string(), e.what());
  }
}

// The header of a safetensors file, without reading (or mapping) its payload.
json read_header(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) fail("{}: cannot open", p.string());
  uint64_t n = 0;
  if (!in.read(reinterpret_cast<char*>(&n), 8)) fail("{}: truncated safetensors file (no header length)", p.string());
  if (n > (100u << 20)) fail("{}: safetensors header claims {} bytes (limit 100 MB)", p.string(), n);
  std::string text(n, '\0');
  if (!in.read(text.data(), static_cast<std::streamsize>(n))) fail("{}: truncated safetensors header", p.string());
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    fail("{}: malformed safetensors header: {}", p.string(), e.what());
  }
}

}  // namespace

ModelSource read_local_source(const fs::path& dir) {
  if (!fs::is_directory(dir)) fail("{}: not a model directory", dir.string());
  ModelSource s;
  s.description = fs::absolute(dir).lexically_normal().string();
  s.config = read_json_file(dir / "config.json");
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".py") s.code_files[e.path().filename().string()] = e.path();
  const auto index = dir / "model.safetensors.index.json";
  std::set<std::string> shards;
  if (fs::exists(index)) {
    s.sharded = true;
    const auto j = read_json_file(index);
    if (!j.contains("weight_map") || !j["weight_map"].is_object()) fail("{}: index has no 'weight_map' object", index.string());
    for (const auto& [tensor, file] : j["weight_map"].items()) shards.insert(file.get<std::string>());
  } else if (fs::exists(dir / "model.safetensors")) {
    shards.insert("model.safetensors");
  } else {
    fail("{}: no model.safetensors or model.safetensors.index.json", dir.string());
  }
  for (const auto& shard : shards) {
    auto t = parse_safetensors_header(read_header(dir / shard), shard, (dir / shard).string());
    s.tensors.insert(s.tensors.end(), t.begin(), t.end());
  }
  return s;
}

namespace {

struct Change {
  std::string key;
  json from, to;
  std::string why;
};

int64_t round_to(double x, int64_t multiple) {
  return std::max<int64_t>(multiple, static_cast<int64_t>(std::llround(x / static_cast<double>(multiple))) * multiple);
}

// Keys toyify understands (it shrinks them or knows they stay valid at any size). Any other
// integer key that looks like a size is refused: a toy whose config and weights disagree, or
// that silently lost a feature, would make every cell meaningless.
const std::set<std::string> kHandled = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "num_experts", "num_local_experts", "num_experts_per_tok",
    "moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers", "layer_types", "bos_token_id",
    "eos_token_id", "pad_token_id"};
const std::set<std::string> kSizeFree = {
    "max_position_embeddings",  // RoPE needs no table; any prompt of the matrix fits
    "max_window_layers", "sliding_window",  // inert without use_sliding_window (refused when on)
    "pretraining_tp",  // 1 in every published config; > 1 is refused below
    "original_max_position_embeddings", "num_nextn_predict_layers_unused"};

bool looks_like_size(const std::string& key) {
  static const std::regex size_words(R"((size|dim|head|layer|expert|rank|group|vocab|window|^num_|^n_))");
  return std::regex_search(key, size_words);
}

struct DimMap {
  std::map<int64_t, std::set<int64_t>> to;
  void add(int64_t from, int64_t target) {
    if (from > 1) to[from].insert(target);
  }
};

// Round-to-nearest-even f32 -> f16 (the checkpoint may be float16).
uint16_t f32_to_f16(float value) {
  uint32_t x;
  std::memcpy(&x, &value, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const int32_t exp = static_cast<int32_t>((x >> 23) & 0xff) - 127 + 15;
  uint32_t mant = x & 0x7fffffu;
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7c00u);  // toy values never get here
  if (exp <= 0) {
    if (exp < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000u;
    const int shift = 14 - exp;
    uint32_t half = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = sign | (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) ++half;
  return static_cast<uint16_t>(half);
}

std::vector<std::byte> encode(const std::vector<float>& v, DType dtype) {
  std::vector<std::byte> out(v.size() * dtype_size(dtype));
  for (size_t i = 0; i < v.size(); ++i) {
    if (dtype == DType::F32) {
      std::memcpy(out.data() + 4 * i, &v[i], 4);
    } else if (dtype == DType::F64) {
      const double d = v[i];
      std::memcpy(out.data() + 8 * i, &d, 8);
    } else {
      const uint16_t b = dtype == DType::BF16 ? f32_to_bf16(v[i]) : f32_to_f16(v[i]);
      std::memcpy(out.data() + 2 * i, &b, 2);
    }
  }
  return out;
}

std::vector<ExpertLayout> layouts_of(const ModelConfig& c, const std::vector<SourceTensor>& tensors) {
  std::vector<ExpertLayout> layouts(static_cast<size_t>(c.num_layers), ExpertLayout::PerExpert);
  std::set<std::string> names;
  for (const auto& t : tensors) names.insert(t.name);
  for (int64_t l = 0; l < c.num_layers; ++l)
    if (names.count(fmt::format("model.layers.{}.mlp.experts.gate_up_proj", l))) layouts[static_cast<size_t>(l)] = ExpertLayout::Fused;
  return layouts;
}

}  // namespace

ToyifyResult toyify(const ModelSource& src, const ToyifyOptions& o) {
  const auto where = src.description + "/config.json";
  json cfg = src.config;
  if (!cfg.is_object()) fail("{}: config must be a JSON object", where);
  cfg.erase("_toyified_from");  // toyifying a toy again records the new changes only
  const auto orig = parse_config(cfg, where);  // refuses model types and keys the reference cannot run
  std::vector<Change> changes;
  auto set = [&](const std::string& key, const json& value, const std::string& why) {
    const json from = cfg.contains(key) ? cfg[key] : json("(absent)");
    if (from == value) return;
    changes.push_back({key, from, value, why});
    cfg[key] = value;
  };

  // Keys that cannot stay as they are, or that we cannot shrink faithfully: refuse, naming them.
  for (const auto& [key, value] : src.config.items()) {
    if (key.starts_with("_") || kHandled.count(key) || kSizeFree.count(key)) continue;
    const bool size_like = (value.is_number_integer() && value.get<int64_t>() > 1) ||
                           (value.is_array() && !value.empty() && value[0].is_number_integer());
    if (size_like && looks_like_size(key))
      fail("{}: config key '{}' = {} looks like a model dimension that toyify does not know how to shrink; refusing "
           "rather than writing a toy whose config and weights disagree",
           where, key, value.dump());
  }
  if (cfg.value("use_sliding_window", false))
    fail("{}: config key 'use_sliding_window' is true: the reference has full causal attention only", where);
  if (cfg.contains("pretraining_tp") && cfg["pretraining_tp"].is_number_integer() && cfg["pretraining_tp"].get<int64_t>() > 1)
    fail("{}: config key 'pretraining_tp' = {}: sliced-linear emulation is not something a toy can keep", where,
         cfg["pretraining_tp"].dump());

  // --- sizes ---
  const int64_t ratio = orig.num_heads / orig.num_kv_heads;  // GQA ratio (1 = MHA)
  int64_t heads = o.heads.value_or(ratio * std::max<int64_t>(1, std::llround(4.0 / static_cast<double>(ratio))));
  heads = std::min(heads, orig.num_heads);
  int64_t kv = 0;
  if (o.kv_heads) {
    kv = *o.kv_heads;
    if (kv <= 0 || heads % kv != 0)
      fail("{}: --kv-heads {} does not divide --heads {} (num_attention_heads must be a multiple of num_key_value_heads)",
           where, kv, heads);
  } else {
    if (heads % ratio != 0)
      fail("{}: --heads {} cannot keep the GQA ratio {} (num_attention_heads {} / num_key_value_heads {}); give "
           "--kv-heads too",
           where, heads, ratio, orig.num_heads, orig.num_kv_heads);
    kv = heads / ratio;
  }
  const int64_t hidden = o.hidden.value_or(std::min<int64_t>(orig.hidden_size, 96));
  // head_dim: keep head_dim == hidden/heads when the source has it, else keep head_dim's
  // proportion to hidden/heads (and its inequality).
  const bool dim_follows = orig.head_dim * orig.num_heads == orig.hidden_size;
  int64_t head_dim = 0;
  if (dim_follows) {
    if (hidden % heads != 0)
      fail("{}: hidden {} is not divisible by heads {}, but the source's head_dim is hidden_size/num_attention_heads "
           "(config key 'head_dim'); choose --hidden and --heads to match",
           where, hidden, heads);
    head_dim = hidden / heads;
  } else {
    const double scale = static_cast<double>(orig.head_dim) * static_cast<double>(orig.num_heads) /
                         static_cast<double>(orig.hidden_size);
    head_dim = round_to(scale * static_cast<double>(hidden) / static_cast<double>(heads), 2);
    if (head_dim * heads == hidden) head_dim += 2;
  }
  if (head_dim % 2 != 0)
    fail("{}: toy head_dim {} (hidden {} / heads {}) is odd; rotate-half RoPE needs an even head_dim", where, head_dim,
         hidden, heads);
  const auto per_hidden = [&](int64_t size) {
    return round_to(static_cast<double>(size) * static_cast<double>(hidden) / static_cast<double>(orig.hidden_size), 8);
  };
  const int64_t vocab = o.vocab.value_or(std::min<int64_t>(orig.vocab_size, 384));
  if (vocab > orig.vocab_size) fail("{}: --vocab {} is larger than the source's vocab_size {}", where, vocab, orig.vocab_size);

  const std::string heads_why = ratio == 1 ? "toy size; multi-head attention kept (num_key_value_heads == num_attention_heads)"
                                           : fmt::format("toy size; GQA ratio {} kept", heads / kv);
  set("num_attention_heads", heads, "toy size");
  if (src.config.contains("num_key_value_heads") || kv != heads)
    set("num_key_value_heads", kv, heads / kv == ratio ? heads_why : fmt::format("GQA ratio {} -> {} (--kv-heads)", ratio, heads / kv));
  set("hidden_size", hidden, "toy size");
  const bool qwen3_class =
      orig.lineage == Lineage::Qwen3 || orig.lineage == Lineage::OpenSciQwen3 || orig.lineage == Lineage::Qwen3Moe;
  if (src.config.contains("head_dim") && !src.config["head_dim"].is_null()) {
    set("head_dim", head_dim, dim_follows ? "hidden_size / num_attention_heads, as in the source"
                                          : "keeps head_dim's proportion to hidden_size/num_attention_heads (and "
                                            "their inequality)");
  } else if (!dim_follows || qwen3_class) {
    set("head_dim", head_dim, qwen3_class ? "written out: an absent head_dim means 128 for this config class, far too "
                                            "big for a toy; proportion to hidden/heads kept"
                                          : "written out: toy head_dim differs from hidden/heads as in the source");
  }
  if (orig.intermediate_size > 0 && src.config.contains("intermediate_size"))
    set("intermediate_size", o.ffn.value_or(per_hidden(orig.intermediate_size)),
        o.ffn ? "toy size (--ffn)" : "toy size, in the source's proportion to hidden_size");
  set("vocab_size", vocab, "toy size (the matrix's token batches use ids < 256)");
  for (const char* key : {"bos_token_id", "eos_token_id", "pad_token_id"}) {
    if (!cfg.contains(key) || !cfg[key].is_number_integer()) continue;
    if (cfg[key].get<int64_t>() >= vocab)
      set(key, vocab - 1, fmt::format("{} must be a token of the toy vocabulary", key));
  }

  // --- experts ---
  int64_t experts = 0;
  if (orig.is_moe()) {
    experts = std::min(o.experts.value_or(4), orig.num_experts);
    for (const char* key : {"num_experts", "num_local_experts"})
      if (src.config.contains(key) && !src.config[key].is_null()) set(key, experts, "toy size");
    int64_t topk = std::min(orig.num_experts_per_tok, experts);
    if (orig.num_experts_per_tok < orig.num_experts && topk >= experts && experts > 1) topk = experts - 1;
    set("num_experts_per_tok", topk,
        topk == orig.num_experts_per_tok ? "kept" : "at most the toy expert count, and still fewer (routing stays a choice)");
    set("moe_intermediate_size", o.moe_ffn.value_or(per_hidden(orig.moe_intermediate_size)),
        o.moe_ffn ? "toy size (--moe-ffn)" : "toy size, in the source's proportion to hidden_size");
  } else if (o.experts) {
    fail("{}: --experts given, but the source is a dense model (no 'num_experts')", where);
  }

  // --- layers: keep dense layers among sparse ones, and the decoder_sparse_step rhythm ---
  std::vector<int64_t> src_of;  // toy layer -> source layer
  auto plan_layers = [&](int64_t n) -> bool {
    json toy_cfg = cfg;
    toy_cfg["num_hidden_layers"] = n;
    std::vector<int64_t> dense;
    if (orig.is_moe()) {
      for (auto l : orig.mlp_only_layers)
        if (l < n) dense.push_back(l);
      if (!orig.mlp_only_layers.empty() && dense.empty()) dense.push_back(0);
      toy_cfg["mlp_only_layers"] = dense;
    }
    const auto toy = parse_config(toy_cfg, where);
    src_of.assign(static_cast<size_t>(n), -1);
    std::set<int64_t> used;
    bool has_sparse = false, has_dense = false;
    for (int64_t l = 0; l < n; ++l) {
      const bool sparse = toy.is_sparse_layer(l);
      (sparse ? has_sparse : has_dense) = true;
      int64_t pick = -1;
      if (l < orig.num_layers && orig.is_sparse_layer(l) == sparse) pick = l;
      for (int64_t j = 0; pick < 0 && j < orig.num_layers; ++j)
        if (!used.count(j) && orig.is_sparse_layer(j) == sparse) pick = j;
      if (pick < 0) return false;
      used.insert(pick);
      src_of[static_cast<size_t>(l)] = pick;
    }
    bool orig_sparse = false, orig_dense = false;
    for (int64_t l = 0; l < orig.num_layers; ++l) (orig.is_sparse_layer(l) ? orig_sparse : orig_dense) = true;
    return has_sparse == orig_sparse && has_dense == orig_dense;
  };
  int64_t layers = o.layers.value_or(std::min<int64_t>(orig.num_layers, std::max<int64_t>(3, orig.decoder_sparse_step)));
  if (layers > orig.num_layers) fail("{}: --layers {} exceeds the source's num_hidden_layers {}", where, layers, orig.num_layers);
  while (!plan_layers(layers)) {
    if (o.layers || layers >= orig.num_layers)
      fail("{}: {} layers cannot keep both dense and sparse layers of the source (config keys 'mlp_only_layers' {}, "
           "'decoder_sparse_step' {}); use more --layers",
           where, layers, json(orig.mlp_only_layers).dump(), orig.decoder_sparse_step);
    ++layers;
  }
  set("num_hidden_layers", layers, "toy size");
  if (orig.is_moe() && src.config.contains("mlp_only_layers")) {
    std::vector<int64_t> dense;
    for (auto l : orig.mlp_only_layers)
      if (l < layers) dense.push_back(l);
    if (!orig.mlp_only_layers.empty() && dense.empty()) dense.push_back(0);
    set("mlp_only_layers", dense, "dense layers among the sparse ones kept (layer indices of the toy)");
  }
  if (src.config.contains("layer_types") && src.config["layer_types"].is_array()) {
    const auto& types = src.config["layer_types"];
    for (const auto& t : types)
      if (t != types[0])
        fail("{}: config key 'layer_types' mixes {} and {}; the reference has one attention kind", where, types[0].dump(),
             t.dump());
    set("layer_types", json(std::vector<json>(static_cast<size_t>(layers), types.empty() ? json() : types[0])),
        "one entry per toy layer");
  }
  const auto toy = parse_config(cfg, "toy config of " + where);

  // --- tensors ---
  const auto orig_layouts = layouts_of(orig, src.tensors);
  std::vector<ExpertLayout> toy_layouts;
  for (auto s : src_of) toy_layouts.push_back(orig_layouts[static_cast<size_t>(s)]);
  const auto orig_expected = expected_parameters(orig, orig_layouts);
  const auto toy_expected = expected_parameters(toy, toy_layouts);
  std::map<int64_t, int64_t> toy_of;  // source layer -> toy layer
  for (size_t l = 0; l < src_of.size(); ++l) toy_of[src_of[l]] = static_cast<int64_t>(l);

  DimMap dims;
  const int64_t D = orig.head_dim, Dt = toy.head_dim;
  dims.add(orig.vocab_size, toy.vocab_size);
  dims.add(orig.hidden_size, toy.hidden_size);
  dims.add(D, Dt);
  dims.add(D / 2, Dt / 2);
  dims.add(orig.num_heads * D, toy.num_heads * Dt);
  dims.add(orig.num_kv_heads * D, toy.num_kv_heads * Dt);
  dims.add((orig.num_heads + 2 * orig.num_kv_heads) * D, (toy.num_heads + 2 * toy.num_kv_heads) * Dt);
  if (orig.intermediate_size > 0) {
    dims.add(orig.intermediate_size, toy.intermediate_size);
    dims.add(2 * orig.intermediate_size, 2 * toy.intermediate_size);
  }
  if (orig.is_moe()) {
    dims.add(orig.num_experts, toy.num_experts);
    dims.add(orig.moe_intermediate_size, toy.moe_intermediate_size);
    dims.add(2 * orig.moe_intermediate_size, 2 * toy.moe_intermediate_size);
  }

  static const std::regex layer_re(R"(^(.*?\blayers\.)(\d+)(\..+)$)");
  static const std::regex expert_re(R"(^(.*\bexperts\.)(\d+)(\..+)$)");
  ToyifyResult result;
  std::map<std::string, SafetensorsWriter> shards;
  std::map<std::string, std::string> weight_map;
  size_t total_bytes = 0;
  for (const auto& t : src.tensors) {
    std::string name = t.name;
    std::smatch m;
    if (std::regex_match(t.name, m, layer_re)) {
      const auto it = toy_of.find(std::stoll(m[2].str()));
      if (it == toy_of.end()) {
        ++result.dropped;
        continue;
      }
      name = m[1].str() + std::to_string(it->second) + m[3].str();
    }
    if (std::regex_match(name, m, expert_re) && std::stoll(m[2].str()) >= experts && orig.is_moe()) {
      ++result.dropped;
      continue;
    }
    std::vector<int64_t> shape;
    const auto known = orig_expected.find(t.name);
    if (known != orig_expected.end() && known->second == t.shape && toy_expected.count(name)) {
      shape = toy_expected.at(name);
    } else {
      // A tensor the lineage does not name (renamed, extra, a persisted buffer): map each dim by value.
      for (size_t d = 0; d < t.shape.size(); ++d) {
        const auto v = t.shape[d];
        if (v == 1) {
          shape.push_back(1);
          continue;
        }
        const auto it = dims.to.find(v);
        if (it == dims.to.end())
          fail("{}: tensor '{}' {} in {}: dimension {} ({}) is none of the config's sizes (vocab, hidden, head_dim, "
               "heads x head_dim, ffn, experts), so toyify cannot tell what it becomes",
               src.description, t.name, shape_str(t.shape), t.shard, d, v);
        if (it->second.size() != 1)
          fail("{}: tensor '{}' {} in {}: dimension {} ({}) is more than one of the config's sizes, which shrink to "
               "different toy sizes {}; refusing to guess",
               src.description, t.name, shape_str(t.shape), t.shard, d, v, json(std::vector<int64_t>(it->second.begin(), it->second.end())).dump());
        shape.push_back(*it->second.begin());
      }
    }
    if (t.dtype != DType::F32 && t.dtype != DType::BF16 && t.dtype != DType::F16 && t.dtype != DType::F64)
      fail("{}: tensor '{}' in {} has dtype {}; toyify writes floating-point parameters only", src.description, t.name,
           t.shard, dtype_name(t.dtype));
    const auto count = element_count(shape);
    std::vector<float> values;
    if (name.ends_with("inv_freq")) {
      // A persisted RoPE buffer holds 1/theta^(2i/d), not noise.
      for (int64_t i = 0; i < count; ++i)
        values.push_back(static_cast<float>(1.0 / std::pow(toy.rope_theta, 2.0 * static_cast<double>(i) /
                                                                              (2.0 * static_cast<double>(count)))));
    } else {
      values = toy_values(name, count, toy, o.seed);
    }
    auto payload = encode(values, t.dtype);
    total_bytes += payload.size();
    shards[t.shard].add(name, t.dtype, shape, std::move(payload));
    weight_map[name] = t.shard;
    ++result.tensors;
  }

  // --- write ---
  fs::create_directories(o.out);
  for (const auto& e : fs::directory_iterator(o.out))
    if (e.path().extension() == ".safetensors" || e.path().filename() == "model.safetensors.index.json") fs::remove(e.path());
  for (auto& [shard, writer] : shards) {
    writer.set_metadata("format", "pt");
    writer.set_metadata("opensci_toyify_seed", std::to_string(o.seed));
    writer.write(o.out / shard);
  }
  if (src.sharded) {
    const json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
    std::ofstream(o.out / "model.safetensors.index.json") << index.dump(2) << "\n";
  }
  for (const auto& [file, path] : src.code_files) fs::copy_file(path, o.out / file, fs::copy_options::overwrite_existing);

  json record = {{"source", src.description}, {"by", "opensci-compat toyify"}, {"seed", o.seed}, {"changes", json::array()}};
  for (const auto& c : changes) record["changes"].push_back({{"key", c.key}, {"from", c.from}, {"to", c.to}, {"why", c.why}});
  json layer_map = json::object();
  for (size_t l = 0; l < src_of.size(); ++l) layer_map[std::to_string(l)] = src_of[l];
  record["tensors"] = {{"written", result.tensors},
                       {"dropped", result.dropped},
                       {"toy_layer_from_source_layer", layer_map},
                       {"names_dtypes_shards", "the source's own (from its index and safetensors headers)"},
                       {"values", "deterministic per-tensor streams of the toy builder (harness/toy.hpp) for this seed"}};
  record["kept"] = "every other config key, unchanged; the remote code (*.py), byte for byte";
  cfg["_toyified_from"] = record;
  {
    std::ofstream out(o.out / "config.json.tmp");
    out << cfg.dump(2) << "\n";
  }
  fs::rename(o.out / "config.json.tmp", o.out / "config.json");

  // The reference reads the toy like any checkpoint; a tensor it does not know is the user's to
  // see now, not as a failing cell later.
  try {
    validate_checkpoint(Checkpoint(o.out));
  } catch (const Error& e) {
    result.warnings.push_back(fmt::format("the reference cannot run this toy as it stands: {}", e.what()));
  }
  result.record = record;
  return result;
}

}  // namespace opensci::harness

namespace opensci::harness {

ModelSource read_model_source(const std::string& from) {
  if (fs::is_directory(from)) return read_local_source(from);
  if (!looks_like_repo_spec(from)) fail("{}: neither a model directory nor a Hub repo id ORG/NAME[@REVISION]", from);
  HubClient client;
  return read_hub_source(from, client);
}

}  // namespace opensci::harness
