#include "opensci/harness/matrix.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <fstream>
#include <regex>
#include <set>

#include "opensci/error.hpp"

namespace opensci::harness {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::vector<std::string> string_list(const json& j, const char* key, const std::string& where) {
  std::vector<std::string> out;
  if (!j.contains(key)) return out;
  if (!j[key].is_array()) fail("{}: '{}' must be a list of strings", where, key);
  for (const auto& v : j[key]) {
    if (!v.is_string()) fail("{}: '{}' must be a list of strings", where, key);
    out.push_back(v.get<std::string>());
  }
  return out;
}

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

}  // namespace

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
  m.tolerances = m.file.parent_path() / j.value("tolerances", std::string("tolerances.json"));

  std::map<std::string, fs::path> tokens;
  const json token_files = j.value("tokens", json::object());  // a named local: items() must not outlive it
  for (const auto& [name, path] : token_files.items()) tokens[name] = m.source_dir / path.get<std::string>();

  for (const auto& [name, mj] : j.at("models").items()) {
    MatrixModel model;
    model.name = name;
    if (!mj.contains("config")) fail("{}: model '{}' has no 'config'", where, name);
    model.config = m.source_dir / mj["config"].get<std::string>();
    if (mj.contains("remote_code")) model.remote_code = m.source_dir / mj["remote_code"].get<std::string>();
    model.seed = mj.value("seed", uint64_t{1});
    model.toy_dtype = mj.value("toy_dtype", std::string("f32"));
    model.labels = string_list(mj, "labels", where + ": model " + name);
    m.models[name] = model;
  }
  m.patch_sets["none"] = PatchSet{};
  const json patch_sets = j.value("patch_sets", json::object());
  for (const auto& [name, pj] : patch_sets.items()) {
    if (name.starts_with("_")) continue;
    PatchSet p;
    p.name = name;
    if (pj.contains("static")) p.static_patch = m.source_dir / pj["static"].get<std::string>();
    p.shims = string_list(pj, "shims", where + ": patch set " + name);
    if (p.unpatched()) fail("{}: patch set '{}' has neither 'static' nor 'shims'", where, name);
    if (!p.static_patch.empty() && !fs::exists(p.static_patch))
      fail("{}: patch set '{}' names {}, which does not exist", where, name, p.static_patch.string());
    m.patch_sets[name] = p;
  }
  for (const auto& [name, ej] : j.at("environments").items()) {
    MatrixEnvironment env;
    env.name = name;
    env.transformers = ej.value("transformers", std::string("unknown"));
    if (!ej.contains("spec") || !ej["spec"].is_object()) fail("{}: environment '{}' has no 'spec' object", where, name);
    env.spec = ej["spec"];
    if (ej.contains("patch_sets")) env.patch_sets = string_list(ej, "patch_sets", where + ": environment " + name);
    for (const auto& ps : env.patch_sets)
      if (!m.patch_sets.count(ps)) fail("{}: environment '{}' uses patch set '{}', which is not declared", where, name, ps);
    const json expect = ej.value("expect", json::object());
    for (const auto& [model, outcome] : expect.items()) env.expect[model] = outcome.get<std::string>();
    m.environments[name] = env;
  }

  std::set<std::string> names;
  for (const auto& cj : j.at("cells")) {
    const auto tokens_name = cj.value("tokens", std::string("padded"));
    if (!tokens.count(tokens_name)) fail("{}: cell uses tokens '{}', not declared under 'tokens'", where, tokens_name);
    const auto capture = cj.value("capture", json::object());
    // "parallel": {"sp": N, "ep": N}, or a list of them (one cell per layout; parallel/README.md).
    const json layouts = cj.contains("parallel") && cj["parallel"].is_array()
                             ? cj["parallel"]
                             : json::array({cj.value("parallel", json::object())});
    for (const auto& env_name : string_list(cj, "environments", where)) {
      if (!m.environments.count(env_name)) fail("{}: cell names environment '{}', which is not declared", where, env_name);
      const auto& env = m.environments.at(env_name);
      for (const auto& model_name : string_list(cj, "models", where)) {
        if (!m.models.count(model_name)) fail("{}: cell names model '{}', which is not declared", where, model_name);
        const auto& model = m.models.at(model_name);
        // A cell may name its own patch sets (static patches only fit the fixtures they were written for).
        const auto cell_patches = cj.contains("patch_sets") ? string_list(cj, "patch_sets", where) : env.patch_sets;
        for (const auto& ps : cell_patches)
          if (!m.patch_sets.count(ps)) fail("{}: cell uses patch set '{}', which is not declared", where, ps);
        for (const auto& patch_name : cell_patches)
        for (const auto& rj : cj.at("reference"))
        for (const auto& parallel : layouts) {
          MatrixCell c;
          c.env = &env;
          c.model = &model;
          c.patch = &m.patch_sets.at(patch_name);
          c.variant = patch_name == "none" ? model_name : model_name + "+" + patch_name;
          c.tokens_name = tokens_name;
          c.tokens = tokens.at(tokens_name);
          c.dtype = capture.value("dtype", std::string("float32"));
          c.device = capture.value("device", std::string("cpu"));
          c.reference.backend = rj.value("backend", std::string("cpu"));
          c.reference.precision = rj.value("precision", std::string("fp64"));
          c.reference.tolerance = rj.at("tolerance").get<std::string>();
          c.sp = parallel.value("sp", 1);
          c.ep = parallel.value("ep", 1);
          c.expect = env.expect.count(c.variant) ? env.expect.at(c.variant) : cj.value("expect", std::string("pass"));
          if (c.expect != "pass" && !c.expect.starts_with("xfail:"))
            fail("{}: expected outcome '{}' for {}/{} must be 'pass' or 'xfail:<hazard id>'", where, c.expect, env_name,
                 model_name);
          c.capture_name = fmt::format("{}/{}/{}/{}-{}", env_name, c.variant, tokens_name, c.dtype, c.device);
          c.name = fmt::format("cell/{}/vs-{}-{}", c.capture_name, c.reference.backend, c.reference.precision);
          if (c.sp * c.ep > 1)  // sp2, ep4, sp2xep2 (ranks = sp * ep)
            c.name += c.sp > 1 && c.ep > 1 ? fmt::format("/sp{}xep{}", c.sp, c.ep)
                                           : (c.sp > 1 ? fmt::format("/sp{}", c.sp) : fmt::format("/ep{}", c.ep));
          if (!names.insert(c.name).second) fail("{}: two cells are both named '{}'", where, c.name);
          c.labels = {"matrix", "cell", env_name, env.provider(), c.reference.backend, short_dtype(c.dtype),
                      fmt::format("sp{}", c.sp), fmt::format("ep{}", c.ep), model_name,
                      c.patch->unpatched() ? "unpatched" : "patched"};
          if (!c.patch->unpatched()) c.labels.push_back(patch_name);
          if (c.sp * c.ep > 1) c.labels.push_back("parallel");
          for (const auto& l : env.version_labels()) c.labels.push_back(l);
          for (const auto& l : model.labels) c.labels.push_back(l);
          m.cells.push_back(c);
        }
      }
    }
  }
  return m;
}

fs::path model_dir(const EmitOptions& o, const MatrixModel& m) { return o.work / "models" / m.name; }
fs::path model_dir(const EmitOptions& o, const MatrixCell& c) {
  // Not "<model>+<patch>": transformers derives a module name from the directory name.
  return c.patch->static_patch.empty() ? model_dir(o, *c.model) : o.work / "patched" / c.model->name / c.patch->name;
}
fs::path capture_dir(const EmitOptions& o, const MatrixCell& c) { return o.work / "captures" / c.capture_name; }
fs::path result_file(const EmitOptions& o, const MatrixCell& c) {
  auto flat = c.name;
  std::replace(flat.begin(), flat.end(), '/', '+');
  return o.work / "results" / (flat + ".json");
}

std::string emit_ctest(const Matrix& m, const EmitOptions& o) {
  std::string out = fmt::format("# Generated by opensci-compat matrix ctest from {}. Do not edit.\n", m.file.string());
  const auto cli = bracket(o.cli.string());
  auto add = [&](const std::string& name, const std::string& command, const std::string& properties) {
    out += fmt::format("add_test({} {} {})\nset_tests_properties({} PROPERTIES {})\n", bracket(name), cli, command,
                       bracket(name), properties);
  };
  std::set<std::string> used_models, used_envs, used_captures, used_patches;
  for (const auto& c : m.cells) {
    used_models.insert(c.model->name);
    if (!c.env->golden()) used_envs.insert(c.env->name);
  }
  for (const auto& name : used_models) {
    const auto& model = m.models.at(name);
    std::string cmd = fmt::format("toy --config {} --seed {} --out {} --dtype {}", bracket(model.config.string()),
                                  model.seed, bracket(model_dir(o, model).string()), model.toy_dtype);
    if (!model.remote_code.empty()) cmd += " --remote-code " + bracket(model.remote_code.string());
    add("toy/" + name, cmd, fmt::format("FIXTURES_SETUP toy.{} LABELS \"matrix;toy\"", name));
  }
  for (const auto& name : used_envs) {
    const auto& env = m.environments.at(name);
    // Provisioning a rootfs takes minutes on a cold cache; 77 = unavailable here (reason printed).
    add("env/" + name, fmt::format("env provision --spec {}", bracket(env.spec.dump())),
        fmt::format("FIXTURES_SETUP env.{} SKIP_RETURN_CODE 77 TIMEOUT 3600 RESOURCE_LOCK env.{} LABELS \"{}\"", name,
                    name, cmake_list([&] {
                      std::vector<std::string> l{"matrix", "env", name, env.provider()};
                      for (const auto& v : env.version_labels()) l.push_back(v);
                      return l;
                    }())));
  }
  for (const auto& c : m.cells) {
    const auto cap = capture_dir(o, c);
    // The model a capture loads: the toy, or its statically patched copy.
    std::string model_fixture = "toy." + c.model->name;
    if (!c.patch->static_patch.empty()) {
      model_fixture = "model." + c.variant;
      if (used_patches.insert(c.variant).second)
        add("patch/" + c.variant,
            fmt::format("patch --model {} --patch {} --out {}", bracket(model_dir(o, *c.model).string()),
                        bracket(c.patch->static_patch.string()), bracket(model_dir(o, c).string())),
            fmt::format("FIXTURES_SETUP {} FIXTURES_REQUIRED toy.{} LABELS \"matrix;patch\"", bracket(model_fixture),
                        c.model->name));
    }
    if (used_captures.insert(c.capture_name).second) {
      std::string cmd = fmt::format(
          "capture --env-spec {} --model {} --variant {} --tokens-file {} --dtype {} --device {} --out {} "
          "--hidden-states --dump-state-dict",
          bracket(c.env->spec.dump()), bracket(model_dir(o, c).string()),
          bracket(c.model->name + "/" + c.patch->name), bracket(c.tokens.string()), c.dtype, c.device,
          bracket(cap.string()));
      for (const auto& shim : c.patch->shims) cmd += " --shim " + shim;
      const auto required = c.env->golden() ? model_fixture : fmt::format("env.{};{}", c.env->name, model_fixture);
      add("capture/" + c.capture_name, cmd,
          fmt::format("FIXTURES_SETUP {} FIXTURES_REQUIRED {} SKIP_RETURN_CODE 77 TIMEOUT 900 "
                      "PROCESSORS 2 LABELS \"matrix;capture;{}\"",
                      bracket("capture." + c.capture_name), bracket(required), c.env->name));
    }
    std::string cmd = fmt::format(
        "cell --name {} --capture {} --model {} --backend {} --precision {} --tolerance-file {} --tolerance {} "
        "--expect {} --result {} --labels {}",
        bracket(c.name), bracket(cap.string()), bracket(model_dir(o, c).string()), c.reference.backend,
        c.reference.precision, bracket(m.tolerances.string()), c.reference.tolerance, c.expect,
        bracket(result_file(o, c).string()), bracket(fmt::format("{}", fmt::join(c.labels, ","))));
    std::string props = fmt::format("FIXTURES_REQUIRED {} SKIP_RETURN_CODE 77 TIMEOUT 600 LABELS \"{}\"",
                                    bracket("capture." + c.capture_name), cmake_list(c.labels));
    if (c.reference.backend == "cuda" || c.reference.backend == "hip") props += " RESOURCE_GROUPS gpus:1";
    if (c.sp * c.ep > 1) {  // the sharded reference runs sp * ep MPI ranks (parallel/)
      cmd += fmt::format(" --sp {} --ep {}", c.sp, c.ep);
      props += fmt::format(" PROCESSORS {}", c.sp * c.ep);
    }
    add(c.name, cmd, props);
  }
  return out;
}

}  // namespace opensci::harness
