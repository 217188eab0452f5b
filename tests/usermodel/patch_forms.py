#!/usr/bin/env python3
"""The hotfix's static rules and the runtime shims on the code forms real remote code takes, in
real transformers (the debian-sid environment, 5.12.1): variants of the published-style fixture
(fixtures/remote_code/opensci_ref_published) spelled the other ways published code is spelled,
each built as a toy and run by `opensci-compat run` with patch sets hotfix and shims. Each cell
must pass: the rules found their targets in that spelling (a rule that finds nothing is an error)
and the rewritten code, or the shimmed run, computes the reference's forward.

  patch_forms.py --cli BUILD/harness/opensci-compat --source-dir REPO [--work DIR] [--variants a,b]
Exit 0 = all pass; 1 = a cell did not (printed); 77 = debian-sid cannot run here.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

p = argparse.ArgumentParser()
p.add_argument("--cli", required=True)
p.add_argument("--source-dir", required=True)
p.add_argument("--work")
p.add_argument("--variants", default="parenthesised-losskwargs,tabs-crlf,decorated-multiline")
p.add_argument("--threads", default="2")
a = p.parse_args()
work = a.work or tempfile.mkdtemp(prefix="opensci-patch-forms-")
src = os.path.join(a.source_dir, "fixtures/remote_code/opensci_ref_published")
code = open(os.path.join(src, "modeling_opensci.py")).read()
SINGLE = "from transformers.utils import TransformersKwargs\nfrom transformers.utils import logging\n"
assert SINGLE in code, "the fixture's import lines changed: update patch_forms.py"


def parenthesised_losskwargs(c):
    # The real OpenSci form: LossKwargs among other names in one parenthesised import.
    c = c.replace(SINGLE, "from transformers.utils import (\n    LossKwargs,\n    logging,\n)\n")
    return c.replace("TransformersKwargs", "LossKwargs")


def tabs_crlf(c):
    c = re.sub(r"^((?:    )+)", lambda m: "\t" * (len(m.group(1)) // 4), c, flags=re.M)
    return c.replace("\n", "\r\n")


def decorated_multiline(c):
    c = c.replace(SINGLE, "from transformers.utils import logging, \\\n    TransformersKwargs as KwargsForModel\n")
    c = c.replace("Unpack[TransformersKwargs]", "Unpack[KwargsForModel]")
    c = c.replace("from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS\n",
                  "from transformers.modeling_rope_utils import (\n    ROPE_INIT_FUNCTIONS,\n)\n")
    c = c.replace("    def forward(self, x, position_ids):\n",
                  "    def forward(\n        self,\n        x: torch.Tensor,\n        position_ids: torch.LongTensor,\n    ) -> tuple:\n"
                  "        \"\"\"cos, sin for the positions.\"\"\"\n")
    c = c.replace("class OpensciPreTrainedModel(PreTrainedModel):", "def _register(cls):\n    return cls\n\n\n@_register\nclass OpensciPreTrainedModel(PreTrainedModel):")
    c = c.replace("class OpensciForCausalLM(", "@_register\nclass OpensciForCausalLM(")
    c = c.replace('_tied_weights_keys = ["lm_head.weight"]', "_tied_weights_keys = ['lm_head.weight']")
    c = c.replace("    def _init_weights(self, module):", "    def _init_weights(self, module: nn.Module) -> None:")
    return c


VARIANTS = {"parenthesised-losskwargs": parenthesised_losskwargs, "tabs-crlf": tabs_crlf,
            "decorated-multiline": decorated_multiline}
failed, ran = [], 0
for name in a.variants.split(","):
    out = VARIANTS[name](code)
    assert out != code, name
    rc_dir = os.path.join(work, "code", name)
    shutil.rmtree(rc_dir, ignore_errors=True)
    os.makedirs(rc_dir)
    open(os.path.join(rc_dir, "modeling_opensci.py"), "w", newline="").write(out)
    shutil.copy(os.path.join(src, "configuration_opensci.py"), rc_dir)
    model = os.path.join(work, "models", name)
    subprocess.run([a.cli, "toy", "--config", os.path.join(a.source_dir, "toy_configs/opensci-ref-published.json"),
                    "--seed", "1", "--out", model, "--remote-code", rc_dir], check=True, stdout=subprocess.DEVNULL)
    r = subprocess.run([a.cli, "run", "--model", model, "--envs", "debian-sid", "--patch-sets", "hotfix,shims",
                        "--like", "opensci-ref-published", "--work", os.path.join(work, "run", name), "--threads", a.threads],
                       text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail = r.stdout[r.stdout.find("\ncell "):] if "\ncell " in r.stdout else r.stdout[-4000:]
    print(f"== {name}\n{tail}")
    rdir = os.path.join(work, "run", name, "results")
    verdicts = {json.load(open(os.path.join(rdir, f)))["name"]: json.load(open(os.path.join(rdir, f)))["verdict"]
                for f in sorted(os.listdir(rdir)) if f.endswith(".json")} if os.path.isdir(rdir) else {}
    if verdicts and all(v == "not-run" for v in verdicts.values()):
        print("OPENSCI-SKIPPED: debian-sid cannot run here (see above)")
        sys.exit(77)
    ran += 1
    if r.returncode != 0 or len(verdicts) != 2 or any(v != "pass" for v in verdicts.values()):
        failed.append(f"{name}: {verdicts or 'no results'}")
print("patch forms:", f"FAIL {failed}" if failed else f"{ran} variants x (hotfix, shims) pass")
if not failed and not a.work:
    shutil.rmtree(work, ignore_errors=True)
sys.exit(1 if failed else 0)
