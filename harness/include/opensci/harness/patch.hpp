// Static patches: declarative rewrites of a COPY of a model directory (like the hotfix model
// developers apply), read from matrix/patches/<name>.json. Each rule names the hazard it fixes.
// Rule kinds:
//   {"kind": "regex", "file": "modeling_*.py", "find": "...", "replace": "...$1..."}   every match
//   {"kind": "insert_after", "file": "...", "anchor": "regex", "text": "..."}           first match
//   {"kind": "python_import", "file": "...", "modules": [...], "names": [...], "replace_with": "..."}
//   {"kind": "json_set", "file": "config.json", "key": "k", "value": v, "only_if_absent": true}
// "expect_matches": ">=1" (default) or "0". A rule that does not find what it expects is an
// error naming the patch, the rule, its hazard, the file and the nearest line it looked at: a
// patch never silently does nothing.
//
// The code forms rules must survive (real remote code is written every way): CRLF line endings
// (rules see LF; the file keeps its endings), tabs or any number of spaces (inserted code takes
// the indentation of the block it lands in), multi-line statements (an insert_after anchor that
// matches anywhere in a statement inserts after the whole statement; after a `def`/`class`
// header, into its body, after its docstring), and every Python import form for python_import
// (single names, several names, parenthesised lists over many lines, backslash continuations,
// `as` aliases, comments, any indentation).
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace opensci::harness {

struct PatchRule {
  std::string name;  // optional label from the JSON; messages say "rule <n> '<name>' (<hazard>, <kind>)"
  size_t index = 0;  // 1-based position in the patch
  std::string hazard, kind, file_glob;
  std::string find, replace;  // regex
  std::string anchor, text;   // insert_after
  std::vector<std::string> modules, names;  // python_import: `from <module> import <name> [as <alias>]`
  std::string replace_with;                 // python_import: code bound to the alias, {as} and {name} expanded
  std::string key;            // json_set
  nlohmann::json value;
  bool only_if_absent = false;
  bool expect_none = false;   // expect_matches "0": the pattern must be absent (an assertion rule)
  std::string label() const;  // "rule 3 'H2 lookup' (H2, regex)"
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

// Copies `model_dir` to `out_dir` (replacing it) and applies the patch there. The copy is built
// beside `out_dir` and renamed into place only when every rule applied: after an error neither a
// partial nor an unpatched `out_dir` is left behind (an earlier one is removed too).
PatchResult apply_patch(const Patch& patch, const std::filesystem::path& model_dir, const std::filesystem::path& out_dir);

// The engine's text operations, on one file's text (exposed for tests). Each returns the number
// of changes (matches) and rewrites `text` in place; `text` is LF-only.
namespace patch_text {
size_t apply_regex(std::string& text, const PatchRule& rule);
size_t apply_insert_after(std::string& text, const PatchRule& rule);
size_t apply_python_import(std::string& text, const PatchRule& rule);
// The line of `text` that shares most identifiers with what the rule looks for: "line 39: `...`"
// (or why there is none), for "found nothing" errors.
std::string nearest_line(const std::string& text, const PatchRule& rule);
}  // namespace patch_text

}  // namespace opensci::harness
