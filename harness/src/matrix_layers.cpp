#include "opensci/harness/matrix_layers.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <fstream>
#include <regex>
#include <map>
#include <set>

#include "opensci/config.hpp"
#include "opensci/error.hpp"
#include "opensci/harness/hub.hpp"
#include "opensci/harness/matrix.hpp"

namespace opensci::harness {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

json read_json(const fs::path& p) {
  std::ifstream in(p);
  if (!in) fail("{}: cannot open matrix file", p.string());
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    fail("{}: not valid JSON: {}", p.string(), e.what());
  }
}

std::string absolute_from(const fs::path& dir, const std::string& p) {
  return fs::path(p).is_absolute() ? p : (dir / p).lexically_normal().string();
}

// Paths of one matrix section made absolute against `dir` (the repository root for the default
// matrix, the layer file's directory for a layer).
void absolutise(json& j, const fs::path& dir) {
  if (j.contains("tokens"))
    for (auto& [name, path] : j["tokens"].items())
      if (path.is_string()) path = absolute_from(dir, path.get<std::string>());
  if (j.contains("models"))
    for (auto& [name, m] : j["models"].items()) {
      if (!m.is_object()) continue;
      for (const char* key : {"config", "remote_code"})
        if (m.contains(key) && m[key].is_string()) m[key] = absolute_from(dir, m[key].get<std::string>());
      if (m.contains("from") && m["from"].is_string()) {
        const auto from = m["from"].get<std::string>();
        const auto local = absolute_from(dir, from);
        if (fs::is_directory(local) || !looks_like_repo_spec(from)) m["from"] = local;
      }
    }
  if (j.contains("patch_sets"))
    for (auto& [name, p] : j["patch_sets"].items())
      if (p.is_object() && p.contains("static") && p["static"].is_string())
        p["static"] = absolute_from(dir, p["static"].get<std::string>());
}

std::string model_name_of(const std::string& from) {
  std::string base = looks_like_repo_spec(from) && !fs::is_directory(from) ? parse_repo_spec(from).first : from;
  while (base.ends_with("/")) base.pop_back();
  base = base.substr(base.rfind('/') + 1);
  std::string out;
  for (char c : base) out += std::isalnum(static_cast<unsigned char>(c)) ? static_cast<char>(std::tolower(static_cast<unsigned char>(c))) : '-';
  return out.empty() ? "model" : out;
}

// The project model whose cells a user model copies, from the lineage of its config.
std::string template_for(const json& model) {
  const auto from = model.at("from").get<std::string>();
  if (!fs::is_directory(from)) return "opensci-ref-published";  // a Hub repo: the published models' grid
  const auto c = load_config(fs::path(from) / "config.json");
  switch (c.lineage) {
    case Lineage::OpenSciRef: return "opensci-ref-published";
    case Lineage::OpenSciQwen3:
    case Lineage::Qwen3: return "opensci-qwen3";
    case Lineage::Qwen3Moe: return "qwen3-moe";
    case Lineage::OpenSciMoe: return "opensci-moe";
  }
  return "opensci-ref-published";
}

bool names(const json& cell, const char* key, const std::string& what) {
  if (!cell.contains(key)) return false;
  for (const auto& v : cell[key])
    if (v == what) return true;
  return false;
}

bool is_golden(const json& env) { return env.contains("spec") && env["spec"].value("provider", std::string()) == "golden"; }

// A golden environment holds a capture of `model` (recorded for the project's models only).
bool golden_has(const json& env, const std::string& model, const fs::path& source_dir) {
  fs::path dir = env["spec"].value("dir", std::string());
  if (dir.is_relative()) dir = source_dir / dir;
  return fs::is_directory(dir / model);
}

// Every "<model>[+<patch set>]" each environment's cells run (what an expectation may name).
std::map<std::string, std::set<std::string>> variants_by_env(const json& m) {
  std::map<std::string, std::set<std::string>> out;
  for (const auto& c : m["cells"])
    for (const auto& e : c.value("environments", json::array())) {
      const auto env = e.get<std::string>();
      json sets = c.contains("patch_sets") ? c["patch_sets"]
                  : m["environments"].contains(env) ? m["environments"][env].value("patch_sets", json::array({"none"}))
                                                    : json::array({"none"});
      for (const auto& model : c.value("models", json::array()))
        for (const auto& ps : sets)
          out[env].insert(ps == "none" ? model.get<std::string>() : model.get<std::string>() + "+" + ps.get<std::string>());
    }
  return out;
}

const std::set<std::string> kUserModelKeys = {"from", "like", "expect", "toyify", "seed", "labels", "patch_sets",
                                              "environments", "real"};
const std::set<std::string> kToyifyKeys = {"layers", "hidden", "heads", "kv_heads", "ffn", "moe_ffn", "experts", "vocab"};
const std::set<std::string> kLayerKeys = {"tokens", "patch_sets", "environments", "models", "cells"};

}  // namespace

json merge_matrix(const MatrixLayers& l) {
  const auto base_file = fs::absolute(l.base);
  const auto source_dir = base_file.parent_path().parent_path();
  json m = read_json(base_file);
  absolutise(m, source_dir);
  m["tolerances"] = absolute_from(base_file.parent_path(), m.value("tolerances", std::string("tolerances.json")));
  m["hazards"] = absolute_from(base_file.parent_path(), m.value("hazards", std::string("hazards.json")));
  json record = {{"base", base_file.string()}, {"layers", json::array()}, {"models", json::array()}, {"notes", json::array()}};

  // User models (with "from"), collected from layers and the command line, expanded below.
  std::vector<std::pair<std::string, json>> user;
  auto add_user = [&](std::string name, json spec, const std::string& where) {
    for (const auto& [k, v] : spec.items())
      if (!k.starts_with("_") && !kUserModelKeys.count(k))
        fail("{}: user model '{}' has unknown key '{}' (known: {})", where, name, k, fmt::join(kUserModelKeys, ", "));
    if (spec.contains("toyify"))
      for (const auto& [k, v] : spec["toyify"].items())
        if (!kToyifyKeys.count(k)) fail("{}: user model '{}': toyify has unknown key '{}' (known: {})", where, name, k, fmt::join(kToyifyKeys, ", "));
    if (m["models"].contains(name)) fail("{}: user model '{}' has the name of a model of the matrix", where, name);
    for (const auto& [n, _] : user)
      if (n == name) fail("{}: two user models are named '{}'", where, name);
    user.emplace_back(std::move(name), std::move(spec));
  };

  for (const auto& layer_path : l.layers) {
    const auto file = fs::absolute(layer_path);
    json layer = read_json(file);
    if (!layer.is_object()) fail("{}: a matrix layer must be a JSON object", file.string());
    for (const auto& [k, v] : layer.items())
      if (!k.starts_with("_") && !kLayerKeys.count(k))
        fail("{}: unknown key '{}' in a matrix layer (known: {})", file.string(), k, fmt::join(kLayerKeys, ", "));
    absolutise(layer, file.parent_path());
    for (const char* section : {"tokens", "patch_sets", "environments"})
      if (layer.contains(section))
        for (const auto& [name, v] : layer[section].items()) {
          if (m[section].contains(name) && m[section][name].is_object() && v.is_object())
            m[section][name].merge_patch(v);
          else
            m[section][name] = v;
        }
    if (layer.contains("models"))
      for (const auto& [name, spec] : layer["models"].items()) {
        if (spec.contains("from"))
          add_user(name, spec, file.string());
        else
          m["models"][name] = spec;
      }
    if (layer.contains("cells"))
      for (const auto& c : layer["cells"]) m["cells"].push_back(c);
    record["layers"].push_back(file.string());
  }
  for (const auto& from : l.models) {
    json spec = {{"from", fs::is_directory(from) ? fs::absolute(from).lexically_normal().string() : from},
                 {"expect", l.expect}};
    if (!l.like.empty()) spec["like"] = l.like;
    if (!l.patch_sets.empty()) spec["patch_sets"] = l.patch_sets;
    auto name = model_name_of(from);
    for (int k = 2; m["models"].contains(name) || std::any_of(user.begin(), user.end(), [&](auto& u) { return u.first == name; }); ++k)
      name = fmt::format("{}-{}", model_name_of(from), k);
    add_user(name, spec, "OPENSCI_MODELS");
  }

  const json base_cells = m["cells"];
  std::set<std::string> user_names;
  for (auto& [name, spec] : user) {
    user_names.insert(name);
    const auto from = spec["from"].get<std::string>();
    const bool real = spec.value("real", false);
    const auto like = spec.value("like", template_for(spec));
    if (!m["models"].contains(like)) fail("user model '{}': like '{}' is not a model of the matrix", name, like);
    const auto expect = spec.value("expect", std::string("pass"));
    if (expect != "pass" && expect != "like") fail("user model '{}': expect must be 'pass' or 'like', got '{}'", name, expect);
    json model = {{"labels", json::array({"user"})}, {"seed", spec.value("seed", 1)}};
    for (const auto& lab : m["models"][like].value("labels", json::array()))
      if (lab != "published" && lab != "hazard-fixture") model["labels"].push_back(lab);
    for (const auto& lab : spec.value("labels", json::array())) model["labels"].push_back(lab);
    if (real) {
      model["real"] = {{"from", from}};
    } else {
      model["toyify"] = spec.value("toyify", json::object());
      model["toyify"]["from"] = from;
    }
    m["models"][name] = model;
    // Its cells: the template's, in the same environments, patch sets, dtypes and references.
    size_t cells = 0;
    for (const auto& c : base_cells) {
      if (!names(c, "models", like)) continue;
      json copy = c;
      copy["models"] = json::array({name});
      copy["_about"] = fmt::format("user model '{}' ({}), cells of '{}'", name, from, like);
      json envs = json::array();
      for (const auto& e : c.value("environments", json::array())) {
        const auto env = e.get<std::string>();
        if (spec.contains("environments") && !names(spec, "environments", env)) continue;
        if (is_golden(m["environments"][env]) && !golden_has(m["environments"][env], name, source_dir)) {
          record["notes"].push_back(fmt::format("{}: {} left out (it replays captures of the project's models; none "
                                                "was recorded for '{}')",
                                                name, env, name));
          continue;
        }
        envs.push_back(env);
      }
      if (envs.empty()) continue;
      copy["environments"] = envs;
      if (spec.contains("patch_sets")) copy["patch_sets"] = spec["patch_sets"];
      m["cells"].push_back(copy);
      ++cells;
    }
    if (cells == 0) fail("user model '{}': its template '{}' has no cells in the environments asked for", name, like);
    if (expect == "like") {
      const auto runs = variants_by_env(m);
      for (auto& [env_name, env] : m["environments"].items()) {
        if (!env.contains("expect") || !runs.count(env_name)) continue;
        json add = json::object();
        for (const auto& [key, outcome] : env["expect"].items()) {
          if (key != like && !key.starts_with(like + "+")) continue;
          const auto mine = name + key.substr(like.size());
          if (runs.at(env_name).count(mine)) add[mine] = outcome;
        }
        env["expect"].update(add);
      }
      // The matrix's expectations by version range too: the template's, under the user model's name.
      json add = json::array();
      for (const auto& e : m.value("expectations", json::array())) {
        const auto variant = e.value("variant", std::string());
        if (variant != like && !variant.starts_with(like + "+")) continue;
        json copy = e;
        copy["variant"] = name + variant.substr(like.size());
        copy["evidence"] = fmt::format("as '{}' (expect like): {}", like, e.value("evidence", std::string()));
        add.push_back(copy);
      }
      for (auto& e : add) m["expectations"].push_back(e);
    }
    record["models"].push_back({{"name", name}, {"from", from}, {"like", like}, {"expect", expect}, {"real", real}, {"cells", cells}});
  }

  if (l.user_only) {
    json kept = json::array();
    for (const auto& c : m["cells"]) {
      bool mine = false;
      for (const auto& n : c.value("models", json::array())) mine |= user_names.count(n.get<std::string>()) > 0;
      if (mine) kept.push_back(c);
    }
    m["cells"] = kept;
  }
  if (!l.environments.empty()) {
    for (const auto& e : l.environments)
      if (!m["environments"].contains(e)) fail("--envs: '{}' is not an environment of the matrix", e);
    json kept = json::array();
    for (auto c : m["cells"]) {
      json envs = json::array();
      for (const auto& e : c.value("environments", json::array()))
        if (std::find(l.environments.begin(), l.environments.end(), e.get<std::string>()) != l.environments.end()) envs.push_back(e);
      if (envs.empty()) continue;
      c["environments"] = envs;
      kept.push_back(c);
    }
    m["cells"] = kept;
  }
  if (l.user_only || !l.environments.empty()) {
    // Cells were left out: expectations of variants that no longer run go too (the strict matrix
    // refuses an expectation no cell can meet).
    const auto runs = variants_by_env(m);
    for (auto& [env_name, env] : m["environments"].items()) {
      if (!env.contains("expect")) continue;
      json kept = json::object();
      for (const auto& [key, outcome] : env["expect"].items())
        if (key.starts_with("_") || (runs.count(env_name) && runs.at(env_name).count(key))) kept[key] = outcome;
      env["expect"] = kept;
    }
  }
  // Expectations by version range that no cell of the merged matrix can meet any more (their
  // cells were left out above, or a like-copy names a patch set the user model does not run) go
  // too; the base's own are validated against the base matrix, so nothing stale hides here.
  if (m.contains("expectations")) {
    const auto runs = variants_by_env(m);
    json kept = json::array();
    for (const auto& e : m["expectations"]) {
      const auto variant = e.value("variant", std::string());
      const auto range = parse_version_range(e.value("transformers", std::string()));
      bool met = false;
      for (const auto& [env_name, variants] : runs) {
        if (!variants.count(variant) || !m["environments"].contains(env_name)) continue;
        const auto version = m["environments"][env_name].value("transformers", std::string());
        met |= parse_numeric_version(version) && range.contains(version);
      }
      if (met)
        kept.push_back(e);
      else
        record["notes"].push_back(fmt::format("expectation for {} on transformers \"{}\" left out: no cell of the merged "
                                              "matrix runs it",
                                              variant, range.text));
    }
    m["expectations"] = kept;
  }
  m["_layers"] = record;
  return m;
}

std::vector<std::string> user_model_command(const MatrixModel& model, const fs::path& out) {
  if (model.build.contains("real")) {
    const auto [repo, revision] = parse_repo_spec(model.build["real"].at("from").get<std::string>());
    return {"download", repo, "--revision", revision, "--out", out.string(), "--quiet", "--unavailable-marker"};
  }
  const auto& t = model.build.at("toyify");
  std::vector<std::string> args = {"toyify", "--from", t.at("from").get<std::string>(), "--out", out.string(), "--seed",
                                   std::to_string(model.seed), "--unavailable-marker"};
  for (const auto& [k, v] : t.items()) {
    if (k == "from") continue;
    auto flag = "--" + k;
    std::replace(flag.begin(), flag.end(), '_', '-');
    args.push_back(flag);
    args.push_back(v.dump());
  }
  return args;
}

}  // namespace opensci::harness
