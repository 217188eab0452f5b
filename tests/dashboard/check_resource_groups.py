#!/usr/bin/env python3
"""CTest's GPU allocation reaches the tests for real: `ctest -j --resource-spec-file` runs stand-in
GPU tests (gpu_select_probe, which selects its device as the GPU tests do) with RESOURCE_GROUPS
gpus:1, and every test must run on the GPU CTest gave it: no two tests at once on one GPU, every
GPU of the spec used. The spec files are the ones the project ships: the 8-GPU example
(scripts/ci/gpus-8.example.json) and what scripts/ci/gpu-resource-spec.sh writes for a runner.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def run(a, work, name, spec, visible, tests, hold=0.6, jobs=None):
    d = os.path.join(work, name)
    logs = os.path.join(d, "logs")
    os.makedirs(logs)
    lines = []
    for i in range(tests):
        lines.append(f'add_test(gpu/{i} "{a.probe}" {visible} "{logs}" {hold})')
        lines.append(f'set_tests_properties(gpu/{i} PROPERTIES RESOURCE_GROUPS "gpus:1")')
    open(os.path.join(d, "CTestTestfile.cmake"), "w").write("\n".join(lines) + "\n")
    cmd = [a.ctest, "--test-dir", d, "-j", str(jobs or tests), "--output-on-failure"]
    if spec:
        cmd += ["--resource-spec-file", spec]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTEST_RESOURCE") and k != "OPENSCI_GPU_DEVICE"}
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    records = [json.load(open(f)) for f in glob.glob(os.path.join(logs, "*.json"))]
    return p.returncode, p.stdout, records


def check_spread(name, rc, out, records, gpus, tests):
    check(rc == 0, f"{name}: all {tests} tests passed (exit {rc})")
    check(len(records) == tests, f"{name}: {len(records)} of {tests} tests recorded their device")
    check(all(r["from_ctest"] for r in records), f"{name}: every device came from CTest's allocation")
    check(all(0 <= r["device"] < gpus for r in records), f"{name}: devices within the spec's {gpus} GPUs")
    clashes, overlaps = [], 0
    for i, r in enumerate(records):
        for s in records[i + 1:]:
            if r["start"] < s["end"] and s["start"] < r["end"]:
                overlaps += 1
                if r["device"] == s["device"]:
                    clashes.append((r["source"], s["source"]))
    check(overlaps > 0, f"{name}: tests ran at the same time ({overlaps} overlapping pairs): the check is not vacuous")
    check(not clashes, f"{name}: no two concurrent tests on one GPU {clashes[:2]}")
    check(len({r["device"] for r in records}) == gpus, f"{name}: all {gpus} GPUs used "
          f"({sorted({r['device'] for r in records})})")
    if rc != 0:
        print(out[-3000:])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--probe", required=True)
    ap.add_argument("--ctest", required=True)
    ap.add_argument("--source", required=True)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="opensci-resource-groups-")
    try:
        example = os.path.join(a.source, "scripts/ci/gpus-8.example.json")
        rc, out, rec = run(a, work, "example-8", example, 8, 16)
        check_spread("8-GPU example spec, 16 tests, -j16", rc, out, rec, 8, 16)

        spec4 = os.path.join(work, "gpus-4.json")
        g = subprocess.run(["bash", os.path.join(a.source, "scripts/ci/gpu-resource-spec.sh"), spec4],
                           env=dict(os.environ, OPENSCI_GPU_COUNT="4"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
        check(g.returncode == 0, f"gpu-resource-spec.sh writes a spec for 4 GPUs: {g.stdout.strip()}")
        rc, out, rec = run(a, work, "generated-4", spec4, 4, 8)
        check_spread("generated 4-GPU spec, 8 tests, -j8", rc, out, rec, 4, 8)

        bad = os.path.join(work, "bad.json")
        json.dump({"version": {"major": 1, "minor": 0}, "local": [{"gpus": [{"id": "7", "slots": 1}]}]}, open(bad, "w"))
        rc, out, rec = run(a, work, "missing-gpu", bad, 4, 1)
        check(rc != 0 and "CTEST_RESOURCE_GROUP_0_GPUS='id:7,slots:1'" in out and "4 device(s)" in out,
              f"a spec naming GPU 7 on a 4-GPU machine fails the test, naming the allocation (exit {rc})")

        rc, out, rec = run(a, work, "no-spec", None, 4, 2)
        check(rc == 0 and rec and all(not r["from_ctest"] and r["device"] == 0 for r in rec),
              "without --resource-spec-file CTest allocates nothing: device 0, said so")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{len(failures)} failed checks")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
