// The streaming checkpoint converter (see convert.hpp for the formats and guarantees).
//
// Three phases:
//   1. read every shard header (no payload) and match the input tensors against the input
//      format's layout; this yields, for each canonical tensor (HF per-expert name), the input
//      byte ranges it is made of. All problems are collected and thrown together.
//   2. plan the output: each output tensor lists canonical byte ranges; it can be written once
//      the last input shard it depends on has been read ("its step").
//   3. stream: for step s, map the s-th shard of every input rank, write the output shards of
//      step s, keep copies of the few input tensors a later step still needs, unmap.
#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>
#include <regex>
#include <set>

#include "layout.hpp"
#include "opensci/checkpoint.hpp"
#include "opensci/convert.hpp"
#include "opensci/error.hpp"
#include "opensci/safetensors.hpp"
#include "shard_writer.hpp"

namespace opensci::convert {
namespace fs = std::filesystem;

std::string_view format_name(Format f) {
  switch (f) {
    case Format::HfPerExpert: return "hf-per-expert";
    case Format::HfFused: return "hf-fused";
    case Format::Megatron: return "megatron";
  }
  return "?";
}

Format format_from_name(std::string_view name) {
  for (auto f : {Format::HfPerExpert, Format::HfFused, Format::Megatron})
    if (format_name(f) == name) return f;
  fail("unknown checkpoint format '{}' (expected hf-per-expert, hf-fused or megatron)", name);
}

std::string megatron_rank_dir(int rank) { return fmt::format("mp_rank_{:02d}", rank); }

namespace {

constexpr const char* kIndexName = "model.safetensors.index.json";

// ---------------------------------------------------------------------------------------------
// Phase 1a: the input files and their headers.

struct InputFile {
  fs::path path;
  int part = 0;  // tensor-parallel rank (0 for HF)
  int step = 0;  // shard position within its rank: files of one step are read together
};

struct InputTensor {
  int file = 0;
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  uint64_t bytes = 0;
};

struct InputSet {
  fs::path dir;
  bool megatron = false;
  int tp = 1;
  int steps = 0;
  std::vector<InputFile> files;
  std::vector<InputTensor> tensors;
  std::vector<std::map<std::string, int>> by_name;  // per part: name -> tensor id
  std::string where(int id) const {                 // "mp_rank_01/model-00001-of-00002.safetensors"
    const auto& p = files[static_cast<size_t>(tensors[static_cast<size_t>(id)].file)].path;
    return fs::relative(p, dir).string();
  }
};

// Shard files of one HF-style directory in read order, checked against the index when there is one.
std::vector<std::string> shard_files(const fs::path& dir, std::vector<std::string>& problems,
                                     std::map<std::string, std::string>& declared) {
  const auto index_path = dir / kIndexName;
  if (fs::exists(index_path)) {
    std::ifstream in(index_path);
    nlohmann::json index;
    try {
      index = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
      fail("{}: index is not valid JSON: {}", index_path.string(), e.what());
    }
    if (!index.contains("weight_map") || !index["weight_map"].is_object())
      fail("{}: index has no 'weight_map' object", index_path.string());
    std::set<std::string> files;
    for (const auto& [tensor, file] : index["weight_map"].items()) {
      if (!file.is_string()) fail("{}: weight_map['{}'] is not a file name", index_path.string(), tensor);
      declared[tensor] = file.get<std::string>();
      files.insert(file.get<std::string>());
    }
    for (const auto& f : files)
      if (!fs::exists(dir / f)) problems.push_back(fmt::format("{}: lists shard {}, which does not exist", index_path.string(), f));
    std::vector<std::string> out;
    for (const auto& f : files)
      if (fs::exists(dir / f)) out.push_back(f);
    return out;
  }
  if (fs::exists(dir / "model.safetensors")) return {"model.safetensors"};
  fail("{}: no model.safetensors or {} (expected an HF-style shard set)", dir.string(), kIndexName);
}

void read_rank(InputSet& in, const fs::path& dir, int part, std::vector<std::string>& problems) {
  std::map<std::string, std::string> declared;
  const auto files = shard_files(dir, problems, declared);
  if (in.by_name.size() <= static_cast<size_t>(part)) in.by_name.resize(static_cast<size_t>(part) + 1);
  auto& names = in.by_name[static_cast<size_t>(part)];
  for (size_t k = 0; k < files.size(); ++k) {
    const int file_id = static_cast<int>(in.files.size());
    in.files.push_back({dir / files[k], part, static_cast<int>(k)});
    in.steps = std::max(in.steps, static_cast<int>(k) + 1);
    const SafetensorsFile shard(dir / files[k]);  // maps the file; only the header is touched
    for (const auto& t : shard.tensors()) {
      const int id = static_cast<int>(in.tensors.size());
      in.tensors.push_back({file_id, t.name, t.dtype, t.shape, t.size});
      auto [it, inserted] = names.emplace(t.name, id);
      if (!inserted)
        problems.push_back(fmt::format("duplicate tensor '{}': in {} and in {}", t.name, in.where(it->second),
                                       in.where(id)));
      if (!declared.empty()) {
        auto d = declared.find(t.name);
        if (d == declared.end())
          problems.push_back(fmt::format("{}: holds tensor '{}', which {} does not list", in.where(id), t.name, kIndexName));
        else if (d->second != files[k])
          problems.push_back(
              fmt::format("{}: index places tensor '{}' in {}, found in {}", (dir / kIndexName).string(), t.name,
                          d->second, files[k]));
      }
    }
  }
  for (const auto& [tensor, file] : declared)
    if (!names.count(tensor))
      problems.push_back(fmt::format("{}: lists tensor '{}' in {}, but that shard does not contain it",
                                     (dir / kIndexName).string(), tensor, file));
}

InputSet read_inputs(const fs::path& dir, std::vector<std::string>& problems) {
  InputSet in;
  in.dir = dir;
  if (!fs::is_directory(dir)) fail("{}: input is not a directory", dir.string());
  if (fs::is_directory(dir / megatron_rank_dir(0))) {
    in.megatron = true;
    static const std::regex rank_re(R"(mp_rank_(\d{2}))"), pp_re(R"(mp_rank_\d{2}_\d{3})");
    std::set<int> ranks;
    for (const auto& entry : fs::directory_iterator(dir)) {
      const auto name = entry.path().filename().string();
      std::smatch m;
      if (std::regex_match(name, pp_re))
        fail("{}: {} is a pipeline-parallel rank directory; only tensor parallelism is supported (merge pipeline "
             "stages first)",
             dir.string(), name);
      if (entry.is_directory() && std::regex_match(name, m, rank_re)) ranks.insert(std::stoi(m[1].str()));
    }
    in.tp = static_cast<int>(ranks.size());
    for (int r = 0; r < in.tp; ++r)
      if (!ranks.count(r))
        fail("{}: tensor-parallel rank directories must be mp_rank_00 .. mp_rank_{:02d}; {} is missing", dir.string(),
             in.tp - 1, megatron_rank_dir(r));
    for (int r = 0; r < in.tp; ++r) read_rank(in, dir / megatron_rank_dir(r), r, problems);
  } else {
    read_rank(in, dir, 0, problems);
  }
  return in;
}

// ---------------------------------------------------------------------------------------------
// Phase 1b: canonical tensors and where their bytes are.

struct Piece {             // canonical bytes [offset, offset + length) = input bytes at input_offset
  uint64_t offset = 0;
  uint64_t length = 0;
  int input = -1;
  uint64_t input_offset = 0;
};

// canonical [cols, src_rows] = transpose of a [src_rows, cols] block of the input (row stride
// `stride`, first column `col_begin`, element offset `base`): the transposed fused layout.
struct Transposed {
  int input = -1;
  int64_t base = 0, src_rows = 0, stride = 0, col_begin = 0, cols = 0;
};

struct Canonical {
  std::string name;
  std::vector<int64_t> shape;
  std::optional<DType> dtype;
  std::string dtype_from;  // input tensor that set the dtype, for messages
  std::vector<Piece> pieces;
  std::optional<Transposed> transposed;
  std::vector<int> replicas;  // input tensors that must equal this canonical byte for byte
  bool extra = false;         // not a parameter of the config (inv_freq buffer, tied lm_head)
  int step = -1;              // last input step it depends on
  uint64_t bytes() const { return static_cast<uint64_t>(element_count(shape)) * dtype_size(*dtype); }
};

struct Model {
  ModelConfig config;
  std::vector<Canonical> canon;
  std::map<std::string, int> canon_id;
  std::string from;  // description of the input layout
  std::vector<std::string> notes;
};

[[noreturn]] void throw_problems(const std::string& what, const std::vector<std::string>& problems) {
  std::string text = fmt::format("{}: {} problem{}:", what, problems.size(), problems.size() == 1 ? "" : "s");
  const size_t shown = std::min<size_t>(problems.size(), 40);
  for (size_t i = 0; i < shown; ++i) text += "\n  - " + problems[i];
  if (shown < problems.size()) text += fmt::format("\n  ... and {} more", problems.size() - shown);
  throw Error(text);
}

bool is_extra_name(const ModelConfig& c, const std::string& name) {
  return name.ends_with("rotary_emb.inv_freq") || (name == "lm_head.weight" && c.tie_word_embeddings);
}

// Groups missing expert tensors per (rank, layer, kind) so a partial set reads as one line.
struct ExpertName {
  int64_t layer, expert;
  std::string kind;
};
std::optional<ExpertName> parse_expert_name(const std::string& name) {
  static const std::regex hf(R"(model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight)");
  static const std::regex seq(R"(decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight)");
  static const std::regex grp(R"(decoder\.layers\.(\d+)\.mlp\.experts\.(linear_fc1|linear_fc2)\.weight(\d+))");
  std::smatch m;
  if (std::regex_match(name, m, hf) || std::regex_match(name, m, seq))
    return ExpertName{std::stoll(m[1].str()), std::stoll(m[2].str()), m[3].str()};
  if (std::regex_match(name, m, grp)) return ExpertName{std::stoll(m[1].str()), std::stoll(m[3].str()), m[2].str()};
  return std::nullopt;
}

std::string layer_of(const std::string& name) {
  static const std::regex re(R"((?:model|decoder)\.layers\.(\d+)\..*)");
  std::smatch m;
  return std::regex_match(name, m, re) ? m[1].str() : std::string();
}

void report_missing(const std::vector<std::pair<int, std::string>>& missing, const InputSet& in, const ModelConfig& c,
                    std::vector<std::string>& problems) {
  std::map<std::tuple<int, int64_t, std::string>, std::vector<int64_t>> experts;
  for (const auto& [part, name] : missing) {
    const auto rank = in.megatron ? fmt::format("{}: ", megatron_rank_dir(part)) : std::string();
    if (auto e = parse_expert_name(name)) {
      experts[{part, e->layer, e->kind}].push_back(e->expert);
    } else {
      problems.push_back(fmt::format("{}missing tensor '{}'", rank, name));
    }
  }
  for (const auto& [key, list] : experts) {
    const auto& [part, layer, kind] = key;
    const auto rank = in.megatron ? fmt::format("{}: ", megatron_rank_dir(part)) : std::string();
    problems.push_back(fmt::format(
        "{}layer {}: {} missing for expert{} {} ({} of {} present); a sparse layer needs every expert (or, in HF "
        "names, the fused mlp.experts.gate_up_proj [E, 2I, H] + mlp.experts.down_proj [E, H, I])",
        rank, layer, kind, list.size() == 1 ? "" : "s", fmt::join(list, ", "),
        c.num_experts - static_cast<int64_t>(list.size()), c.num_experts));
  }
}

std::string describe_unexpected(const InputSet& in, int id, const ModelConfig& c) {
  const auto& t = in.tensors[static_cast<size_t>(id)];
  std::string why = fmt::format("a {} config in this layout has no such tensor", lineage_name(c.lineage));
  if (auto e = parse_expert_name(t.name)) {
    if (e->layer >= c.num_layers)
      why = fmt::format("layer {} is out of range (num_hidden_layers {})", e->layer, c.num_layers);
    else if (!c.is_sparse_layer(e->layer))
      why = fmt::format("layer {} is dense in the config (mlp_only_layers / decoder_sparse_step)", e->layer);
    else if (e->expert >= c.num_experts)
      why = fmt::format("expert index {} is out of range (num_experts {})", e->expert, c.num_experts);
  } else if (t.name.find(".mlp.experts.") != std::string::npos || t.name.find(".mlp.gate.") != std::string::npos ||
             t.name.find(".mlp.router.") != std::string::npos) {
    const auto l = layer_of(t.name);
    if (!l.empty() && std::stoll(l) < c.num_layers && !c.is_sparse_layer(std::stoll(l)))
      why = fmt::format("layer {} is dense in the config (mlp_only_layers / decoder_sparse_step)", l);
  }
  return fmt::format("unexpected tensor '{}' {} {} in {}: {}", t.name, dtype_name(t.dtype), shape_str(t.shape),
                     in.where(id), why);
}

// Adds one matched input tensor's segments to the canonicals it is made of.
void add_segments(Model& m, const InputSet& in, const TensorSpec& spec, int id, std::vector<std::string>& problems) {
  const auto& t = in.tensors[static_cast<size_t>(id)];
  const uint64_t es = dtype_size(t.dtype);
  uint64_t pos = 0;
  for (const auto& seg : spec.segments) {
    auto& c = m.canon[static_cast<size_t>(m.canon_id.at(seg.canonical))];
    if (c.dtype && *c.dtype != t.dtype) {
      problems.push_back(fmt::format("dtype mismatch: '{}' ({}) is {}, but '{}', another part of HF tensor '{}', is {}; "
                                     "the converter never casts",
                                     t.name, in.where(id), dtype_name(t.dtype), c.dtype_from, c.name,
                                     dtype_name(*c.dtype)));
      return;
    }
    c.dtype = t.dtype;
    if (c.dtype_from.empty()) c.dtype_from = t.name;
    if (spec.replica) {
      c.replicas.push_back(id);
      continue;
    }
    c.pieces.push_back({static_cast<uint64_t>(seg.offset) * es, static_cast<uint64_t>(seg.length) * es, id, pos});
    pos += static_cast<uint64_t>(seg.length) * es;
  }
}

// Shape dispatch of a fused HF expert tensor: v5 [E, 2I, H] / [E, H, I] passes, the transposed
// [E, H, 2I] / [E, I, H] is re-laid out, anything else is refused. A shape fitting both (2I == H,
// or I == H) is refused too unless the caller said which layout the input uses.
enum class FusedShape { V5, Transposed, Bad };
FusedShape dispatch_fused(const TensorSpec& spec, const InputTensor& t, const InputSet& in, int id, FusedInput hint,
                          std::vector<std::string>& problems) {
  const auto& v5 = spec.shape;
  const std::vector<int64_t> tr = {v5[0], v5[2], v5[1]};
  const bool gate_up = spec.name.ends_with("gate_up_proj");
  const char* v5_sym = gate_up ? "[E, 2I, H]" : "[E, H, I]";
  const char* tr_sym = gate_up ? "[E, H, 2I]" : "[E, I, H]";
  const bool fits_v5 = t.shape == v5 && hint != FusedInput::Transposed;
  const bool fits_tr = t.shape == tr && hint != FusedInput::V5;
  if (fits_v5 && fits_tr) {
    problems.push_back(fmt::format(
        "tensor '{}' {} in {} is ambiguous: it fits both the v5 fused layout {} and the transposed layout {} because {} "
        "== hidden_size; refusing to guess (say which with --fused-input v5 or --fused-input transposed)",
        t.name, shape_str(t.shape), in.where(id), v5_sym, tr_sym,
        gate_up ? "2 * moe_intermediate_size" : "moe_intermediate_size"));
    return FusedShape::Bad;
  }
  if (fits_v5) return FusedShape::V5;
  if (fits_tr) return FusedShape::Transposed;
  const auto expected = hint == FusedInput::V5           ? fmt::format("{} = {} (v5 fused, as --fused-input says)", v5_sym, shape_str(v5))
                        : hint == FusedInput::Transposed ? fmt::format("{} = {} (transposed fused, as --fused-input says)", tr_sym, shape_str(tr))
                                                         : fmt::format("{} = {} (v5 fused) or {} = {} (transposed fused)",
                                                                       v5_sym, shape_str(v5), tr_sym, shape_str(tr));
  problems.push_back(
      fmt::format("tensor '{}' in {} has shape {}; expected {}", t.name, in.where(id), shape_str(t.shape), expected));
  return FusedShape::Bad;
}

void add_transposed(Model& m, const InputSet& in, const TensorSpec& spec, int id) {
  const auto& c = m.config;
  const auto& t = in.tensors[static_cast<size_t>(id)];
  const int64_t H = c.hidden_size, I = c.moe_intermediate_size;
  const auto pre = spec.name.substr(0, spec.name.rfind('.') + 1);  // "model.layers.l.mlp.experts."
  const bool gate_up = spec.name.ends_with("gate_up_proj");
  for (int64_t j = 0; j < c.num_experts; ++j) {
    auto set = [&](const std::string& name, Transposed tr) {
      auto& can = m.canon[static_cast<size_t>(m.canon_id.at(name))];
      can.dtype = t.dtype;
      can.dtype_from = t.name;
      can.transposed = tr;
    };
    if (gate_up) {  // input [E, H, 2I]: expert j's [H, 2I] block, columns [0, I) gate, [I, 2I) up
      set(fmt::format("{}{}.gate_proj.weight", pre, j), {id, j * H * 2 * I, H, 2 * I, 0, I});
      set(fmt::format("{}{}.up_proj.weight", pre, j), {id, j * H * 2 * I, H, 2 * I, I, I});
    } else {  // input [E, I, H]: expert j's [I, H] block
      set(fmt::format("{}{}.down_proj.weight", pre, j), {id, j * I * H, I, H, 0, H});
    }
  }
}

// Per sparse layer: per-expert or fused names in an HF input (both in one layer is a problem).
std::vector<ExpertLayout> hf_input_layouts(const ModelConfig& c, const InputSet& in, std::vector<std::string>& problems) {
  std::vector<ExpertLayout> layouts(static_cast<size_t>(c.num_layers), ExpertLayout::PerExpert);
  const auto& names = in.by_name[0];
  for (int64_t l = 0; l < c.num_layers; ++l) {
    if (!c.is_sparse_layer(l)) continue;
    const auto prefix = fmt::format("model.layers.{}.mlp.experts.", l);
    std::string per_expert, fused;
    for (auto it = names.lower_bound(prefix); it != names.end() && it->first.starts_with(prefix); ++it) {
      const char next = it->first[prefix.size()];
      if (next >= '0' && next <= '9' && per_expert.empty()) per_expert = it->first;
      if ((it->first == prefix + "gate_up_proj" || it->first == prefix + "down_proj") && fused.empty()) fused = it->first;
    }
    if (!per_expert.empty() && !fused.empty())
      problems.push_back(fmt::format(
          "layer {} mixes expert layouts: per-expert '{}' ({}) and fused '{}' ({}); a layer holds one layout", l,
          per_expert, in.where(names.at(per_expert)), fused, in.where(names.at(fused))));
    else if (!fused.empty())
      layouts[static_cast<size_t>(l)] = ExpertLayout::Fused;
  }
  return layouts;
}

MegatronExperts megatron_input_experts(const InputSet& in, std::vector<std::string>& problems) {
  std::string seq, grp;
  for (const auto& names : in.by_name)
    for (const auto& [name, id] : names) {
      if (auto e = parse_expert_name(name)) (name.find("local_experts") != std::string::npos ? seq : grp) = name;
    }
  if (!seq.empty() && !grp.empty())
    problems.push_back(fmt::format("expert names mix SequentialMLP ('{}') and TEGroupedMLP ('{}') forms", seq, grp));
  return grp.empty() ? MegatronExperts::Sequential : MegatronExperts::Grouped;
}

Model read_model(const InputSet& in, const ModelConfig& config, FusedInput hint, std::vector<std::string>& problems) {
  Model m;
  m.config = config;
  for (const auto& [name, shape] : expected_parameters(config, ExpertLayout::PerExpert)) {
    m.canon_id[name] = static_cast<int>(m.canon.size());
    m.canon.push_back({name, shape, std::nullopt, {}, {}, std::nullopt, {}, false, -1});
  }

  std::vector<TensorSpec> specs;
  std::vector<ExpertLayout> layouts;
  if (in.megatron) {
    const auto form = megatron_input_experts(in, problems);
    specs = megatron_layout(config, in.tp, form);
    m.from = fmt::format("megatron tp={}{}", in.tp, config.is_moe() ? (form == MegatronExperts::Grouped ? " (grouped experts)" : " (sequential experts)") : "");
  } else {
    layouts = hf_input_layouts(config, in, problems);
    specs = hf_layout(config, layouts);
    std::vector<int64_t> per, fused;
    for (int64_t l = 0; l < config.num_layers; ++l)
      if (config.is_sparse_layer(l)) (layouts[static_cast<size_t>(l)] == ExpertLayout::Fused ? fused : per).push_back(l);
    m.from = config.is_moe() ? fmt::format("hf (per-expert layers [{}], fused layers [{}])", fmt::join(per, ", "),
                                           fmt::join(fused, ", "))
                             : "hf (dense)";
  }

  std::set<int> claimed;
  std::vector<std::pair<int, std::string>> missing;
  for (const auto& spec : specs) {
    const auto& names = in.by_name[static_cast<size_t>(spec.part)];
    std::vector<int> found;
    std::vector<std::string> found_names;
    std::vector<std::string> candidates = {spec.name};
    candidates.insert(candidates.end(), spec.aliases.begin(), spec.aliases.end());
    for (const auto& n : candidates)
      if (auto it = names.find(n); it != names.end()) {
        found.push_back(it->second);
        found_names.push_back(n);
      }
    if (found.empty()) {
      missing.emplace_back(spec.part, spec.name);
      continue;
    }
    for (int id : found) claimed.insert(id);
    if (found.size() > 1) {
      problems.push_back(fmt::format("'{}' ({}) and '{}' ({}) are two names of one tensor; keep one", found_names[0],
                                     in.where(found[0]), found_names[1], in.where(found[1])));
      continue;
    }
    const int id = found[0];
    const auto& t = in.tensors[static_cast<size_t>(id)];
    const bool fused = !in.megatron && (spec.name.ends_with("experts.gate_up_proj") || spec.name.ends_with("experts.down_proj"));
    if (fused) {
      switch (dispatch_fused(spec, t, in, id, hint, problems)) {
        case FusedShape::V5: add_segments(m, in, spec, id, problems); break;
        case FusedShape::Transposed:
          add_transposed(m, in, spec, id);
          m.notes.push_back(fmt::format("'{}' {} is in the transposed fused layout; re-laid out", t.name, shape_str(t.shape)));
          break;
        case FusedShape::Bad: break;
      }
      continue;
    }
    if (t.shape != spec.shape) {
      problems.push_back(fmt::format("tensor '{}' in {} has shape {}, expected {}{}", t.name, in.where(id),
                                     shape_str(t.shape), shape_str(spec.shape),
                                     in.megatron ? fmt::format(" for tensor-parallel size {}", in.tp) : ""));
      continue;
    }
    add_segments(m, in, spec, id, problems);
  }
  report_missing(missing, in, config, problems);

  for (int id = 0; id < static_cast<int>(in.tensors.size()); ++id) {
    if (claimed.count(id)) continue;
    const auto& t = in.tensors[static_cast<size_t>(id)];
    const auto part = in.files[static_cast<size_t>(t.file)].part;
    if (!in.megatron && is_extra_name(config, t.name)) {
      m.canon_id[t.name] = static_cast<int>(m.canon.size());
      m.canon.push_back({t.name, t.shape, t.dtype, t.name, {{0, t.bytes, id, 0}}, std::nullopt, {}, true, -1});
      continue;
    }
    problems.push_back((in.megatron ? megatron_rank_dir(part) + ": " : std::string()) + describe_unexpected(in, id, config));
  }
  if (!problems.empty()) return m;

  // Every canonical must now be covered exactly once (an internal invariant of the layouts).
  for (auto& c : m.canon) {
    if (!c.dtype) fail("converter bug: canonical tensor '{}' got no source", c.name);
    if (c.transposed) continue;
    std::sort(c.pieces.begin(), c.pieces.end(), [](const Piece& a, const Piece& b) { return a.offset < b.offset; });
    uint64_t at = 0;
    for (const auto& p : c.pieces) {
      if (p.offset != at) fail("converter bug: canonical tensor '{}' bytes [{}, {}) not covered", c.name, at, p.offset);
      at += p.length;
    }
    if (at != c.bytes()) fail("converter bug: canonical tensor '{}' covered up to byte {} of {}", c.name, at, c.bytes());
  }
  return m;
}

// ---------------------------------------------------------------------------------------------
// Phase 2: the output plan.

struct OutSegment {  // canonical bytes [offset, offset + length)
  int canonical = 0;
  uint64_t offset = 0, length = 0;
};

struct OutputTensor {
  int part = 0;
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  std::vector<OutSegment> segments;
  int step = 0;
  uint64_t bytes = 0;
};

struct OutputShard {
  int part = 0;
  int step = 0;
  std::vector<int> tensors;  // sorted by name
  std::string file;          // relative to the part's directory
  uint64_t bytes = 0;
};

int step_of_input(const InputSet& in, int id) {
  return in.files[static_cast<size_t>(in.tensors[static_cast<size_t>(id)].file)].step;
}

void canonical_steps(Model& m, const InputSet& in) {
  for (auto& c : m.canon) {
    int s = 0;
    for (const auto& p : c.pieces) s = std::max(s, step_of_input(in, p.input));
    if (c.transposed) s = std::max(s, step_of_input(in, c.transposed->input));
    for (int r : c.replicas) s = std::max(s, step_of_input(in, r));
    c.step = s;
  }
}

std::vector<OutputTensor> plan_outputs(const Model& m, const ConvertOptions& o, ConvertReport& report) {
  const auto& c = m.config;
  std::vector<TensorSpec> specs;
  if (o.to == Format::Megatron) {
    specs = megatron_layout(c, o.tp, o.megatron_experts);
  } else {
    const auto layout = o.to == Format::HfFused ? ExpertLayout::Fused : ExpertLayout::PerExpert;
    specs = hf_layout(c, std::vector<ExpertLayout>(static_cast<size_t>(c.num_layers), layout));
  }
  std::vector<bool> used(m.canon.size(), false);
  std::vector<OutputTensor> out;
  std::vector<std::string> problems;
  for (const auto& spec : specs) {
    OutputTensor t{spec.part, spec.name, DType::F32, spec.shape, {}, 0, 0};
    std::optional<DType> dtype;
    std::string dtype_from;
    for (const auto& seg : spec.segments) {
      const int id = m.canon_id.at(seg.canonical);
      const auto& can = m.canon[static_cast<size_t>(id)];
      used[static_cast<size_t>(id)] = true;
      if (dtype && *dtype != *can.dtype) {
        problems.push_back(fmt::format("output tensor '{}' would mix dtypes: '{}' is {}, '{}' is {} (fused tensors need "
                                       "one dtype; the converter never casts)",
                                       spec.name, dtype_from, dtype_name(*dtype), can.name, dtype_name(*can.dtype)));
        break;
      }
      dtype = can.dtype;
      if (dtype_from.empty()) dtype_from = can.name;
      const uint64_t es = dtype_size(*can.dtype);
      t.segments.push_back({id, static_cast<uint64_t>(seg.offset) * es, static_cast<uint64_t>(seg.length) * es});
      t.step = std::max(t.step, can.step);
    }
    t.dtype = *dtype;
    t.bytes = static_cast<uint64_t>(element_count(t.shape)) * dtype_size(t.dtype);
    out.push_back(std::move(t));
  }
  if (!problems.empty()) throw_problems("convert " + m.config.source, problems);
  for (size_t i = 0; i < m.canon.size(); ++i) {
    const auto& can = m.canon[i];
    if (used[i]) continue;
    if (!can.extra) fail("converter bug: canonical tensor '{}' has no place in the {} output", can.name, format_name(o.to));
    if (o.to == Format::Megatron) {
      report.dropped.push_back(fmt::format("'{}' {}: {} has no Megatron-core parameter for it", can.name,
                                           shape_str(can.shape),
                                           can.name == "lm_head.weight" ? "tied embeddings" : "a non-persistent buffer"));
    } else {
      out.push_back({0, can.name, *can.dtype, can.shape, {{static_cast<int>(i), 0, can.bytes()}}, can.step, can.bytes()});
    }
  }
  return out;
}

std::vector<OutputShard> plan_shards(const std::vector<OutputTensor>& tensors, int parts, int steps,
                                     uint64_t max_shard_bytes) {
  std::vector<OutputShard> shards;
  for (int p = 0; p < parts; ++p) {
    std::vector<std::vector<int>> by_step(static_cast<size_t>(steps));
    for (int i = 0; i < static_cast<int>(tensors.size()); ++i)
      if (tensors[static_cast<size_t>(i)].part == p) by_step[static_cast<size_t>(tensors[static_cast<size_t>(i)].step)].push_back(i);
    const size_t first = shards.size();
    for (int s = 0; s < steps; ++s) {
      auto& ids = by_step[static_cast<size_t>(s)];
      std::sort(ids.begin(), ids.end(), [&](int a, int b) {
        return tensors[static_cast<size_t>(a)].name < tensors[static_cast<size_t>(b)].name;
      });
      for (int id : ids) {
        const auto bytes = tensors[static_cast<size_t>(id)].bytes;
        if (shards.size() == first || shards.back().step != s ||
            (max_shard_bytes > 0 && shards.back().bytes + bytes > max_shard_bytes && !shards.back().tensors.empty()))
          shards.push_back({p, s, {}, {}, 0});
        shards.back().tensors.push_back(id);
        shards.back().bytes += bytes;
      }
    }
    const size_t n = shards.size() - first;
    for (size_t k = 0; k < n; ++k)
      shards[first + k].file =
          n == 1 ? std::string("model.safetensors") : fmt::format("model-{:05d}-of-{:05d}.safetensors", k + 1, n);
  }
  return shards;
}

// ---------------------------------------------------------------------------------------------
// Phase 3: streaming execution.

class Executor {
 public:
  Executor(const InputSet& in, const Model& m, const std::vector<OutputTensor>& outs) : in_(in), m_(m) {
    last_use_.assign(in.tensors.size(), -1);
    for (const auto& t : outs)
      for (const auto& seg : t.segments) {
        const auto& c = m.canon[static_cast<size_t>(seg.canonical)];
        auto use = [&](int id) { last_use_[static_cast<size_t>(id)] = std::max(last_use_[static_cast<size_t>(id)], t.step); };
        for (const auto& p : c.pieces) use(p.input);
        if (c.transposed) use(c.transposed->input);
        for (int r : c.replicas) use(r);
      }
  }

  void open_step(int s) {
    step_ = s;
    open_.clear();
    for (size_t f = 0; f < in_.files.size(); ++f)
      if (in_.files[f].step == s) open_[static_cast<int>(f)] = std::make_unique<SafetensorsFile>(in_.files[f].path);
  }

  // Keeps the input tensors of this step that a later step still reads, drops the rest. Copies
  // kept from earlier steps that this step consumed go first, so they never coexist with the
  // new ones (peak: this step's mapped shard + what the next step needs).
  void close_step() {
    for (auto it = pending_.begin(); it != pending_.end();)
      it = last_use_[static_cast<size_t>(it->first)] <= step_ ? pending_.erase(it) : std::next(it);
    for (const auto& [f, file] : open_)
      for (const auto& info : file->tensors()) {
        const int id = in_.by_name[static_cast<size_t>(in_.files[static_cast<size_t>(f)].part)].at(info.name);
        if (last_use_[static_cast<size_t>(id)] > step_) {
          const auto b = file->bytes(info);
          pending_[id].assign(b.begin(), b.end());
        }
      }
    open_.clear();
    cache_id_ = -1;
    cache_.clear();
    cache_.shrink_to_fit();
  }

  uint64_t pending_bytes() const {
    uint64_t n = 0;
    for (const auto& [id, v] : pending_) n += v.size();
    return n;
  }

  void write_tensor(ShardWriter& w, const OutputTensor& t) {
    w.begin(t.name);
    for (const auto& seg : t.segments) {
      verify_replicas(seg.canonical);
      emit(w, seg);
    }
    flush(w);
  }

 private:
  std::span<const std::byte> input_bytes(int id) {
    const auto& t = in_.tensors[static_cast<size_t>(id)];
    if (auto it = open_.find(t.file); it != open_.end()) return it->second->bytes(it->second->at(t.name));
    auto p = pending_.find(id);
    if (p == pending_.end())
      fail("converter bug: input tensor '{}' ({}) is neither mapped nor kept at step {}", t.name, in_.where(id), step_);
    return {p->second.data(), p->second.size()};
  }

  // Coalesces adjacent spans so a split matrix row-run becomes one write.
  void append(ShardWriter& w, std::span<const std::byte> b) {
    if (run_size_ > 0 && run_ + run_size_ == b.data()) {
      run_size_ += b.size();
      return;
    }
    flush(w);
    run_ = b.data();
    run_size_ = b.size();
  }
  void flush(ShardWriter& w) {
    if (run_size_ > 0) w.write({run_, run_size_});
    run_size_ = 0;
  }

  const std::vector<std::byte>& materialize(int canonical) {
    if (cache_id_ == canonical) return cache_;
    const auto& c = m_.canon[static_cast<size_t>(canonical)];
    const auto& tr = *c.transposed;
    const size_t es = dtype_size(*c.dtype);
    const auto src = input_bytes(tr.input);
    cache_.resize(c.bytes());
    // canonical[a, b] = input[base + b * stride + col_begin + a],  a < cols, b < src_rows
    for (int64_t b = 0; b < tr.src_rows; ++b)
      for (int64_t a = 0; a < tr.cols; ++a)
        std::memcpy(cache_.data() + static_cast<size_t>(a * tr.src_rows + b) * es,
                    src.data() + static_cast<size_t>(tr.base + b * tr.stride + tr.col_begin + a) * es, es);
    cache_id_ = canonical;
    return cache_;
  }

  void emit(ShardWriter& w, const OutSegment& seg) {
    const auto& c = m_.canon[static_cast<size_t>(seg.canonical)];
    if (c.transposed) {
      const auto& bytes = materialize(seg.canonical);
      flush(w);
      w.write({bytes.data() + seg.offset, seg.length});
      return;
    }
    uint64_t at = seg.offset;
    const uint64_t end = seg.offset + seg.length;
    auto it = std::upper_bound(c.pieces.begin(), c.pieces.end(), at,
                               [](uint64_t v, const Piece& p) { return v < p.offset; });
    --it;  // the piece containing `at` (pieces start at 0 and tile the tensor)
    for (; at < end; ++it) {
      const uint64_t from = at - it->offset;
      const uint64_t n = std::min(end, it->offset + it->length) - at;
      append(w, input_bytes(it->input).subspan(it->input_offset + from, n));
      at += n;
    }
  }

  void verify_replicas(int canonical) {
    const auto& c = m_.canon[static_cast<size_t>(canonical)];
    if (c.replicas.empty() || verified_.count(canonical)) return;
    verified_.insert(canonical);
    for (int r : c.replicas) {
      const auto copy = input_bytes(r);
      for (const auto& p : c.pieces) {
        const auto ref = input_bytes(p.input).subspan(p.input_offset, p.length);
        if (std::memcmp(ref.data(), copy.data() + p.offset, p.length) != 0)
          fail("replicated tensor '{}' differs between {} and {}: every tensor-parallel rank holds the same copy of "
               "it (HF '{}')",
               in_.tensors[static_cast<size_t>(r)].name, in_.where(p.input), in_.where(r), c.name);
      }
    }
  }

  const InputSet& in_;
  const Model& m_;
  std::vector<int> last_use_;
  int step_ = 0;
  std::map<int, std::unique_ptr<SafetensorsFile>> open_;  // file id -> mapped file (this step)
  std::map<int, std::vector<std::byte>> pending_;         // input id -> bytes kept for a later step
  std::set<int> verified_;
  std::vector<std::byte> cache_;
  int cache_id_ = -1;
  const std::byte* run_ = nullptr;
  size_t run_size_ = 0;
};

void copy_side_files(const fs::path& from, const fs::path& to, const fs::path& config) {
  for (const auto& entry : fs::directory_iterator(from)) {
    if (!entry.is_regular_file()) continue;
    const auto name = entry.path().filename().string();
    if (name.ends_with(".safetensors") || name == kIndexName || name.ends_with(".tmp")) continue;
    if (name == "config.json" && !config.empty()) continue;
    fs::copy_file(entry.path(), to / name, fs::copy_options::overwrite_existing);
  }
  if (!config.empty()) fs::copy_file(config, to / "config.json", fs::copy_options::overwrite_existing);
}

}  // namespace

ConvertReport convert_checkpoint(const ConvertOptions& o) {
  if (o.tp < 1) fail("convert: --tp must be >= 1, got {}", o.tp);
  if (o.tp != 1 && o.to != Format::Megatron) fail("convert: --tp {} applies to a megatron output only", o.tp);
  if (fs::exists(o.output)) {
    if (fs::exists(o.input) && fs::equivalent(o.input, o.output))
      fail("convert: output {} is the input directory; write to a new directory", o.output.string());
    if (!fs::is_directory(o.output) || !fs::is_empty(o.output))
      fail("convert: output {} exists and is not an empty directory; refusing to overwrite", o.output.string());
  }
  const auto config_path = o.config.empty() ? o.input / "config.json" : o.config;
  if (!fs::exists(config_path))
    fail("convert: {} not found; the converter needs the HF config (pass --config)", config_path.string());
  const auto config = load_config(config_path);

  std::vector<std::string> problems;
  const auto in = read_inputs(o.input, problems);
  if (!problems.empty()) throw_problems("convert " + o.input.string(), problems);
  auto model = read_model(in, config, o.fused_input, problems);
  if (!problems.empty()) throw_problems("convert " + o.input.string(), problems);
  canonical_steps(model, in);

  ConvertReport report;
  report.from = model.from;
  report.to = std::string(format_name(o.to));
  report.input_tp = in.tp;
  report.output_tp = o.to == Format::Megatron ? o.tp : 1;
  report.notes = model.notes;
  report.input_shards = in.files.size();
  report.input_tensors = in.tensors.size();
  for (const auto& t : in.tensors) report.input_bytes += t.bytes;

  const auto outs = plan_outputs(model, o, report);
  const int parts = report.output_tp;
  const auto shards = plan_shards(outs, parts, std::max(in.steps, 1), o.max_shard_bytes);

  auto part_dir = [&](int p) { return o.to == Format::Megatron ? o.output / megatron_rank_dir(p) : o.output; };
  fs::create_directories(o.output);
  for (int p = 0; p < parts; ++p) fs::create_directories(part_dir(p));

  // A problem found while streaming (replicated copies that differ, an I/O error) leaves no
  // half-written checkpoint behind: the output directory was new or empty, so empty it again.
  try {
    Executor exec(in, model, outs);
    const std::map<std::string, std::string> metadata = {{"format", "pt"}};
    for (int s = 0; s < in.steps; ++s) {
      exec.open_step(s);
      for (const auto& shard : shards) {
        if (shard.step != s) continue;
        std::vector<ShardEntry> entries;
        for (int id : shard.tensors) {
          const auto& t = outs[static_cast<size_t>(id)];
          entries.push_back({t.name, t.dtype, t.shape});
        }
        ShardWriter w(part_dir(shard.part) / shard.file, std::move(entries), metadata);
        for (int id : shard.tensors) exec.write_tensor(w, outs[static_cast<size_t>(id)]);
        w.finish();
        report.output_bytes += w.payload_bytes();
      }
      exec.close_step();
    }
  } catch (...) {
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(o.output, ec)) fs::remove_all(entry.path(), ec);
    throw;
  }
  report.output_shards = shards.size();
  report.output_tensors = outs.size();

  for (int p = 0; p < parts; ++p) {
    size_t n = 0;
    for (const auto& sh : shards) n += sh.part == p;
    if (n <= 1) continue;
    nlohmann::json index;
    uint64_t total = 0;
    nlohmann::json weight_map = nlohmann::json::object();
    for (const auto& sh : shards) {
      if (sh.part != p) continue;
      total += sh.bytes;
      for (int id : sh.tensors) weight_map[outs[static_cast<size_t>(id)].name] = sh.file;
    }
    index["metadata"] = {{"total_size", total}};
    index["weight_map"] = weight_map;
    std::ofstream(part_dir(p) / kIndexName) << index.dump(2) << "\n";
  }
  copy_side_files(o.input, o.output, o.config);
  return report;
}

}  // namespace opensci::convert
