// The static patch engine on the forms real remote code takes: every rule of the project's
// hotfix, each on several spellings of the code it targets (one name or several, parenthesised
// lists, aliases, backslash continuations, tabs, two spaces, CRLF, decorators, type hints,
// multi-line signatures, docstrings). A rewrite must be what Python means: each result is
// compiled by python3 (TabError / IndentationError / SyntaxError fail the test), and the import
// guards are executed against stand-in transformers packages of both eras.
#include <sys/wait.h>

#include <cstdlib>
#include <regex>

#include "opensci/error.hpp"
#include "opensci/harness/patch.hpp"
#include "test_helpers.hpp"

using namespace opensci::harness;
using opensci::test::read_text;
using opensci::test::ScratchDir;
using opensci::test::write_text;
namespace fs = std::filesystem;

namespace {

const Patch& hotfix() {
  static const Patch p = load_patch(opensci::test::source_dir() / "matrix/patches/hotfix.json");
  return p;
}

const PatchRule& rule(const std::string& name) {
  for (const auto& r : hotfix().rules)
    if (r.name == name) return r;
  FAIL("hotfix.json has no rule named '" << name << "'");
  throw;
}

int run_shell(const std::string& command) {
  const int status = std::system(command.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

bool have_python() { return run_shell("python3 -c 'pass' >/dev/null 2>&1") == 0; }

// python3 compiles `code` (no import is executed); the compiler's message is shown on failure.
void require_compiles(const std::string& code, const std::string& what) {
  if (!have_python()) {
    WARN("python3 not found: compile check of " << what << " skipped");
    return;
  }
  ScratchDir dir("pycompile");
  write_text(dir / "m.py", code);
  const auto log = dir / "log";
  const int rc = run_shell("python3 -c \"import sys; compile(open(sys.argv[1], newline='').read(), sys.argv[1], 'exec')\" '" +
                           (dir / "m.py").string() + "' >'" + log.string() + "' 2>&1");
  INFO(what << ":\n" << code << "\npython3: " << read_text(log));
  REQUIRE(rc == 0);
}

// Runs `code` with a stand-in `transformers` package on the path: era "4.x" defines only
// LossKwargs, "5.x" only TransformersKwargs (in transformers.utils and transformers.utils.generic).
int run_with_transformers(const std::string& code, const std::string& era, std::string* output = nullptr) {
  ScratchDir dir("pyrun");
  fs::create_directories(dir / "transformers/utils");
  const std::string kw = era == "4.x" ? "LossKwargs" : "TransformersKwargs";
  write_text(dir / "transformers/__init__.py", "");
  write_text(dir / "transformers/utils/__init__.py",
             "from .generic import " + kw + "\nlogging = 'logging'\nauto_docstring = 'auto_docstring'\n");
  write_text(dir / "transformers/utils/generic.py", "class " + kw + "(dict):\n    era = '" + era + "'\n");
  write_text(dir / "m.py", code);
  const auto log = dir / "log";
  const int rc = run_shell("cd '" + dir.path().string() + "' && PYTHONPATH=. python3 m.py >log 2>&1");
  if (output) *output = read_text(log);
  return rc;
}

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (auto at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

}  // namespace

TEST_CASE("H1 import guard: every form of the import, the other names kept") {
  const auto& r = rule("guarded kwargs import");
  const auto& assertion = rule("no unguarded kwargs import");
  struct Form {
    std::string what, code, bound, kept;
  };
  const std::vector<Form> forms = {
      {"one name", "from transformers.utils import LossKwargs\n", "LossKwargs", ""},
      {"several names on a line", "from transformers.utils import auto_docstring, LossKwargs, logging\n", "LossKwargs",
       "from transformers.utils import auto_docstring, logging\n"},
      {"parenthesised over many lines, comments, trailing comma (the real OpenSci form)",
       "from transformers.utils import (\n    LossKwargs,  # gone in 4.54\n    auto_docstring,\n    logging,\n)\n",
       "LossKwargs", "from transformers.utils import (\n    auto_docstring,\n    logging,\n)\n"},
      {"parenthesised, the name last", "from transformers.utils import (logging,\n                                TransformersKwargs)\n",
       "TransformersKwargs", "from transformers.utils import (\n    logging,\n)\n"},
      {"aliased", "from transformers.utils import TransformersKwargs as KwargsForCausalLM\n", "KwargsForCausalLM", ""},
      {"aliased among others", "from transformers.utils import logging, LossKwargs as LK\n", "LK",
       "from transformers.utils import logging\n"},
      {"backslash continuation", "from transformers.utils import logging, \\\n    LossKwargs\n", "LossKwargs",
       "from transformers.utils import logging\n"},
      {"from transformers.utils.generic", "from transformers.utils.generic import TransformersKwargs\n",
       "TransformersKwargs", ""},
  };
  for (const auto& f : forms) {
    SECTION(f.what) {
      std::string text = "import os\n" + f.code + "\n\nclass Kw(" + f.bound + "):\n    pass\n";
      REQUIRE(patch_text::apply_python_import(text, r) == 1);
      INFO(text);
      if (!f.kept.empty()) CHECK(text.find(f.kept) != std::string::npos);
      CHECK(count(text, "opensci-compat hotfix (H1)") == 1);
      CHECK(text.find("import TransformersKwargs as " + f.bound + "\n") != std::string::npos);
      // Idempotent and self-checking: the assertion finds no unguarded import, a second run nothing.
      CHECK(patch_text::apply_python_import(text, assertion) == 0);
      std::string again = text;
      CHECK(patch_text::apply_python_import(again, r) == 0);
      require_compiles(text, f.what);
      if (have_python()) {
        for (const char* era : {"4.x", "5.x"}) {
          std::string out;
          const auto probe = text + "print(" + f.bound + ".era)\n" + (f.kept.empty() ? "" : "print(logging)\n");
          CHECK(run_with_transformers(probe, era, &out) == 0);
          INFO(era << ": " << out);
          CHECK(out.find(era) != std::string::npos);
        }
      }
    }
  }
  SECTION("indented (tabs, inside a block) and CRLF files") {
    std::string text = "if True:\n\tfrom transformers.utils import (\n\t\tLossKwargs,\n\t\tlogging,\n\t)\n\tx = 1\n";
    REQUIRE(patch_text::apply_python_import(text, r) == 1);
    INFO(text);
    CHECK(text.find("\ttry:  # opensci-compat hotfix (H1)") != std::string::npos);
    CHECK(text.find("\n\t\tfrom transformers.utils import TransformersKwargs as LossKwargs\n") != std::string::npos);
    CHECK(text.find("\n    ") == std::string::npos);  // no space indentation in a tab file
    require_compiles(text, "tab-indented block");
    if (have_python()) CHECK(run_with_transformers(text + "print(LossKwargs.era)\n", "5.x") == 0);
  }
  SECTION("an import of other names, a star import or a look-alike module is not touched") {
    std::string text =
        "from transformers.utils import logging\nfrom transformers.utils import *\n"
        "from mypkg.transformers.utils import LossKwargs\n";
    const auto before = text;
    CHECK(patch_text::apply_python_import(text, r) == 0);
    CHECK(text == before);
  }
}

TEST_CASE("H2 and H3 inserts land after the whole statement, in the body, at its indentation") {
  const auto& h2 = rule("inline default rope init");
  const auto& h3 = rule("recompute inv_freq in rotary forward");
  const std::string rotary_body = "        return x, position_ids\n";
  struct Form {
    std::string what, code;
  };
  const std::vector<Form> imports = {
      {"one name", "from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS\n"},
      {"several names", "from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update\n"},
      {"parenthesised", "from transformers.modeling_rope_utils import (\n    ROPE_INIT_FUNCTIONS,\n    dynamic_rope_update,\n)\n"},
  };
  for (const auto& f : imports) {
    SECTION("H2 after: " + f.what) {
      std::string text = "import torch\n" + f.code + "x = 1\n";
      REQUIRE(patch_text::apply_insert_after(text, h2) == 1);
      INFO(text);
      CHECK(text.starts_with("import torch\n" + f.code + "\n\ndef _opensci_default_rope_init("));
      require_compiles(text, f.what);
    }
  }
  const std::vector<Form> forwards = {
      {"plain", "class R:\n    def forward(self, x, position_ids):\n" + rotary_body},
      {"decorated twice", "class R:\n    @torch.no_grad()\n    @dynamic_rope_update  # power user\n"
                          "    def forward(self, x, position_ids):\n" + rotary_body},
      {"type hints", "class R:\n    def forward(self, x: torch.Tensor, position_ids: torch.LongTensor) -> tuple:\n" +
                         rotary_body},
      {"signature over three lines", "class R:\n    def forward(\n        self, x,\n        position_ids=None,\n    ):\n" +
                                         rotary_body},
      {"docstring first", "class R:\n    def forward(self, x, position_ids):\n        \"\"\"Cos and sin.\n\n"
                          "        Two lines.\"\"\"\n" + rotary_body},
      {"decorated class", "@register\nclass R(nn.Module):\n    def forward(self, x, position_ids):\n" + rotary_body},
  };
  for (const auto& f : forwards) {
    SECTION("H3 into: " + f.what) {
      std::string text = f.code;
      REQUIRE(patch_text::apply_insert_after(text, h3) == 1);
      INFO(text);
      CHECK(text.find("\n        self.inv_freq = self.rope_init_fn(self.config, x.device)[0]\n" + rotary_body) !=
            std::string::npos);
      require_compiles("import torch\nregister = dynamic_rope_update = lambda f: f\nnn = torch.nn\n" + text, f.what);
      if (f.what == "docstring first") CHECK(text.find("Two lines.\"\"\"\n        # opensci-compat hotfix (H3)") != std::string::npos);
    }
  }
  SECTION("H3 in a tab-indented and in a two-space file") {
    for (const std::string& unit : {std::string("\t"), std::string("  ")}) {
      std::string text = "class R:\n" + unit + "def forward(self, x, position_ids):\n" + unit + unit + "return x\n";
      REQUIRE(patch_text::apply_insert_after(text, h3) == 1);
      INFO(text);
      CHECK(text.find("\n" + unit + unit + "self.inv_freq = self.rope_init_fn(self.config, x.device)[0]\n") !=
            std::string::npos);
      require_compiles(text, unit == "\t" ? "tabs" : "two spaces");
    }
  }
}

TEST_CASE("H4 and H8 on decorated classes, quotes, tuples and type hints") {
  const auto& h4 = rule("tied keys as dict");
  const auto& h4_assert = rule("no list-form tied keys");
  const auto& h8 = rule("guard init of loaded modules");
  for (const std::string& keys : {std::string("[\"lm_head.weight\"]"), std::string("['lm_head.weight']"),
                                 std::string("[ \"lm_head.weight\", ]"), std::string("(\"lm_head.weight\",)")}) {
    std::string text = "@auto_docstring\nclass M(Base):\n    _tied_weights_keys = " + keys + "\n";
    INFO(keys);
    REQUIRE(patch_text::apply_regex(text, h4) == 1);
    CHECK(text.find("_tied_weights_keys = {\"lm_head.weight\": \"model.embed_tokens.weight\"}") != std::string::npos);
    CHECK(patch_text::apply_regex(text, h4_assert) == 0);
    require_compiles("auto_docstring = lambda c: c\nBase = object\n" + text, keys);
  }
  for (const std::string& sig : {std::string("def _init_weights(self, module):"),
                                std::string("def _init_weights(self, module: nn.Module) -> None:")}) {
    for (const std::string& unit : {std::string("    "), std::string("\t")}) {
      std::string text = "@auto_docstring\nclass P(PreTrainedModel):\n" + unit + sig + "\n" + unit + unit +
                         "std = 0.02\n";
      INFO(sig << " / unit '" << unit << "'");
      REQUIRE(patch_text::apply_insert_after(text, h8) == 1);
      INFO(text);
      CHECK(text.find("\n" + unit + unit + "_own_params = list(module.parameters(recurse=False))\n") != std::string::npos);
      require_compiles("import torch\nnn = torch.nn\nauto_docstring = lambda c: c\nPreTrainedModel = object\n" + text, sig);
    }
  }
}

TEST_CASE("the whole hotfix on CRLF, tab-indented and parenthesised variants of the published code") {
  const auto src = opensci::test::source_dir() / "fixtures/remote_code/opensci_ref_published";
  const auto original = read_text(src / "modeling_opensci.py");
  // The real OpenSci spelling: LossKwargs among other names in a parenthesised import.
  const std::string single = "from transformers.utils import TransformersKwargs\nfrom transformers.utils import logging\n";
  REQUIRE(original.find(single) != std::string::npos);
  auto parenthesised = original;
  parenthesised.replace(parenthesised.find(single), single.size(),
                        "from transformers.utils import (\n    LossKwargs,\n    logging,\n)\n");
  parenthesised = std::regex_replace(parenthesised, std::regex("TransformersKwargs"), "LossKwargs");
  const auto tabs = std::regex_replace(original, std::regex("    "), "\t");
  const auto crlf = std::regex_replace(parenthesised, std::regex("\n"), "\r\n");
  for (const auto& [what, code] : std::vector<std::pair<std::string, std::string>>{
           {"parenthesised LossKwargs import", parenthesised}, {"tabs", tabs}, {"CRLF", crlf}}) {
    SECTION(what) {
      ScratchDir dir("hotfix-forms");
      fs::create_directories(dir / "model");
      write_text(dir / "model/modeling_opensci.py", code);
      fs::copy_file(src / "configuration_opensci.py", dir / "model/configuration_opensci.py");
      write_text(dir / "model/config.json", R"({"model_type": "opensci"})");
      const auto r = apply_patch(hotfix(), dir / "model", dir / "out");
      CHECK(r.applied.size() == 7);
      const auto out = read_text(dir / "out/modeling_opensci.py");
      for (const char* h : {"(H1)", "(H2)", "(H3)", "(H4)", "(H8)"}) CHECK(out.find(std::string("opensci-compat hotfix ") + h) != std::string::npos);
      if (what == "CRLF") {
        CHECK(count(out, "\r\n") == count(out, "\n"));  // every line still CRLF, inserted ones too
      }
      require_compiles(out, what);
    }
  }
}

TEST_CASE("a rule that cannot apply names the rule, the file and the nearest line it looked at") {
  ScratchDir dir("patch-nearest");
  fs::create_directories(dir / "model");
  // Rotary forward spelled with other argument names: the H3 anchor (x, position_ids) cannot match.
  write_text(dir / "model/modeling_opensci.py",
             "from transformers.utils import TransformersKwargs\n"
             "from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS\n"
             "class R:\n    def __init__(self):\n        self.f = ROPE_INIT_FUNCTIONS[self.rope_type]\n"
             "    def forward(self, hidden, positions):\n        return hidden\n");
  write_text(dir / "model/config.json", "{}");
  REQUIRE_ERROR_MENTIONS(apply_patch(hotfix(), dir / "model", dir / "out"), "patch 'hotfix'",
                         "rule 5 'recompute inv_freq in rotary forward' (H3, insert_after)", "modeling_opensci.py",
                         "nearest line 6: `def forward(self, hidden, positions):`", "silently do nothing");
  CHECK_FALSE(fs::exists(dir / "out"));
  write_text(dir / "model/modeling_opensci.py", "import os\n");
  REQUIRE_ERROR_MENTIONS(apply_patch(hotfix(), dir / "model", dir / "out"), "rule 1 'guarded kwargs import'",
                         "no line mentions any of TransformersKwargs, LossKwargs");
}

// Issue 10: a failed `opensci-compat patch` left a full, unpatched copy where captures load it.
TEST_CASE("a failed patch leaves no output directory, not even an earlier one") {
  ScratchDir dir("patch-atomic");
  fs::create_directories(dir / "model");
  write_text(dir / "model/modeling_x.py", "class A:\n    pass\n");
  write_text(dir / "model/model.safetensors", "weights");
  write_text(dir / "ok.json", R"({"name": "ok", "rules": [
    {"hazard": "H1", "kind": "regex", "file": "modeling_*.py", "find": "class A", "replace": "class B"}]})");
  write_text(dir / "bad.json", R"({"name": "bad", "rules": [
    {"hazard": "H1", "kind": "regex", "file": "modeling_*.py", "find": "class A", "replace": "class B"},
    {"hazard": "H2", "kind": "regex", "file": "modeling_*.py", "find": "ROPE_INIT_FUNCTIONS", "replace": "x"}]})");
  auto leftovers = [&] {
    size_t n = 0;
    for (const auto& e : fs::directory_iterator(dir.path())) n += e.path().filename().string().find("patching") != std::string::npos;
    return n;
  };
  SECTION("fresh output") {
    REQUIRE_THROWS_AS(apply_patch(load_patch(dir / "bad.json"), dir / "model", dir / "out"), opensci::Error);
    CHECK_FALSE(fs::exists(dir / "out"));
    CHECK(leftovers() == 0);
  }
  SECTION("an earlier successful output is removed, not left stale") {
    apply_patch(load_patch(dir / "ok.json"), dir / "model", dir / "out");
    REQUIRE(read_text(dir / "out/modeling_x.py").find("class B") != std::string::npos);
    REQUIRE_THROWS_AS(apply_patch(load_patch(dir / "bad.json"), dir / "model", dir / "out"), opensci::Error);
    CHECK_FALSE(fs::exists(dir / "out"));
    CHECK(leftovers() == 0);
  }
  SECTION("the CLI exits non-zero and leaves nothing") {
    const int rc = run_shell(std::string(OPENSCI_CLI) + " patch --model '" + (dir / "model").string() + "' --patch '" +
                             (dir / "bad.json").string() + "' --out '" + (dir / "cli-out").string() + "' >/dev/null 2>&1");
    CHECK(rc == 2);
    CHECK_FALSE(fs::exists(dir / "cli-out"));
    CHECK(leftovers() == 0);
  }
  CHECK(read_text(dir / "model/modeling_x.py") == "class A:\n    pass\n");  // the source is never touched
}
