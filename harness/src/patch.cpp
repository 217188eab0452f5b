#include "opensci/harness/patch.hpp"

#include <fmt/format.h>
#include <fnmatch.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <fstream>
#include <optional>
#include <regex>
#include <set>
#include <sstream>

#include "opensci/error.hpp"

namespace opensci::harness {
namespace fs = std::filesystem;
using nlohmann::json;

std::string PatchRule::label() const {
  return name.empty() ? fmt::format("rule {} ({}, {})", index, hazard, kind)
                      : fmt::format("rule {} '{}' ({}, {})", index, name, hazard, kind);
}

namespace {

// A source file as the rules see it: LF line endings. A CRLF file is written back with CRLF.
struct SourceFile {
  std::string text;
  bool crlf = false;
};

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) fail("{}: cannot read", p.string());
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_file(const fs::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  if (!out) fail("{}: cannot write", p.string());
  out << text;
  if (!out) fail("{}: write failed", p.string());
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size())) s.replace(at, from.size(), to);
  return s;
}

SourceFile read_source(const fs::path& p) {
  SourceFile f;
  f.text = read_file(p);
  f.crlf = f.text.find("\r\n") != std::string::npos;
  if (f.crlf) f.text = replace_all(f.text, "\r\n", "\n");
  return f;
}

void write_source(const fs::path& p, const SourceFile& f) { write_file(p, f.crlf ? replace_all(f.text, "\n", "\r\n") : f.text); }

std::regex compile(const std::string& pattern, const PatchRule& rule) {
  try {
    return std::regex(pattern, std::regex::ECMAScript | std::regex::multiline);
  } catch (const std::regex_error& e) {
    fail("{}: bad regex '{}': {}", rule.label(), pattern, e.what());
  }
}

// --- A small Python reader: logical lines, strings, comments, indentation --------------------

// Offset just past the string literal whose opening quote is at `k` (the end of the text for an
// unterminated one; a single-quoted string stops at its line's end).
size_t skip_string(const std::string& t, size_t k) {
  const char q = t[k];
  const bool triple = t.compare(k, 3, std::string(3, q)) == 0;
  size_t i = k + (triple ? 3 : 1);
  while (i < t.size()) {
    if (t[i] == '\\') {
      i += 2;
      continue;
    }
    if (triple && t.compare(i, 3, std::string(3, q)) == 0) return i + 3;
    if (!triple && t[i] == q) return i + 1;
    if (!triple && t[i] == '\n') return i;
    ++i;
  }
  return t.size();
}

// One logical line: a statement that continues while brackets are open, after a trailing
// backslash, or inside a triple-quoted string. Comment-only and empty lines are `blank`.
struct Statement {
  size_t begin = 0, end = 0;  // [begin, end): whole physical lines, end after the final '\n'
  size_t code = 0;            // offset of the first non-blank character
  std::string indent;         // leading whitespace of the first line
  char last = 0;              // last code character outside comments (':' ends a compound header)
  bool blank = true;
  bool header() const { return last == ':'; }
};

std::vector<Statement> statements(const std::string& t) {
  std::vector<Statement> out;
  const size_t n = t.size();
  size_t i = 0;
  while (i < n) {
    Statement s;
    s.begin = i;
    size_t k = i;
    while (k < n && (t[k] == ' ' || t[k] == '\t')) ++k;
    s.indent = t.substr(i, k - i);
    s.code = k;
    int depth = 0;
    while (k < n) {
      const char c = t[k];
      if (c == '#') {
        while (k < n && t[k] != '\n') ++k;
        continue;
      }
      if (c == '"' || c == '\'') {
        k = skip_string(t, k);
        s.last = c;
        s.blank = false;
        continue;
      }
      if (c == '\\' && k + 1 < n && t[k + 1] == '\n') {
        k += 2;
        continue;
      }
      if (c == '\n') {
        ++k;
        if (depth == 0) break;
        continue;
      }
      if (c == '(' || c == '[' || c == '{') ++depth;
      if ((c == ')' || c == ']' || c == '}') && depth > 0) --depth;
      if (c != ' ' && c != '\t') {
        s.last = c;
        s.blank = false;
      }
      ++k;
    }
    s.end = k;
    out.push_back(std::move(s));
    i = k;
  }
  return out;
}

size_t indent_width(const std::string& indent) {
  size_t w = 0;
  for (char c : indent) w += c == '\t' ? 8 : 1;
  return w;
}

// The file's indentation unit: the indentation of its first indented statement (one level deep).
std::string indent_unit(const std::vector<Statement>& stmts) {
  for (const auto& s : stmts)
    if (!s.blank && !s.indent.empty()) return s.indent.find('\t') != std::string::npos ? std::string("\t") : s.indent;
  return "    ";
}

// A statement that is nothing but a string literal (a docstring when it opens a body).
bool is_docstring(const std::string& t, const Statement& s) {
  size_t k = s.code;
  while (k < s.end && std::isalpha(static_cast<unsigned char>(t[k]))) ++k;  // r"", u"", ...
  if (k >= s.end || (t[k] != '"' && t[k] != '\'')) return false;
  for (k = skip_string(t, k); k < s.end; ++k) {
    if (t[k] == '#') return true;
    if (t[k] != ' ' && t[k] != '\t' && t[k] != '\n') return false;
  }
  return true;
}

// Re-indents `text` (written with spaces, 4 per level, in the patch JSON) so its least indented
// lines sit at `base` and each further level adds `unit`: a tab-indented file gets tabs, a
// two-space file two spaces, so Python never meets mixed indentation in one block.
std::string reindent(const std::string& text, const std::string& base, const std::string& unit) {
  std::vector<std::string> lines;
  std::stringstream ss(text);
  for (std::string l; std::getline(ss, l);) lines.push_back(l);
  size_t min_width = std::string::npos;
  auto width_of = [](const std::string& l) {
    size_t w = 0, k = 0;
    for (; k < l.size() && (l[k] == ' ' || l[k] == '\t'); ++k) w += l[k] == '\t' ? 4 : 1;
    return std::pair{w, k};
  };
  for (const auto& l : lines)
    if (l.find_first_not_of(" \t") != std::string::npos) min_width = std::min(min_width, width_of(l).first);
  std::string out;
  for (const auto& l : lines) {
    if (l.find_first_not_of(" \t") == std::string::npos) {
      out += "\n";
      continue;
    }
    const auto [w, k] = width_of(l);
    const size_t rel = w - min_width;
    out += base;
    for (size_t level = 0; level < rel / 4; ++level) out += unit;
    out += std::string(rel % 4, ' ') + l.substr(k) + "\n";
  }
  return out;
}

// Code of a statement on one line: comments dropped, continuations and newlines made spaces.
std::string flatten(const std::string& t, const Statement& s) {
  std::string out;
  for (size_t k = s.code; k < s.end;) {
    const char c = t[k];
    if (c == '#') {
      while (k < s.end && t[k] != '\n') ++k;
      continue;
    }
    if (c == '"' || c == '\'') {
      const size_t e = skip_string(t, k);
      out += t.substr(k, e - k);
      k = e;
      continue;
    }
    if (c == '\\' && k + 1 < s.end && t[k + 1] == '\n') {
      out += ' ';
      k += 2;
      continue;
    }
    out += c == '\n' ? ' ' : c;
    ++k;
  }
  return out;
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\n");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t\n") - b + 1);
}

struct ImportItem {
  std::string name, alias;  // alias empty: bound as name
  std::string text() const { return alias.empty() ? name : name + " as " + alias; }
  std::string bound() const { return alias.empty() ? name : alias; }
};

struct FromImport {
  std::string module;
  std::vector<ImportItem> items;
  bool parenthesised = false;
};

// `from M import a, b as c` / `from M import (\n a,\n b,\n)` / backslash continuations.
std::optional<FromImport> parse_from_import(const std::string& t, const Statement& s) {
  static const std::regex form(R"(^from\s+([A-Za-z_][\w.]*)\s+import\s+(.*)$)");
  const auto code = trim(flatten(t, s));
  std::smatch m;
  if (!std::regex_match(code, m, form)) return std::nullopt;
  FromImport fi;
  fi.module = m[1].str();
  auto list = trim(m[2].str());
  if (!list.empty() && list.front() == '(') {
    if (list.back() != ')') return std::nullopt;
    fi.parenthesised = true;
    list = list.substr(1, list.size() - 2);
  }
  static const std::regex item(R"(^([A-Za-z_]\w*)(?:\s+as\s+([A-Za-z_]\w*))?$)");
  std::stringstream ss(list);
  for (std::string part; std::getline(ss, part, ',');) {
    part = trim(part);
    if (part.empty()) continue;  // trailing comma
    std::smatch im;
    if (!std::regex_match(part, im, item)) return std::nullopt;  // `*` or something we do not rewrite
    fi.items.push_back({im[1].str(), im[2].str()});
  }
  return fi;
}

// Statements inside a guard this engine inserted (a `try:` carrying the hotfix marker, its
// except/else/finally clauses and their bodies) are never rewritten again.
std::vector<bool> inside_hotfix_guard(const std::string& t, const std::vector<Statement>& stmts) {
  std::vector<bool> inside(stmts.size(), false);
  std::optional<size_t> guard;  // indentation width of the guard's `try:`
  static const std::regex clause(R"(^(except|else|finally)\b)");
  for (size_t i = 0; i < stmts.size(); ++i) {
    const auto& s = stmts[i];
    if (s.blank) continue;
    const auto w = indent_width(s.indent);
    const auto line = t.substr(s.code, s.end - s.code);
    if (guard) {
      if (w > *guard || (w == *guard && std::regex_search(line, clause))) {
        inside[i] = true;
        continue;
      }
      guard.reset();
    }
    if (s.header() && line.starts_with("try") && line.find("opensci-compat hotfix") != std::string::npos) {
      guard = w;
      inside[i] = true;
    }
  }
  return inside;
}

// Identifiers (3+ characters) a regex pattern spells literally: what "nearest line" looks for.
std::vector<std::string> pattern_words(const std::string& pattern) {
  std::vector<std::string> words;
  std::string cur;
  auto flush = [&] {
    if (cur.size() >= 3 && std::find(words.begin(), words.end(), cur) == words.end()) words.push_back(cur);
    cur.clear();
  };
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\') {
      flush();
      ++i;  // \s \b \( \. ...: an escape is never part of a word
      continue;
    }
    if (std::isalnum(static_cast<unsigned char>(c)) || c == '_')
      cur += c;
    else
      flush();
  }
  flush();
  return words;
}

bool contains_word(const std::string& line, const std::string& word) {
  for (size_t at = line.find(word); at != std::string::npos; at = line.find(word, at + 1)) {
    const bool left = at == 0 || !(std::isalnum(static_cast<unsigned char>(line[at - 1])) || line[at - 1] == '_');
    const size_t e = at + word.size();
    const bool right = e >= line.size() || !(std::isalnum(static_cast<unsigned char>(line[e])) || line[e] == '_');
    if (left && right) return true;
  }
  return false;
}

std::vector<std::string> rule_words(const PatchRule& r) {
  if (r.kind == "regex") return pattern_words(r.find);
  if (r.kind == "insert_after") return pattern_words(r.anchor);
  if (r.kind == "python_import") {
    auto words = r.names;
    for (const auto& m : r.modules) words.push_back(m.substr(m.rfind('.') + 1));
    return words;
  }
  return {r.key};
}

struct Nearest {
  size_t score = 0, line = 0;
  std::string text;
};

Nearest find_nearest(const std::string& text, const PatchRule& rule) {
  const auto words = rule_words(rule);
  Nearest best;
  std::stringstream ss(text);
  size_t number = 0;
  for (std::string line; std::getline(ss, line);) {
    ++number;
    size_t score = 0;
    for (const auto& w : words)
      if (contains_word(line, w)) score += w.size();
    if (score > best.score) best = {score, number, line};
  }
  return best;
}

std::string describe_nearest(const Nearest& n, const PatchRule& rule) {
  if (n.score == 0) {
    const auto words = rule_words(rule);
    return fmt::format("no line mentions any of {}", fmt::join(words, ", "));
  }
  auto shown = trim(n.text);
  if (shown.size() > 120) shown = shown.substr(0, 117) + "...";
  return fmt::format("nearest line {}: `{}`", n.line, shown);
}

}  // namespace

namespace patch_text {

size_t apply_regex(std::string& text, const PatchRule& rule) {
  const auto re = compile(rule.find, rule);
  const auto count =
      static_cast<size_t>(std::distance(std::sregex_iterator(text.begin(), text.end(), re), std::sregex_iterator()));
  if (count && !rule.expect_none) text = std::regex_replace(text, re, rule.replace);
  return count;
}

size_t apply_insert_after(std::string& text, const PatchRule& rule) {
  const auto re = compile(rule.anchor, rule);
  std::smatch m;
  if (!std::regex_search(text, m, re)) return 0;
  if (rule.expect_none) return 1;
  const auto pos = static_cast<size_t>(m.position(0));
  const auto stmts = statements(text);
  size_t idx = 0;
  while (idx + 1 < stmts.size() && stmts[idx].end <= pos) ++idx;
  const auto& st = stmts[idx];
  const auto unit = indent_unit(stmts);
  std::string base = st.indent;
  size_t at = st.end;
  if (st.header()) {
    // Into the body: at its indentation, after its docstring.
    size_t b = idx + 1;
    while (b < stmts.size() && stmts[b].blank) ++b;
    if (b < stmts.size() && indent_width(stmts[b].indent) > indent_width(st.indent)) {
      base = stmts[b].indent;
      at = is_docstring(text, stmts[b]) ? stmts[b].end : stmts[b].begin;
    } else {
      base = st.indent + unit;
    }
  }
  std::string insert = reindent(rule.text, base, unit);
  if (at == text.size() && !text.empty() && text.back() != '\n') insert = "\n" + insert;
  text.insert(at, insert);
  return 1;
}

size_t apply_python_import(std::string& text, const PatchRule& rule) {
  const auto stmts = statements(text);
  const auto guarded = inside_hotfix_guard(text, stmts);
  const auto unit = indent_unit(stmts);
  size_t count = 0;
  std::string out;
  size_t copied = 0;
  for (size_t i = 0; i < stmts.size(); ++i) {
    const auto& s = stmts[i];
    if (s.blank || guarded[i]) continue;
    const auto fi = parse_from_import(text, s);
    if (!fi || std::find(rule.modules.begin(), rule.modules.end(), fi->module) == rule.modules.end()) continue;
    std::vector<ImportItem> keep, targets;
    for (const auto& item : fi->items)
      (std::find(rule.names.begin(), rule.names.end(), item.name) != rule.names.end() ? targets : keep).push_back(item);
    if (targets.empty()) continue;
    count += targets.size();
    if (rule.expect_none) continue;
    // The statement without the targets (dropped when nothing is left), then one guard per target.
    std::string rebuilt;
    if (!keep.empty()) {
      if (fi->parenthesised) {
        rebuilt = s.indent + "from " + fi->module + " import (\n";
        for (const auto& item : keep) rebuilt += s.indent + unit + item.text() + ",\n";
        rebuilt += s.indent + ")\n";
      } else {
        std::vector<std::string> parts;
        for (const auto& item : keep) parts.push_back(item.text());
        rebuilt = fmt::format("{}from {} import {}\n", s.indent, fi->module, fmt::join(parts, ", "));
      }
    }
    for (const auto& item : targets)
      rebuilt += reindent(replace_all(replace_all(rule.replace_with, "{as}", item.bound()), "{name}", item.name), s.indent,
                          unit);
    out += text.substr(copied, s.begin - copied) + rebuilt;
    copied = s.end;
  }
  if (count && !rule.expect_none) text = out + text.substr(copied);
  return count;
}

std::string nearest_line(const std::string& text, const PatchRule& rule) {
  return describe_nearest(find_nearest(text, rule), rule);
}

}  // namespace patch_text

Patch load_patch(const fs::path& file) {
  json j;
  try {
    j = json::parse(read_file(file));
  } catch (const json::exception& e) {
    fail("{}: patch is not valid JSON: {}", file.string(), e.what());
  }
  Patch p;
  p.source = file;
  p.name = j.value("name", file.stem().string());
  p.fixes = j.value("fixes", std::vector<std::string>{});
  if (!j.contains("rules") || !j["rules"].is_array() || j["rules"].empty())
    fail("{}: patch '{}' has no rules", file.string(), p.name);
  size_t index = 0;
  for (const auto& rj : j["rules"]) {
    PatchRule r;
    r.index = ++index;
    r.name = rj.value("name", std::string());
    r.hazard = rj.value("hazard", std::string());
    r.kind = rj.value("kind", std::string());
    r.file_glob = rj.value("file", std::string());
    const auto where = fmt::format("{}: patch '{}' {}", file.string(), p.name, r.label());
    if (r.hazard.empty() || r.file_glob.empty()) fail("{}: every rule names its 'hazard' and 'file'", where);
    const auto expect = rj.value("expect_matches", std::string(">=1"));
    if (expect != ">=1" && expect != "0") fail("{}: expect_matches must be \">=1\" or \"0\"", where);
    r.expect_none = expect == "0";
    auto text_of = [&](const char* key) {
      if (!rj.contains(key) || !rj[key].is_string()) fail("{}: needs a string '{}'", where, key);
      return rj[key].get<std::string>();
    };
    auto list_of = [&](const char* key) {
      if (!rj.contains(key) || !rj[key].is_array() || rj[key].empty()) fail("{}: needs a non-empty list '{}'", where, key);
      std::vector<std::string> out;
      for (const auto& v : rj[key]) {
        if (!v.is_string()) fail("{}: '{}' must list strings", where, key);
        out.push_back(v.get<std::string>());
      }
      return out;
    };
    if (r.kind == "regex") {
      r.find = text_of("find");
      r.replace = rj.value("replace", std::string());
      compile(r.find, r);
    } else if (r.kind == "insert_after") {
      r.anchor = text_of("anchor");
      r.text = text_of("text");
      compile(r.anchor, r);
    } else if (r.kind == "python_import") {
      r.modules = list_of("modules");
      r.names = list_of("names");
      if (!r.expect_none) r.replace_with = text_of("replace_with");
    } else if (r.kind == "json_set") {
      r.key = text_of("key");
      if (!rj.contains("value")) fail("{}: needs a 'value'", where);
      r.value = rj["value"];
      r.only_if_absent = rj.value("only_if_absent", false);
    } else {
      fail("{}: unknown kind '{}' (regex, insert_after, python_import, json_set)", where, r.kind);
    }
    p.rules.push_back(std::move(r));
  }
  return p;
}

namespace {

void apply_rules(const Patch& patch, const fs::path& model_dir, const fs::path& dir, PatchResult& result) {
  for (const auto& rule : patch.rules) {
    const auto where = fmt::format("patch '{}' ({}): {}", patch.name, patch.source.string(), rule.label());
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(dir))
      if (e.is_regular_file() && fnmatch(rule.file_glob.c_str(), e.path().filename().c_str(), 0) == 0)
        files.push_back(e.path());
    std::sort(files.begin(), files.end());
    if (files.empty()) fail("{} matches no file '{}' in {}", where, rule.file_glob, model_dir.string());
    size_t total = 0;
    Nearest best;
    std::string best_file;
    for (const auto& f : files) {
      if (rule.kind == "json_set") {
        json j;
        try {
          j = json::parse(read_file(f));
        } catch (const json::exception& e) {
          fail("{}: {} is not valid JSON: {}", where, f.filename().string(), e.what());
        }
        const bool set = !(rule.only_if_absent && j.contains(rule.key));
        if (set) {
          j[rule.key] = rule.value;
          write_file(f, j.dump(2) + "\n");
        }
        result.applied.push_back(fmt::format("{} {}: {} = {}{}", rule.hazard, f.filename().string(), rule.key,
                                             rule.value.dump(), set ? "" : " (already set, kept)"));
        continue;
      }
      auto src = read_source(f);
      size_t count = 0;
      if (rule.kind == "regex")
        count = patch_text::apply_regex(src.text, rule);
      else if (rule.kind == "insert_after")
        count = patch_text::apply_insert_after(src.text, rule);
      else
        count = patch_text::apply_python_import(src.text, rule);
      if (count && !rule.expect_none) write_source(f, src);
      total += count;
      if (count) result.applied.push_back(fmt::format("{} {}: {} {}", rule.hazard, f.filename().string(), count, rule.kind));
      if (!count) {
        const auto n = find_nearest(src.text, rule);
        if (best_file.empty() || n.score > best.score) best = n, best_file = f.filename().string();
      }
    }
    if (rule.kind == "json_set") continue;
    if (rule.expect_none && total != 0)
      fail("{} expects no match of its pattern in '{}', found {}", where, rule.file_glob, total);
    if (!rule.expect_none && total == 0) {
      // Line numbers as the user's file has them (earlier rules may have inserted lines above).
      std::string nearest = describe_nearest(best, rule);
      if (best.score > 0 && fs::exists(model_dir / best_file)) {
        std::stringstream ss(read_source(model_dir / best_file).text);
        size_t number = 0;
        bool found = false;
        for (std::string line; std::getline(ss, line) && !found;) found = (++number, line == best.text);
        if (found) best.line = number, nearest = describe_nearest(best, rule);
        else nearest += " (a line an earlier rule inserted)";
      }
      fail("{} found nothing to change in '{}' of {}: in {}, {}; the code it targets has changed, so the patch would "
           "silently do nothing",
           where, rule.file_glob, model_dir.string(), best_file, nearest);
    }
  }
}

}  // namespace

PatchResult apply_patch(const Patch& patch, const fs::path& model_dir, const fs::path& out_dir) {
  if (!fs::is_directory(model_dir)) fail("{}: model directory to patch does not exist", model_dir.string());
  std::error_code ec;
  if (out_dir.has_parent_path()) fs::create_directories(out_dir.parent_path());
  // Built beside out_dir (same filesystem: hard links and the final rename work), renamed at the end.
  const auto tmp = out_dir.parent_path() / fmt::format(".{}.patching-{}", out_dir.filename().string(), getpid());
  fs::remove_all(tmp, ec);
  PatchResult result;
  try {
    fs::create_directories(tmp);
    // Weights are hard-linked (no copy of a large checkpoint; a symlink would not resolve inside
    // a rootfs environment), everything else copied so rules can rewrite it.
    for (const auto& e : fs::directory_iterator(model_dir)) {
      if (!e.is_regular_file()) continue;
      const auto dst = tmp / e.path().filename();
      if (e.path().extension() == ".safetensors") {
        fs::create_hard_link(e.path(), dst, ec);
        if (!ec) continue;
      }
      fs::copy_file(e.path(), dst);
    }
    apply_rules(patch, model_dir, tmp, result);
    fs::remove_all(out_dir);
    fs::rename(tmp, out_dir);
  } catch (...) {
    // No unpatched or half-patched copy may stay where a capture would load it.
    fs::remove_all(tmp, ec);
    fs::remove_all(out_dir, ec);
    throw;
  }
  return result;
}

}  // namespace opensci::harness
