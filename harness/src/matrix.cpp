#include "opensci/harness/matrix.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <fstream>
#include <ranges>
#include <regex>
#include <set>
#include <sstream>

#include "opensci/error.hpp"
#include "opensci/harness/hazards.hpp"
#include "opensci/harness/matrix_layers.hpp"

namespace opensci::harness {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// ---- strict reading: every key known, every value checked, every error located ----

// A JSON value with its location in the matrix file ("cells[19].capture").
struct At {
  const json& j;
  std::string path;
  const std::string& file;

  [[noreturn]] void error(const std::string& what) const { fail("{}: {}: {}", file, path, what); }
  At key(const std::string& k) const { return {j.at(k), path.empty() ? k : path + "." + k, file}; }
  At index(size_t i) const { return {j.at(i), fmt::format("{}[{}]", path, i), file}; }
  bool has(const std::string& k) const { return j.contains(k); }

  // Keys starting with '_' are notes; any other key outside `known` is an error.
  const At& object(std::initializer_list<const char*> known) const {
    if (!j.is_object()) error("must be an object");
    for (const auto& [k, v] : j.items()) {
      if (k.starts_with("_")) continue;
      if (std::none_of(known.begin(), known.end(), [&](const char* n) { return k == n; }))
        fail("{}: {}: unknown key (known: {})", file, path.empty() ? k : path + "." + k, fmt::join(known, ", "));
    }
    return *this;
  }
  // A name -> value map (any key).
  const At& map() const {
    if (!j.is_object()) error("must be an object");
    return *this;
  }
  std::string str() const {
    if (!j.is_string()) error("must be a string");
    return j.get<std::string>();
  }
  std::string str(const std::string& k, const std::string& fallback) const { return has(k) ? key(k).str() : fallback; }
  std::string required_str(const std::string& k) const {
    if (!has(k)) error(fmt::format("missing '{}'", k));
    return key(k).str();
  }
  std::string one_of(const std::string& k, const std::string& fallback, std::initializer_list<const char*> allowed) const {
    const auto v = str(k, fallback);
    if (std::none_of(allowed.begin(), allowed.end(), [&](const char* a) { return v == a; }))
      key(k).error(fmt::format("'{}' is not one of {}", v, fmt::join(allowed, ", ")));
    return v;
  }
  std::vector<std::string> strings(const std::string& k) const {
    std::vector<std::string> out;
    if (!has(k)) return out;
    const auto a = key(k);
    if (!a.j.is_array()) a.error("must be a list of strings");
    for (size_t i = 0; i < a.j.size(); ++i) out.push_back(a.index(i).str());
    return out;
  }
  int64_t positive_int(const std::string& k, int64_t fallback) const {
    if (!has(k)) return fallback;
    const auto a = key(k);
    if (!a.j.is_number_integer() || a.j.get<int64_t>() < 1) a.error("must be a positive integer");
    return a.j.get<int64_t>();
  }
};

std::string short_dtype(const std::string& dtype) {
  if (dtype == "float32") return "fp32";
  if (dtype == "bfloat16") return "bf16";
  if (dtype == "float16") return "fp16";
  if (dtype == "float64") return "fp64";
  return dtype;
}

// CMake bracket argument: no quoting or escaping issues whatever the text holds.
std::string bracket(const std::string& s) { return "[==[" + s + "]==]"; }

std::string cmake_list(const std::vector<std::string>& items) { return fmt::format("{}", fmt::join(items, ";")); }

// "pass" or "xfail:<hazard in the table>".
void check_outcome(const At& at, const std::string& outcome, const HazardTable& table) {
  if (outcome == "pass") return;
  if (!outcome.starts_with("xfail:"))
    at.error(fmt::format("expected outcome '{}' must be 'pass' or 'xfail:<hazard id>'", outcome));
  table.at(outcome.substr(6), fmt::format("{}: {}", at.file, at.path));
}

std::set<std::string> tolerance_names(const fs::path& file) {
  std::ifstream in(file);
  if (!in) fail("{}: cannot open the tolerance file the matrix names", file.string());
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    fail("{}: not valid JSON: {}", file.string(), e.what());
  }
  std::set<std::string> names;
  for (const auto& [k, v] : j.items())
    if (!k.starts_with("_")) names.insert(k);
  return names;
}

// The hazards a static patch file says it fixes (its "fixes" and every rule's "hazard").
std::vector<std::string> static_patch_hazards(const fs::path& file) {
  std::ifstream in(file);
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    fail("{}: not valid JSON: {}", file.string(), e.what());
  }
  std::vector<std::string> out;
  for (const auto& f : j.value("fixes", json::array()))
    if (f.is_string()) out.push_back(f.get<std::string>());
  for (const auto& r : j.value("rules", json::array()))
    if (r.is_object() && r.contains("hazard") && r["hazard"].is_string()) out.push_back(r["hazard"].get<std::string>());
  return out;
}

}  // namespace

// ---------------------------------------------------------------- expectations by version range

std::optional<std::vector<int>> parse_numeric_version(const std::string& version) {
  static const std::regex numeric(R"(\d+(\.\d+)*)");
  if (!std::regex_match(version, numeric)) return std::nullopt;
  std::vector<int> out;
  size_t start = 0;
  while (start <= version.size()) {
    const size_t dot = version.find('.', start);
    out.push_back(std::stoi(version.substr(start, dot == std::string::npos ? std::string::npos : dot - start)));
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  return out;
}

namespace {
int compare_versions(std::vector<int> a, std::vector<int> b) {
  const size_t n = std::max(a.size(), b.size());
  a.resize(n, 0);
  b.resize(n, 0);
  return a < b ? -1 : (a > b ? 1 : 0);
}
}  // namespace

VersionRange parse_version_range(const std::string& text) {
  VersionRange r;
  r.text = text;
  const auto trim = [](std::string s) {
    s.erase(0, s.find_first_not_of(" \t"));
    s.erase(s.find_last_not_of(" \t") + 1);
    return s;
  };
  if (trim(text).empty() || trim(text) == "*") return r;
  static const std::regex clause_re(R"((>=|<=|==|!=|>|<)\s*(\d+(?:\.\d+)*)(\.\*)?)");
  std::stringstream ss(text);
  std::string piece;
  while (std::getline(ss, piece, ',')) {
    const std::string c = trim(piece);
    std::smatch m;
    if (!std::regex_match(c, m, clause_re))
      fail("version range \"{}\": clause \"{}\" is not <op><version> (op one of >= <= > < == !=, e.g. \">=5.0,<5.2\" or "
           "\"==5.2.*\")",
           text, c);
    VersionRange::Clause cl;
    cl.op = m[1].str();
    cl.version = *parse_numeric_version(m[2].str());
    cl.wildcard = m[3].matched;
    if (cl.wildcard && cl.op != "==" && cl.op != "!=")
      fail("version range \"{}\": \".*\" only goes with == or != (clause \"{}\")", text, c);
    r.clauses.push_back(cl);
  }
  return r;
}

bool VersionRange::contains(const std::string& version) const {
  const auto v = parse_numeric_version(version);
  if (!v) fail("version range \"{}\": \"{}\" is not a numeric version", text, version);
  for (const auto& c : clauses) {
    bool ok;
    if (c.wildcard) {
      const bool prefix = v->size() >= c.version.size() && std::equal(c.version.begin(), c.version.end(), v->begin());
      ok = c.op == "==" ? prefix : !prefix;
    } else {
      const int cmp = compare_versions(*v, c.version);
      ok = (c.op == ">=" && cmp >= 0) || (c.op == "<=" && cmp <= 0) || (c.op == ">" && cmp > 0) ||
           (c.op == "<" && cmp < 0) || (c.op == "==" && cmp == 0) || (c.op == "!=" && cmp != 0);
    }
    if (!ok) return false;
  }
  return true;
}

std::vector<Expectation> parse_expectations(const json& list, const std::string& where) {
  std::vector<Expectation> out;
  if (list.is_null()) return out;
  if (!list.is_array()) fail("{}: 'expectations' must be a list of objects", where);
  for (size_t i = 0; i < list.size(); ++i) {
    const auto& e = list[i];
    const auto at = fmt::format("{}: expectations[{}]", where, i);
    if (!e.is_object()) fail("{}: expected an object, found {}", at, e.dump());
    for (const auto& [key, value] : e.items())
      if (key != "variant" && key != "transformers" && key != "outcome" && key != "evidence" && !key.starts_with("_"))
        fail("{}: unknown key '{}' (allowed: variant, transformers, outcome, evidence)", at, key);
    for (const char* key : {"variant", "transformers", "outcome", "evidence"})
      if (!e.contains(key) || !e[key].is_string() || (e[key].get<std::string>().empty() && std::string(key) != "transformers"))
        fail("{}: '{}' must be a non-empty string", at, key);
    Expectation x;
    x.index = i;
    x.variant = e["variant"].get<std::string>();
    try {
      x.range = parse_version_range(e["transformers"].get<std::string>());
    } catch (const Error& err) {
      fail("{} ({}): {}", at, x.variant, err.what());
    }
    x.outcome = e["outcome"].get<std::string>();
    if (x.outcome != "pass" && !(x.outcome.starts_with("xfail:") && x.outcome.size() > 6))
      fail("{} ({}): outcome '{}' must be 'pass' or 'xfail:<hazard id>'", at, x.variant, x.outcome);
    x.evidence = e["evidence"].get<std::string>();
    out.push_back(std::move(x));
  }
  return out;
}

std::optional<std::string> expected_outcome(const std::vector<Expectation>& list, const std::string& variant,
                                            const std::string& version, const std::string& where,
                                            std::vector<bool>* used, size_t* index) {
  if (!parse_numeric_version(version)) return std::nullopt;
  const Expectation* found = nullptr;
  for (const auto& e : list) {
    if (e.variant != variant || !e.range.contains(version)) continue;
    if (found && found->outcome != e.outcome)
      fail("{}: expectations[{}] ({} on \"{}\": {}) and expectations[{}] (\"{}\": {}) disagree for transformers {}",
           where, found->index, variant, found->range.text, found->outcome, e.index, e.range.text, e.outcome, version);
    if (!found) found = &e;
    if (used) (*used)[e.index] = true;
  }
  if (!found) return std::nullopt;
  if (index) *index = found->index;
  return found->outcome;
}

std::vector<std::string> MatrixEnvironment::version_labels() const {
  static const std::regex semver(R"((\d+)\.(\d+)(\..*)?)");
  std::smatch m;
  if (std::regex_match(transformers, m, semver)) return {fmt::format("v{}", m[1].str()), fmt::format("v{}.{}", m[1].str(), m[2].str())};
  return {transformers};  // "latest", "main", ...
}

std::string MatrixEnvironment::provider() const { return spec.value("provider", std::string("unknown")); }

Matrix load_matrix(const fs::path& file) {
  std::ifstream in(file);
  if (!in) fail("{}: cannot open matrix file", file.string());
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    fail("{}: matrix is not valid JSON: {}", file.string(), e.what());
  }
  Matrix m;
  m.file = fs::absolute(file);
  m.source_dir = m.file.parent_path().parent_path();
  const auto where = m.file.string();
  const At root{j, "", where};
  root.object({"tolerances", "hazards", "tokens", "models", "patch_sets", "environments", "expectations", "cells"});
  m.tolerances = m.file.parent_path() / root.str("tolerances", "tolerances.json");
  m.hazards = m.file.parent_path() / root.str("hazards", "hazards.json");
  const auto table = HazardTable::load(m.hazards);
  const auto tolerances = tolerance_names(m.tolerances);
  const auto fix_shims = table.fix_shims();

  std::map<std::string, fs::path> tokens;
  if (root.has("tokens")) {
    const auto tj = root.key("tokens").map();
    for (const auto& [name, path] : j["tokens"].items()) {
      if (name.starts_with("_")) continue;
      tokens[name] = m.source_dir / tj.key(name).str();
      if (!fs::exists(tokens[name])) tj.key(name).error(fmt::format("{} does not exist", tokens[name].string()));
    }
  }

  if (!root.has("models")) root.error("missing 'models'");
  for (const auto& [name, unused] : j["models"].items()) {
    if (name.starts_with("_")) continue;
    const auto mj = root.key("models").key(name);
    mj.object({"config", "remote_code", "seed", "toy_dtype", "labels", "toyify", "real"});
    MatrixModel model;
    model.name = name;
    if (mj.has("toyify") || mj.has("real")) {  // a user's model (matrix_layers.hpp): toyify / download
      const auto kind = mj.has("toyify") ? "toyify" : "real";
      if (mj.has("config") || (mj.has("toyify") && mj.has("real"))) mj.error("a user model has one of toyify, real (and no config)");
      mj.key(kind).object({"from", "layers", "hidden", "heads", "kv_heads", "ffn", "moe_ffn", "experts", "vocab"}).required_str("from");
      model.build = json{{kind, mj.j[kind]}};
    } else {
      model.config = m.source_dir / mj.required_str("config");
    }
    if (mj.has("remote_code")) model.remote_code = m.source_dir / mj.key("remote_code").str();
    if (mj.has("seed")) {
      if (!mj.j["seed"].is_number_unsigned()) mj.key("seed").error("must be a non-negative integer");
      model.seed = mj.j["seed"].get<uint64_t>();
    }
    model.toy_dtype = mj.one_of("toy_dtype", "f32", {"f32", "bf16", "f16"});
    model.labels = mj.strings("labels");
    m.models[name] = model;
  }
  m.patch_sets["none"] = PatchSet{};
  if (root.has("patch_sets")) {
    for (const auto& [name, unused] : j["patch_sets"].items()) {
      if (name.starts_with("_")) continue;
      const auto pj = root.key("patch_sets").key(name);
      pj.object({"static", "shims", "fixes"});
      PatchSet p;
      p.name = name;
      if (name == "none") pj.error("'none' is the unpatched set and cannot be declared");
      if (pj.has("static")) p.static_patch = m.source_dir / pj.key("static").str();
      p.shims = pj.strings("shims");
      p.fixes = pj.strings("fixes");
      if (p.unpatched()) pj.error("has neither 'static' nor 'shims'");
      if (!p.static_patch.empty() && !fs::exists(p.static_patch))
        pj.key("static").error(fmt::format("{} does not exist", p.static_patch.string()));
      for (const auto& s : p.shims)
        if (!fix_shims.count(s))
          pj.key("shims").error(fmt::format("unknown shim '{}' (the hazard table's fixes: {}; see {})", s,
                                            fmt::join(std::views::keys(fix_shims), ", "), table.file().string()));
      // What it fixes is checked, not believed: each hazard must be known, and the shims' and the
      // static patch's own hazards must be exactly the declared ones.
      std::set<std::string> actual;
      for (const auto& s : p.shims) actual.insert(fix_shims.at(s));
      if (!p.static_patch.empty())
        for (const auto& h : static_patch_hazards(p.static_patch)) actual.insert(h);
      for (const auto& h : actual) table.at(h, fmt::format("{}: patch_sets.{} (its shims / static rules)", where, name));
      const std::set<std::string> declared(p.fixes.begin(), p.fixes.end());
      for (const auto& h : declared) table.at(h, fmt::format("{}: patch_sets.{}.fixes", where, name));
      if (pj.has("fixes") && declared != actual)
        pj.key("fixes").error(fmt::format("declares [{}], its shims and static rules fix [{}]", fmt::join(declared, ", "),
                                          fmt::join(actual, ", ")));
      if (!pj.has("fixes")) p.fixes.assign(actual.begin(), actual.end());
      m.patch_sets[name] = p;
    }
  }
  if (!root.has("environments")) root.error("missing 'environments'");
  for (const auto& [name, unused] : j["environments"].items()) {
    if (name.starts_with("_")) continue;
    const auto ej = root.key("environments").key(name);
    ej.object({"transformers", "spec", "patch_sets", "expect", "required"});
    MatrixEnvironment env;
    env.name = name;
    env.transformers = ej.required_str("transformers");
    if (!ej.has("spec") || !ej.j["spec"].is_object()) ej.error("has no 'spec' object");
    env.spec = ej.j["spec"];
    if (ej.has("patch_sets")) env.patch_sets = ej.strings("patch_sets");
    for (const auto& ps : env.patch_sets)
      if (!m.patch_sets.count(ps)) ej.key("patch_sets").error(fmt::format("patch set '{}' is not declared", ps));
    if (ej.has("expect")) {
      const auto xj = ej.key("expect").map();
      for (const auto& [variant, outcome] : ej.j["expect"].items()) {
        if (variant.starts_with("_")) continue;
        const At at{outcome, fmt::format("{}[\"{}\"]", xj.path, variant), where};
        env.expect[variant] = at.str();
        check_outcome(at, env.expect[variant], table);
      }
    }
    if (ej.has("required")) {
      const auto rj = ej.key("required");
      if (rj.j.is_boolean())
        env.required = rj.j.get<bool>() ? "always" : "no";
      else
        env.required = ej.one_of("required", "no", {"no", "always", "when-reachable"});
    }
    m.environments[name] = env;
  }

  m.expectations = parse_expectations(j.value("expectations", json()), where);
  for (const auto& e : m.expectations)
    if (e.outcome != "pass") table.at(e.outcome.substr(6), fmt::format("{}: expectations[{}]", where, e.index));
  std::vector<bool> expectation_used(m.expectations.size(), false);

  std::set<std::string> names;
  std::map<std::string, std::set<std::string>> variants_of_env;  // to catch expect keys no cell uses
  if (!root.has("cells") || !j["cells"].is_array()) root.error("'cells' must be a list");
  for (size_t ci = 0; ci < j["cells"].size(); ++ci) {
    const auto cj = root.key("cells").index(ci);
    cj.object({"environments", "models", "patch_sets", "tokens", "capture", "reference", "parallel", "expect", "tier"});
    const auto tier = cj.one_of("tier", "ci", {"ci", "nightly"});
    const auto tokens_name = cj.str("tokens", "padded");
    if (!tokens.count(tokens_name)) cj.key("tokens").error(fmt::format("tokens '{}' are not declared under 'tokens'", tokens_name));
    std::string dtype = "float32", device = "cpu";
    if (cj.has("capture")) {
      const auto cap = cj.key("capture").object({"dtype", "device"});
      dtype = cap.one_of("dtype", "float32", {"float32", "bfloat16", "float64"});
      device = cap.one_of("device", "cpu", {"cpu", "cuda"});
    }
    // "parallel": {"sp": N, "ep": N}, or a list of them: one cell per layout (parallel/README.md).
    std::vector<std::pair<int64_t, int64_t>> layouts;
    if (cj.has("parallel") && cj.j["parallel"].is_array()) {
      if (cj.j["parallel"].empty()) cj.key("parallel").error("must be a layout {sp, ep} or a non-empty list of them");
      for (size_t pi = 0; pi < cj.j["parallel"].size(); ++pi) {
        const auto pj = cj.key("parallel").index(pi).object({"sp", "ep"});
        layouts.emplace_back(pj.positive_int("sp", 1), pj.positive_int("ep", 1));
      }
    } else if (cj.has("parallel")) {
      const auto pj = cj.key("parallel").object({"sp", "ep"});
      layouts.emplace_back(pj.positive_int("sp", 1), pj.positive_int("ep", 1));
    } else {
      layouts.emplace_back(1, 1);
    }
    if (!cj.has("reference") || !cj.j["reference"].is_array() || cj.j["reference"].empty())
      cj.error("needs 'reference': a non-empty list of {backend, precision, tolerance}");
    std::vector<ReferenceRun> refs;
    for (size_t ri = 0; ri < cj.j["reference"].size(); ++ri) {
      const auto rj = cj.key("reference").index(ri).object({"backend", "precision", "tolerance"});
      ReferenceRun r;
      r.backend = rj.one_of("backend", "cpu", {"cpu", "libtorch", "cuda", "hip", "emulation"});
      r.precision = rj.one_of("precision", "fp64", {"fp64", "fp32", "bf16"});
      r.tolerance = rj.required_str("tolerance");
      if (!tolerances.count(r.tolerance))
        rj.key("tolerance").error(fmt::format("'{}' is not in {} (known: {})", r.tolerance, m.tolerances.string(),
                                              fmt::join(tolerances, ", ")));
      refs.push_back(r);
    }
    const std::string cell_expect = cj.str("expect", "pass");
    if (cj.has("expect")) check_outcome(cj.key("expect"), cell_expect, table);
    const auto env_names = cj.strings("environments");
    const auto model_names = cj.strings("models");
    if (env_names.empty()) cj.error("names no 'environments'");
    if (model_names.empty()) cj.error("names no 'models'");
    for (const auto& env_name : env_names) {
      if (!m.environments.count(env_name))
        cj.key("environments").error(fmt::format("environment '{}' is not declared", env_name));
      const auto& env = m.environments.at(env_name);
      for (const auto& model_name : model_names) {
        if (!m.models.count(model_name)) cj.key("models").error(fmt::format("model '{}' is not declared", model_name));
        const auto& model = m.models.at(model_name);
        // A cell may name its own patch sets (static patches only fit the fixtures they were written for).
        const auto cell_patches = cj.has("patch_sets") ? cj.strings("patch_sets") : env.patch_sets;
        for (const auto& ps : cell_patches)
          if (!m.patch_sets.count(ps)) cj.key("patch_sets").error(fmt::format("patch set '{}' is not declared", ps));
        for (const auto& patch_name : cell_patches)
        for (const auto& ref : refs)
        for (const auto& [sp, ep] : layouts) {
          MatrixCell c;
          c.env = &env;
          c.model = &model;
          c.patch = &m.patch_sets.at(patch_name);
          c.variant = patch_name == "none" ? model_name : model_name + "+" + patch_name;
          variants_of_env[env_name].insert(c.variant);
          c.tokens_name = tokens_name;
          c.tokens = tokens.at(tokens_name);
          c.dtype = dtype;
          c.device = device;
          c.reference = ref;
          c.sp = static_cast<int>(sp);
          c.ep = static_cast<int>(ep);
          c.source = cj.path;
          // The environment's own "expect" overrides the version-range list, which overrides the cell's.
          size_t ranged_index = 0;
          const auto ranged =
              expected_outcome(m.expectations, c.variant, env.transformers, where, &expectation_used, &ranged_index);
          if (env.expect.count(c.variant)) {
            c.expect = env.expect.at(c.variant);
            c.expect_source = fmt::format("environments.{}.expect[\"{}\"]", env_name, c.variant);
          } else if (ranged) {
            c.expect = *ranged;
            c.expect_source = fmt::format("expectations[{}]", ranged_index);
          } else {
            c.expect = cell_expect;
            c.expect_source = cj.has("expect") ? cj.path + ".expect" : std::string("default (pass)");
          }
          c.tier = tier;
          c.capture_name = fmt::format("{}/{}/{}/{}-{}", env_name, c.variant, tokens_name, c.dtype, c.device);
          c.name = fmt::format("cell/{}/vs-{}-{}", c.capture_name, c.reference.backend, c.reference.precision);
          if (c.sp * c.ep > 1)  // sp2, ep4, sp2xep2 (ranks = sp * ep)
            c.name += c.sp > 1 && c.ep > 1 ? fmt::format("/sp{}xep{}", c.sp, c.ep)
                                           : (c.sp > 1 ? fmt::format("/sp{}", c.sp) : fmt::format("/ep{}", c.ep));
          if (!names.insert(c.name).second) cj.error(fmt::format("two cells are both named '{}'", c.name));
          if (c.expect.starts_with("xfail:")) {
            const auto& h = table.at(c.expect.substr(6), c.expect_source);
            if (h.counterfactual()) {
              c.counterfactual_capture = fmt::format("{}/{}{}/{}/{}-{}", env_name, c.variant, counterfactual_suffix(h.id),
                                                     tokens_name, c.dtype, c.device);
              c.counterfactual_shims = c.patch->shims;
              c.counterfactual_shims.insert(c.counterfactual_shims.end(), h.fix_shims.begin(), h.fix_shims.end());
            }
          }
          c.labels = {"matrix", "cell", env_name, env.provider(), c.reference.backend, short_dtype(c.dtype),
                      fmt::format("sp{}", c.sp), fmt::format("ep{}", c.ep), model_name,
                      c.patch->unpatched() ? "unpatched" : "patched"};
          if (!c.patch->unpatched()) c.labels.push_back(patch_name);
          if (c.expect != "pass") c.labels.push_back("xfail");
          if (c.sp * c.ep > 1) c.labels.push_back("parallel");
          for (const auto& l : env.version_labels()) c.labels.push_back(l);
          for (const auto& l : model.labels) c.labels.push_back(l);
          if (c.tier == "nightly") c.labels.push_back("nightly");
          m.cells.push_back(c);
        }
      }
    }
  }
  // An expectation no cell uses is a typo (a misspelt variant would otherwise be silently ignored).
  for (const auto& [name, env] : m.environments)
    for (const auto& [variant, outcome] : env.expect)
      if (!variants_of_env[name].count(variant))
        fail("{}: environments.{}.expect[\"{}\"]: no cell of environment '{}' has variant '{}' (variants: {})", where,
             name, variant, name, variant, fmt::join(variants_of_env[name], ", "));
  for (size_t i = 0; i < m.expectations.size(); ++i)
    if (!expectation_used[i])
      fail("{}: expectations[{}] ({} on transformers \"{}\") matches no cell: a typo, or a stale entry", where, i,
           m.expectations[i].variant, m.expectations[i].range.text);
  return m;
}

fs::path model_dir(const EmitOptions& o, const MatrixModel& m) { return o.work / "models" / m.name; }
fs::path model_dir(const EmitOptions& o, const MatrixCell& c) {
  // Not "<model>+<patch>": transformers derives a module name from the directory name.
  return c.patch->static_patch.empty() ? model_dir(o, *c.model) : o.work / "patched" / c.model->name / c.patch->name;
}
fs::path capture_dir(const EmitOptions& o, const MatrixCell& c) { return o.work / "captures" / c.capture_name; }
fs::path counterfactual_dir(const EmitOptions& o, const MatrixCell& c) {
  return c.counterfactual_capture.empty() ? fs::path() : o.work / "captures" / c.counterfactual_capture;
}
fs::path result_file(const EmitOptions& o, const MatrixCell& c) {
  auto flat = c.name;
  std::replace(flat.begin(), flat.end(), '/', '+');
  return o.work / "results" / (flat + ".json");
}

namespace {

std::string model_fixture_of(const MatrixCell& c) {
  return c.patch->static_patch.empty() ? "toy." + c.model->name : "model." + c.variant;
}

// The `opensci-compat capture` command of a cell's capture (shims: the patch set's, or the
// counterfactual's).
std::string capture_command(const MatrixCell& c, const EmitOptions& o, const fs::path& out, const std::string& variant,
                            const std::vector<std::string>& shims) {
  std::string cmd = fmt::format(
      "capture --env-spec {} --model {} --variant {} --tokens-file {} --dtype {} --device {} --out {} "
      "--hidden-states --dump-state-dict --threads 1",
      bracket(c.env->spec.dump()), bracket(model_dir(o, c).string()), bracket(variant), bracket(c.tokens.string()),
      c.dtype, c.device, bracket(out.string()));
  for (const auto& shim : shims) cmd += " --shim " + shim;
  return cmd;
}

}  // namespace

std::string emit_ctest(const Matrix& m, const EmitOptions& o) {
  std::string out = fmt::format("# Generated by opensci-compat matrix ctest from {}. Do not edit.\n", m.file.string());
  const auto cli = bracket(o.cli.string());
  auto add = [&](const std::string& name, const std::string& command, const std::string& properties) {
    out += fmt::format("add_test({} {} {})\nset_tests_properties({} PROPERTIES {})\n", bracket(name), cli, command,
                       bracket(name), properties);
  };
  std::set<std::string> used_models, used_envs, used_captures, used_patches;
  std::vector<const MatrixCell*> cells;  // the tier emitted: "ci" always, "nightly" on request
  for (const auto& c : m.cells)
    if (cell_emitted(c, o.nightly)) cells.push_back(&c);
  // Declared round-robin over environments (the first cell of every environment, then the second
  // of every one, ...): without cost data from an earlier run (a fresh machine, CI) CTest starts
  // tests in declaration order, and two captures of one environment started together both wait
  // for the same worker's imports (~7 s, one core) while the other core idles. Interleaved, the
  // two running captures start two environments' workers.
  {
    std::vector<std::string> env_order;
    std::map<std::string, std::vector<const MatrixCell*>> by_env;
    for (const auto* c : cells) {
      auto& list = by_env[c->env->name];
      if (list.empty()) env_order.push_back(c->env->name);
      list.push_back(c);
    }
    std::vector<const MatrixCell*> interleaved;
    for (size_t rank = 0; interleaved.size() < cells.size(); ++rank)
      for (const auto& env : env_order)
        if (rank < by_env[env].size()) interleaved.push_back(by_env[env][rank]);
    cells = std::move(interleaved);
  }
  for (const auto* cp : cells) {
    const auto& c = *cp;
    used_models.insert(c.model->name);
    if (!c.env->golden()) used_envs.insert(c.env->name);
  }
  for (const auto& name : used_models) {
    const auto& model = m.models.at(name);
    if (!model.build.is_null()) {  // toyify / download; 77 = not available here (Hub out of reach, not cached)
      std::vector<std::string> args;
      for (const auto& a : user_model_command(model, model_dir(o, model))) args.push_back(bracket(a));
      add("toy/" + name, fmt::format("{}", fmt::join(args, " ")),
          fmt::format("FIXTURES_SETUP toy.{} SKIP_RETURN_CODE 77 TIMEOUT 3600 LABELS \"matrix;toy;user\"", name));
      continue;
    }
    std::string cmd = fmt::format("toy --config {} --seed {} --out {} --dtype {}", bracket(model.config.string()),
                                  model.seed, bracket(model_dir(o, model).string()), model.toy_dtype);
    if (!model.remote_code.empty()) cmd += " --remote-code " + bracket(model.remote_code.string());
    add("toy/" + name, cmd, fmt::format("FIXTURES_SETUP toy.{} LABELS \"matrix;toy\"", name));
  }
  for (const auto& name : used_envs) {
    const auto& env = m.environments.at(name);
    // Provisioning a rootfs takes minutes on a cold cache; 77 = unavailable here (reason printed),
    // unless the matrix requires the environment (then unavailable is a failure). The env test
    // verifies the resolved transformers against the declared one (labels never lie) and writes
    // its status (ready / env-error / unavailable) for the report's grid.
    add("env/" + name,
        fmt::format("env provision --spec {} --name {} --required {}{} --status-file {}", bracket(env.spec.dump()),
                    bracket(name), env.required,
                    env.transformers == "unknown" ? "" : " --expect-transformers " + bracket(env.transformers),
                    bracket((o.work / "envs" / (name + ".json")).string())),
        fmt::format("FIXTURES_SETUP env.{} SKIP_RETURN_CODE 77 TIMEOUT 3600 RESOURCE_LOCK env.{} LABELS \"{}\"", name,
                    name, cmake_list([&] {
                      std::vector<std::string> l{"matrix", "env", name, env.provider()};
                      for (const auto& v : env.version_labels()) l.push_back(v);
                      return l;
                    }())));
  }
  for (const auto* cp : cells) {
    const auto& c = *cp;
    const auto cap = capture_dir(o, c);
    // The model a capture loads: the toy, or its statically patched copy.
    const std::string model_fixture = model_fixture_of(c);
    if (!c.patch->static_patch.empty() && used_patches.insert(c.variant).second)
      add("patch/" + c.variant,
          fmt::format("patch --model {} --patch {} --out {}", bracket(model_dir(o, *c.model).string()),
                      bracket(c.patch->static_patch.string()), bracket(model_dir(o, c).string())),
          fmt::format("FIXTURES_SETUP {} FIXTURES_REQUIRED toy.{} SKIP_RETURN_CODE 77 LABELS \"matrix;patch\"", bracket(model_fixture),
                      c.model->name));
    const auto required = c.env->golden() ? model_fixture : fmt::format("env.{};{}", c.env->name, model_fixture);
    const auto capture_props = [&](const std::string& name) {
      // One torch thread, one CTest processor: a toy forward (3 sequences, hidden size <= 96)
      // is python-bound, so two threads bought nothing while PROCESSORS 2 ran one capture at a
      // time on two cores (full matrix: captures 2x faster this way, see README "Speed").
      // A CUDA capture takes the GPU CTest allocates it (run_capture hands it to the child).
      return fmt::format(
          "FIXTURES_SETUP {} FIXTURES_REQUIRED {} SKIP_RETURN_CODE 77 TIMEOUT 900 "
          "PROCESSORS 1 LABELS \"matrix;capture;{}\"{}",
          bracket("capture." + name), bracket(required), c.env->name,
          c.device == "cuda" ? " RESOURCE_GROUPS gpus:1" : "");
    };
    const auto variant = c.model->name + "/" + c.patch->name;
    if (used_captures.insert(c.capture_name).second)
      add("capture/" + c.capture_name, capture_command(c, o, cap, variant, c.patch->shims), capture_props(c.capture_name));
    std::string fixtures = "capture." + c.capture_name;
    if (!c.counterfactual_capture.empty()) {
      const auto hazard = c.expect.substr(6);
      if (used_captures.insert(c.counterfactual_capture).second)
        add("capture/" + c.counterfactual_capture,
            capture_command(c, o, counterfactual_dir(o, c), variant + counterfactual_suffix(hazard), c.counterfactual_shims),
            capture_props(c.counterfactual_capture));
      fixtures += ";capture." + c.counterfactual_capture;
    }
    std::string cmd = fmt::format(
        "cell --name {} --capture {} --model {} --tokens-file {} --dtype {} --variant {} --transformers {} --backend {} "
        "--precision {} --tolerance-file {} --tolerance {} --hazards {} --expect {} --result {} --labels {}",
        bracket(c.name), bracket(cap.string()), bracket(model_dir(o, c).string()), bracket(c.tokens.string()), c.dtype,
        bracket(variant), bracket(c.env->transformers), c.reference.backend, c.reference.precision,
        bracket(m.tolerances.string()), c.reference.tolerance, bracket(m.hazards.string()), c.expect,
        bracket(result_file(o, c).string()), bracket(fmt::format("{}", fmt::join(c.labels, ","))));
    for (const auto& shim : c.patch->shims) cmd += " --shim " + shim;
    if (!c.counterfactual_capture.empty()) cmd += " --counterfactual " + bracket(counterfactual_dir(o, c).string());
    std::string props = fmt::format("FIXTURES_REQUIRED {} SKIP_RETURN_CODE 77 TIMEOUT 600 LABELS \"{}\"",
                                    bracket(fixtures), cmake_list(c.labels));
    if (c.reference.backend == "cuda" || c.reference.backend == "hip") props += " RESOURCE_GROUPS gpus:1";
    if (c.sp * c.ep > 1) {  // the sharded reference runs sp * ep MPI ranks (parallel/)
      cmd += fmt::format(" --sp {} --ep {}", c.sp, c.ep);
      props += fmt::format(" PROCESSORS {}", c.sp * c.ep);
    }
    add(c.name, cmd, props);
  }
  return out;
}

std::string explain_cell(const Matrix& m, const EmitOptions& o, const std::string& name) {
  const MatrixCell* cell = nullptr;
  for (const auto& c : m.cells)
    if (c.name == name || c.name == "cell/" + name) cell = &c;
  if (!cell) {
    std::vector<std::string> close;
    for (const auto& c : m.cells)
      if (c.name.find(name) != std::string::npos && close.size() < 12) close.push_back(c.name);
    fail("{}: no cell named '{}'{}", m.file.string(), name,
         close.empty() ? std::string(" (list them: ctest -N -L cell)") : fmt::format("; cells containing it:\n  {}", fmt::join(close, "\n  ")));
  }
  const auto& c = *cell;
  const auto table = HazardTable::load(m.hazards);
  std::string out;
  auto line = [&](const std::string& k, const std::string& v) { out += fmt::format("  {:<16} {}\n", k + ":", v); };
  out += fmt::format("{}\n  (expanded from {} of {})\n", c.name, c.source, m.file.string());
  line("environment", fmt::format("{} — provider {}, transformers {} (declared; the cell checks the capture's version), "
                                  "required: {}", c.env->name, c.env->provider(), c.env->transformers, c.env->required));
  line("env spec", c.env->spec.dump());
  line("model", fmt::format("{} — config {}{}, seed {}, {}", c.model->name, c.model->config.string(),
                            c.model->remote_code.empty() ? "" : ", remote code " + c.model->remote_code.string(),
                            c.model->seed, c.model->toy_dtype));
  line("patch set", c.patch->unpatched()
                        ? std::string("none (unpatched)")
                        : fmt::format("{} — static {}, shims [{}], fixes [{}]", c.patch->name,
                                      c.patch->static_patch.empty() ? "-" : c.patch->static_patch.string(),
                                      fmt::join(c.patch->shims, ", "), fmt::join(c.patch->fixes, ", ")));
  line("tokens", fmt::format("{} ({})", c.tokens_name, c.tokens.string()));
  line("capture", fmt::format("{} on {}", c.dtype, c.device));
  line("reference", fmt::format("{} {}", c.reference.backend, c.reference.precision));
  std::string tol_reason;
  {
    std::ifstream in(m.tolerances);
    const auto tj = json::parse(in);
    tol_reason = tj.at(c.reference.tolerance).value("reason", std::string());
  }
  line("tolerance", fmt::format("{} ({}): {}", c.reference.tolerance, m.tolerances.filename().string(), tol_reason));
  line("parallel", fmt::format("sp{} ep{}", c.sp, c.ep));
  line("expect", fmt::format("{} — from {}", c.expect, c.expect_source));
  if (c.expect.starts_with("xfail:")) {
    const auto& h = table.at(c.expect.substr(6), c.expect_source);
    line("hazard", fmt::format("{} {} ({}, versions {}): {}", h.id, h.title, h.kind, h.versions, h.what));
    if (h.kind == "error")
      line("proof", fmt::format("the exception must be a {} matching /{}/{} and no other hazard's signature",
                                fmt::join(h.error_types, "|"), h.message_regex,
                                h.traceback_regex.empty() ? "" : " with /" + h.traceback_regex + "/ in the traceback"));
    else if (h.counterfactual())
      line("proof", fmt::format("the counterfactual capture {} (the same run + shims {}) must pass; the failure must "
                                "be consistent with [{}] and no other hazard named",
                                c.counterfactual_capture, fmt::join(h.fix_shims, ", "), fmt::join(h.consistent_with, ", ")));
    else
      line("proof", fmt::format("evidence [{}] must name {} and nothing else", fmt::join(h.evidence, ", "), h.id));
  }
  line("labels", fmt::format("{}", fmt::join(c.labels, " ")));
  std::vector<std::string> tests = {"toy/" + c.model->name};
  if (!c.patch->static_patch.empty()) tests.push_back("patch/" + c.variant);
  if (!c.env->golden()) tests.push_back("env/" + c.env->name);
  tests.push_back("capture/" + c.capture_name);
  if (!c.counterfactual_capture.empty()) tests.push_back("capture/" + c.counterfactual_capture);
  tests.push_back(c.name);
  line("ctest", fmt::format("{}", fmt::join(tests, " -> ")));
  line("capture dir", capture_dir(o, c).string());
  line("result", result_file(o, c).string());
  return out;
}

Tally tally_cells(const Matrix& m, const EmitOptions& o, const std::vector<std::string>& exclude, int min_live) {
  Tally t;
  std::map<std::string, int> not_run_reasons;
  std::vector<std::string> problems;
  for (const auto& c : m.cells) {
    if (std::any_of(exclude.begin(), exclude.end(), [&](const std::string& l) {
          return std::find(c.labels.begin(), c.labels.end(), l) != c.labels.end();
        }))
      continue;
    // Not emitted as CTest tests in this build: nothing could have run them (not a missing result).
    if (!cell_emitted(c, o.nightly)) {
      ++t.not_emitted;
      continue;
    }
    ++t.selected;
    const auto file = result_file(o, c);
    json r;
    if (std::ifstream in(file); in) {
      try {
        r = json::parse(in);
      } catch (const json::exception&) {
        r = json();
      }
    }
    const bool required = c.env->required != "no";
    if (!r.is_object()) {
      ++t.missing;
      if (required)
        problems.push_back(fmt::format("{}: no result (its fixtures failed or it did not run), but environment {} is "
                                       "required ({})", c.name, c.env->name, c.env->required));
      continue;
    }
    const auto verdict = r.value("verdict", std::string("?"));
    if (verdict == "not-run") {
      ++t.not_run;
      const auto reason = r.value("not_run", json::object()).value("reason", r.value("summary", std::string()));
      ++not_run_reasons[fmt::format("{}: {}", c.env->name, reason)];
      const bool unreachable = r.value("not_run", json::object()).value("unreachable", false);
      // The real tier (label real: a published checkpoint from the Hub) is Not Run where the Hub
      // cannot be reached, whatever the environment: the environment is not what is missing.
      const bool real_model = std::find(c.labels.begin(), c.labels.end(), "real") != c.labels.end();
      if (!real_model && (c.env->required == "always" || (c.env->required == "when-reachable" && !unreachable)))
        problems.push_back(fmt::format("{}: Not Run, but environment {} is required ({}): {}", c.name, c.env->name,
                                       c.env->required, reason));
      continue;
    }
    const bool golden = r.contains("capture") && r["capture"].is_object() && r["capture"].contains("golden");
    (golden ? t.replayed : t.live) += 1;
    ++t.verdicts[fmt::format("{} {}", golden ? "replayed" : "live", verdict)];
  }
  auto by = [&](const char* kind) {
    std::vector<std::string> parts;
    for (const auto& [k, n] : t.verdicts)
      if (k.starts_with(kind)) parts.push_back(fmt::format("{} {}", k.substr(std::string(kind).size() + 1), n));
    return parts.empty() ? std::string() : fmt::format(" ({})", fmt::join(parts, ", "));
  };
  t.text = fmt::format(
      "matrix tally: {} cells selected — {} ran live{}, {} replayed goldens{}, {} not run, {} without a result{}\n",
      t.selected, t.live, by("live"), t.replayed, by("replayed"), t.not_run, t.missing,
      t.not_emitted ? fmt::format(" ({} cells of tier nightly not in this run: --nightly counts them)", t.not_emitted)
                    : std::string());
  for (const auto& [reason, n] : not_run_reasons) t.text += fmt::format("  not run x{}: {}\n", n, reason);
  if (t.live < min_live)
    problems.insert(problems.begin(), fmt::format("only {} cells ran live (at least {} must): a suite that ran nothing live is red",
                                                  t.live, min_live));
  for (const auto& p : problems) t.text += "  FAIL " + p + "\n";
  t.ok = problems.empty();
  return t;
}

}  // namespace opensci::harness
