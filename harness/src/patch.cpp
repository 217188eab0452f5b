#include "opensci/harness/patch.hpp"

#include <fmt/format.h>
#include <fnmatch.h>

#include <fstream>
#include <regex>
#include <sstream>

#include "opensci/error.hpp"

namespace opensci::harness {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

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
}

std::regex compile(const std::string& pattern, const Patch& patch, const PatchRule& rule) {
  try {
    return std::regex(pattern, std::regex::ECMAScript | std::regex::multiline);
  } catch (const std::regex_error& e) {
    fail("{}: patch '{}' rule for {}: bad regex '{}': {}", patch.source.string(), patch.name, rule.hazard, pattern, e.what());
  }
}

}  // namespace

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
  for (const auto& rj : j["rules"]) {
    PatchRule r;
    r.hazard = rj.value("hazard", std::string());
    r.kind = rj.value("kind", std::string());
    r.file_glob = rj.value("file", std::string());
    if (r.hazard.empty() || r.file_glob.empty())
      fail("{}: patch '{}': every rule names its 'hazard' and 'file'", file.string(), p.name);
    const auto expect = rj.value("expect_matches", std::string(">=1"));
    if (expect != ">=1" && expect != "0")
      fail("{}: patch '{}' rule {}: expect_matches must be \">=1\" or \"0\"", file.string(), p.name, r.hazard);
    r.expect_none = expect == "0";
    if (r.kind == "regex") {
      r.find = rj.at("find").get<std::string>();
      r.replace = rj.value("replace", std::string());
    } else if (r.kind == "insert_after") {
      r.anchor = rj.at("anchor").get<std::string>();
      r.text = rj.at("text").get<std::string>();
    } else if (r.kind == "json_set") {
      r.key = rj.at("key").get<std::string>();
      r.value = rj.at("value");
      r.only_if_absent = rj.value("only_if_absent", false);
    } else {
      fail("{}: patch '{}' rule {}: unknown kind '{}' (regex, insert_after, json_set)", file.string(), p.name, r.hazard,
           r.kind);
    }
    p.rules.push_back(std::move(r));
  }
  return p;
}

PatchResult apply_patch(const Patch& patch, const fs::path& model_dir, const fs::path& out_dir) {
  if (!fs::is_directory(model_dir)) fail("{}: model directory to patch does not exist", model_dir.string());
  std::error_code ec;
  fs::remove_all(out_dir, ec);
  fs::create_directories(out_dir);
  // Weights are hard-linked (no copy of a large checkpoint; a symlink would not resolve inside
  // a rootfs environment), everything else copied so rules can rewrite it.
  for (const auto& e : fs::directory_iterator(model_dir)) {
    if (!e.is_regular_file()) continue;
    const auto dst = out_dir / e.path().filename();
    if (e.path().extension() == ".safetensors") {
      fs::create_hard_link(e.path(), dst, ec);
      if (!ec) continue;
    }
    fs::copy_file(e.path(), dst);
  }
  PatchResult result;
  for (const auto& rule : patch.rules) {
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(out_dir))
      if (e.is_regular_file() && fnmatch(rule.file_glob.c_str(), e.path().filename().c_str(), 0) == 0) files.push_back(e.path());
    std::sort(files.begin(), files.end());
    if (files.empty())
      fail("patch '{}' ({}): rule for {} matches no file '{}' in {}", patch.name, patch.source.string(), rule.hazard,
           rule.file_glob, model_dir.string());
    size_t total = 0;
    for (const auto& f : files) {
      size_t count = 0;
      if (rule.kind == "json_set") {
        auto j = json::parse(read_file(f));
        if (!(rule.only_if_absent && j.contains(rule.key))) {
          j[rule.key] = rule.value;
          write_file(f, j.dump(2) + "\n");
          count = 1;
        }
        total += count;
        result.applied.push_back(fmt::format("{} {}: {} = {}{}", rule.hazard, f.filename().string(), rule.key,
                                             rule.value.dump(), count ? "" : " (already set, kept)"));
        continue;
      }
      auto text = read_file(f);
      if (rule.kind == "regex") {
        const auto re = compile(rule.find, patch, rule);
        count = static_cast<size_t>(std::distance(std::sregex_iterator(text.begin(), text.end(), re), std::sregex_iterator()));
        if (count && !rule.expect_none) write_file(f, std::regex_replace(text, re, rule.replace));
      } else {  // insert_after
        const auto re = compile(rule.anchor, patch, rule);
        std::smatch m;
        if (std::regex_search(text, m, re)) {
          count = 1;
          if (!rule.expect_none) {
            auto end_of_line = text.find('\n', static_cast<size_t>(m.position(0) + m.length(0)));
            end_of_line = end_of_line == std::string::npos ? text.size() : end_of_line + 1;
            auto insert = rule.text;
            if (!insert.empty() && insert.back() != '\n') insert.push_back('\n');
            text.insert(end_of_line, insert);
            write_file(f, text);
          }
        }
      }
      total += count;
      if (count) result.applied.push_back(fmt::format("{} {}: {} {}", rule.hazard, f.filename().string(), count, rule.kind));
    }
    if (rule.kind == "json_set") continue;
    if (rule.expect_none && total != 0)
      fail("patch '{}' ({}): rule for {} expects no match of its pattern in '{}', found {}", patch.name,
           patch.source.string(), rule.hazard, rule.file_glob, total);
    if (!rule.expect_none && total == 0)
      fail("patch '{}' ({}): rule for {} found nothing to change in '{}' of {}: the code it targets has changed, so the "
           "patch would silently do nothing",
           patch.name, patch.source.string(), rule.hazard, rule.file_glob, model_dir.string());
  }
  return result;
}

}  // namespace opensci::harness
