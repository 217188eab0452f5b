#!/usr/bin/env python3
"""Acceptance of issue 13: a directory laid out like a published open-sci-ref model (remote code,
config, bf16 weights in sharded safetensors + index), made OUTSIDE the project's tree, toyified
and run through the matrix by `opensci-compat run`, gets the verdicts of the project's own
published fixture: its expectations in the default environment (debian-sid, transformers 5.12.1)
and the recorded verdicts of the golden 5.12.1 replays, patch set by patch set.

  acceptance.py --cli BUILD/harness/opensci-compat --source-dir REPO [--work DIR] [--threads 2]
Exit 0 = every verdict equal; 1 = a difference (printed); 77 = debian-sid cannot run here (why printed).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

p = argparse.ArgumentParser()
p.add_argument("--cli", required=True)
p.add_argument("--source-dir", required=True)
p.add_argument("--work")
p.add_argument("--threads", default="2")
a = p.parse_args()
work = a.work or tempfile.mkdtemp(prefix="opensci-acceptance-")
if os.path.realpath(work).startswith(os.path.realpath(a.source_dir) + os.sep):
    sys.exit(f"--work {work} is inside the project; the point is a model from outside it")
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
published = os.path.join(work, "open-sci-ref-v0.01-1.7b")
subprocess.run([sys.executable, os.path.join(a.source_dir, "tests/usermodel/make_published_like.py"), "--out", published,
                "--remote-code", os.path.join(a.source_dir, "fixtures/remote_code/opensci_ref_published")], check=True)
run = subprocess.run([a.cli, "run", "--model", published, "--envs", "debian-sid", "--expect", "like", "--work",
                      os.path.join(work, "run"), "--threads", a.threads], cwd=work, text=True,
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
print(run.stdout[-6000:])

matrix = json.load(open(os.path.join(a.source_dir, "matrix/matrix.json")))
fixture = "opensci-ref-published"
def expectation(env, patch):
    # What the harness itself expects of the fixture's cell (expectations by version range, the
    # environment's own overrides, the cell's expect): `matrix explain`, not a re-implementation.
    key = fixture if patch == "none" else f"{fixture}+{patch}"
    cell = f"cell/{env}/{key}/padded/float32-cpu/vs-cpu-fp64"
    out = subprocess.run([a.cli, "matrix", "explain", cell, "--matrix", os.path.join(a.source_dir, "matrix/matrix.json")],
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in out.stdout.splitlines():
        if line.strip().startswith("expect:"):
            return line.split(":", 1)[1].split()[0]
    sys.exit(f"matrix explain {cell} printed no expectation (exit {out.returncode}):\n{out.stdout}")
def patch_sets(env):
    for c in matrix["cells"]:
        if fixture in c["models"] and env in c["environments"]:
            return c.get("patch_sets", ["none"])
    return []

results = {}
rdir = os.path.join(work, "run", "results")
for f in sorted(os.listdir(rdir)) if os.path.isdir(rdir) else []:
    if f.endswith(".json") and not f.endswith(".reference.json"):
        r = json.load(open(os.path.join(rdir, f)))
        variant = r["name"].split("/")[2]
        results[variant.split("+", 1)[1] if "+" in variant else "none"] = r
if results and all(r["verdict"] == "not-run" for r in results.values()):
    print("OPENSCI-SKIPPED: debian-sid cannot run here:", next(iter(results.values()))["summary"])
    shutil.rmtree(work, ignore_errors=True) if not a.work else None
    sys.exit(77)

def outcome(r):
    v = r["verdict"]
    if v == "pass":
        return "pass"
    hazard = (r.get("diagnosis") or {}).get("hazard")
    return f"xfail:{hazard}" if v == "xfail" else f"{v}({hazard})"

bad = []
want = patch_sets("debian-sid")
if sorted(results) != sorted(want):
    bad.append(f"patch sets run {sorted(results)} != the fixture's {sorted(want)}")
golden = {ps: expectation("golden-5.12.1", ps) for ps in patch_sets("golden-5.12.1")}
print(f"{'patch set':16} {'fixture debian-sid':20} {'fixture golden-5.12.1':22} {'your model (5.12.1 live)':26}")
for ps in want:
    got = outcome(results[ps]) if ps in results else "missing"
    exp = expectation("debian-sid", ps)
    print(f"{ps:16} {exp:20} {golden.get(ps, '-'):22} {got:26}")
    if got != exp:
        bad.append(f"{ps}: {got}, the fixture's is {exp}")
    if ps in golden and got != golden[ps]:
        bad.append(f"{ps}: {got}, the fixture's golden 5.12.1 replay says {golden[ps]}")
toy = json.load(open(os.path.join(work, "run", "models", "open-sci-ref-v0-01-1-7b", "config.json")))
if toy["_toyified_from"]["source"] != os.path.realpath(published) and toy["_toyified_from"]["source"] != published:
    bad.append(f"_toyified_from.source is {toy['_toyified_from']['source']}")
if run.returncode != 0:
    bad.append(f"opensci-compat run exited {run.returncode}")
for b in bad:
    print("DIFFERENT:", b)
print("acceptance:", "FAIL" if bad else f"every verdict equals the fixture's ({len(want)} patch sets)")
if not bad and not a.work:
    shutil.rmtree(work, ignore_errors=True)
sys.exit(1 if bad else 0)
