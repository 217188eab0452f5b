#include "opensci/harness/hazards.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>

#include "opensci/error.hpp"

namespace opensci::harness {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::vector<std::string> strings(const json& j, const std::string& key, const std::string& where) {
  std::vector<std::string> out;
  if (!j.contains(key)) return out;
  if (!j[key].is_array()) fail("{}.{}: must be a list of strings", where, key);
  for (const auto& v : j[key]) {
    if (!v.is_string()) fail("{}.{}: must be a list of strings", where, key);
    out.push_back(v.get<std::string>());
  }
  return out;
}

std::string string_at(const json& j, const std::string& key, const std::string& where, bool required) {
  if (!j.contains(key)) {
    if (required) fail("{}: missing '{}'", where, key);
    return "";
  }
  if (!j[key].is_string()) fail("{}.{}: must be a string", where, key);
  return j[key].get<std::string>();
}

void check_keys(const json& j, const std::set<std::string>& allowed, const std::string& where) {
  for (const auto& [k, v] : j.items()) {
    if (k.starts_with("_") || allowed.count(k)) continue;
    fail("{}.{}: unknown key (known: {})", where, k, fmt::join(allowed, ", "));
  }
}

// The evidence detectors and consistency checks harness/src/diagnosis.cpp implements.
const std::set<std::string> kEvidenceDetectors = {"inv_freq_garbage", "inv_freq_wrong_theta", "loaded_params_reinitialised",
                                                  "lm_head_untied", "effective_dtype_differs"};
const std::set<std::string> kConsistencyChecks = {"position0_matches", "hidden_states_match"};

bool search(const std::string& regex, const std::string& text, const std::string& where) {
  try {
    return std::regex_search(text, std::regex(regex, std::regex::ECMAScript));
  } catch (const std::regex_error& e) {
    fail("{}: invalid regex '{}': {}", where, regex, e.what());
  }
}

}  // namespace

fs::path HazardTable::default_file() { return fs::path(OPENSCI_SOURCE_DIR) / "matrix" / "hazards.json"; }

HazardTable HazardTable::load(const fs::path& file) {
  std::ifstream in(file);
  if (!in) fail("{}: cannot open the hazard table", file.string());
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    fail("{}: the hazard table is not valid JSON: {}", file.string(), e.what());
  }
  HazardTable t;
  t.file_ = fs::absolute(file);
  const auto where = file.string();
  if (!j.is_object() || !j.contains("hazards") || !j["hazards"].is_object())
    fail("{}: expected {{\"hazards\": {{\"H1\": {{...}}, ...}}}}", where);
  check_keys(j, {"hazards"}, where);
  static const std::regex id_re("H[0-9]+");
  std::set<std::string> evidence_seen;
  for (const auto& [id, hj] : j["hazards"].items()) {
    const auto at = fmt::format("{}: hazards.{}", where, id);
    if (!std::regex_match(id, id_re)) fail("{}: a hazard id is H<number>", at);
    if (!hj.is_object()) fail("{}: must be an object", at);
    check_keys(hj, {"name", "title", "versions", "kind", "signature", "evidence", "consistent_with", "fix", "what"}, at);
    Hazard h;
    h.id = id;
    h.name = string_at(hj, "name", at, true);
    h.title = string_at(hj, "title", at, true);
    h.versions = string_at(hj, "versions", at, true);
    h.what = string_at(hj, "what", at, true);
    h.kind = string_at(hj, "kind", at, true);
    if (h.kind != "error" && h.kind != "numeric" && h.kind != "dtype")
      fail("{}.kind: '{}' is not one of error, numeric, dtype", at, h.kind);
    if (h.kind == "error") {
      if (!hj.contains("signature") || !hj["signature"].is_object())
        fail("{}: an error hazard needs a 'signature' {{types, message[, traceback]}}", at);
      const auto& s = hj["signature"];
      check_keys(s, {"types", "message", "traceback"}, at + ".signature");
      h.error_types = strings(s, "types", at + ".signature");
      if (h.error_types.empty()) fail("{}.signature.types: at least one exception type", at);
      h.message_regex = string_at(s, "message", at + ".signature", true);
      h.traceback_regex = string_at(s, "traceback", at + ".signature", false);
      search(h.message_regex, "", at + ".signature.message");  // validates the regex
      if (!h.traceback_regex.empty()) search(h.traceback_regex, "", at + ".signature.traceback");
    } else if (hj.contains("signature")) {
      fail("{}.signature: only error hazards have an exception signature", at);
    }
    h.evidence = strings(hj, "evidence", at);
    h.consistent_with = strings(hj, "consistent_with", at);
    for (const auto& e : h.evidence) {
      if (!kEvidenceDetectors.count(e))
        fail("{}.evidence: unknown detector '{}' (the diagnosis has: {})", at, e, fmt::join(kEvidenceDetectors, ", "));
      if (!evidence_seen.insert(e).second) fail("{}.evidence: detector '{}' already names another hazard", at, e);
    }
    for (const auto& c : h.consistent_with)
      if (!kConsistencyChecks.count(c))
        fail("{}.consistent_with: unknown check '{}' (known: {})", at, c, fmt::join(kConsistencyChecks, ", "));
    if (hj.contains("fix")) {
      if (!hj["fix"].is_object()) fail("{}.fix: must be an object {{shims, static}}", at);
      check_keys(hj["fix"], {"shims", "static"}, at + ".fix");
      h.fix_shims = strings(hj["fix"], "shims", at + ".fix");
      h.fix_static = string_at(hj["fix"], "static", at + ".fix", false);
    }
    t.hazards_.push_back(std::move(h));
  }
  // Table order: H1, H2, ..., H16 (numeric, not lexical).
  std::sort(t.hazards_.begin(), t.hazards_.end(),
            [](const Hazard& a, const Hazard& b) { return std::stoi(a.id.substr(1)) < std::stoi(b.id.substr(1)); });
  return t;
}

const Hazard* HazardTable::find(const std::string& id) const {
  for (const auto& h : hazards_)
    if (h.id == id) return &h;
  return nullptr;
}

const Hazard& HazardTable::at(const std::string& id, const std::string& where) const {
  if (const auto* h = find(id)) return *h;
  fail("{}: unknown hazard '{}' (known: {}; see {})", where, id, fmt::join(ids(), ", "), file_.string());
}

std::vector<std::string> HazardTable::ids() const {
  std::vector<std::string> out;
  for (const auto& h : hazards_) out.push_back(h.id);
  return out;
}

std::string HazardTable::hazard_for_evidence(const std::string& detector) const {
  for (const auto& h : hazards_)
    if (std::find(h.evidence.begin(), h.evidence.end(), detector) != h.evidence.end()) return h.id;
  return "";
}

std::vector<std::string> HazardTable::error_matches(const std::string& type, const std::string& message,
                                                    const std::string& traceback) const {
  std::vector<std::string> out;
  for (const auto& h : hazards_) {
    if (h.kind != "error") continue;
    if (std::find(h.error_types.begin(), h.error_types.end(), type) == h.error_types.end()) continue;
    const auto where = fmt::format("{}: hazards.{}.signature", file_.string(), h.id);
    if (!search(h.message_regex, message, where)) continue;
    if (!h.traceback_regex.empty() && !search(h.traceback_regex, traceback, where)) continue;
    out.push_back(h.id);
  }
  return out;
}

std::map<std::string, std::string> HazardTable::fix_shims() const {
  std::map<std::string, std::string> out;
  for (const auto& h : hazards_)
    for (const auto& s : h.fix_shims) out.emplace(s, h.id);
  return out;
}

std::string counterfactual_suffix(const std::string& hazard) { return "+fix-" + hazard; }

}  // namespace opensci::harness
