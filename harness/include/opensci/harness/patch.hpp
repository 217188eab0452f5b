// Static patches: declarative rewrites of a COPY of a model directory (like the hotfix model
// developers apply), read from matrix/patches/<name>.json. Each rule names the hazard it fixes.
// Rule kinds:
//   {"kind": "regex", "file": "modeling_*.py", "find": "...", "replace": "...$1..."}   every match
//   {"kind": "insert_after", "file": "...", "anchor": "regex of a line", "text": "..."} first match
//   {"kind": "json_set", "file": "config.json", "key": "k", "value": v, "only_if_absent": true}
// "expect_matches": ">=1" (default) or "0". A rule that does not find what it expects is an
// error naming the patch, rule, hazard and file: a patch never silently does nothing.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace opensci::harness {

struct PatchRule {
  std::string hazard, kind, file_glob;
  std::string find, replace;  // regex
  std::string anchor, text;   // insert_after
  std::string key;            // json_set
  nlohmann::json value;
  bool only_if_absent = false;
  bool expect_none = false;   // expect_matches "0": the pattern must be absent (an assertion rule)
};

struct Patch {
  std::string name;
  std::vector<std::string> fixes;
  std::vector<PatchRule> rules;
  std::filesystem::path source;
};

Patch load_patch(const std::filesystem::path& file);

struct PatchResult {
  std::vector<std::string> applied;  // "H2 modeling_opensci.py: 1 replacement"
};

// Copies `model_dir` to `out_dir` (replacing it) and applies the patch there.
PatchResult apply_patch(const Patch& patch, const std::filesystem::path& model_dir, const std::filesystem::path& out_dir);

}  // namespace opensci::harness
