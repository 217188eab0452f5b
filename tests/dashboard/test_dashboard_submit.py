#!/usr/bin/env python3
"""The dashboard test step (scripts/ci/dashboard/test.cmake), end to end, against a CDash
receiver on loopback (cdash_receiver.py): real ctest -S runs, real HTTP.

1. cells:     the matrix's golden cells (real toys, replayed captures, real reference forwards
              and comparisons) run through the dashboard script and are submitted; the uploaded
              Test.xml must carry every cell with its labels and its measurements, with the
              values of the cell's result JSON, the failing cells their PNG plot; the JUnit file
              lists every test.
2. receivers: a green and a red run against a receiver that is down, answers HTTP 500, is slower
              than the submit timeout, or rejects the file (CDash <status>ERROR</status>): each
              failure is reported, and the job's exit status is the tests' own, never flipped.
3. guards:    a run that collects no tests, or runs no live cell, fails.
"""
import argparse
import base64
import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
MEASUREMENTS = ["verdict", "expect", "hazard", "transformers_version", "torch_version"]
COMPARISON_MEASUREMENTS = ["max_abs_dlogit", "max_abs_dlog_softmax", "rel_l2", "cosine", "kl_mean", "kl_max",
                           "top1_agreement", "first_divergent_layer", "first_divergent_layer_index"]

failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)
    return ok


class Receiver:
    def __init__(self, work, mode, delay=8.0):
        self.dir = os.path.join(work, f"receiver-{mode}-{time.monotonic_ns()}")
        os.makedirs(self.dir)
        port_file = os.path.join(self.dir, "port")
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "cdash_receiver.py"), "--mode", mode,
                                      "--out", self.dir, "--port-file", port_file, "--delay", str(delay),
                                      "--max-seconds", "240"])
        deadline = time.monotonic() + 20
        while not os.path.exists(port_file):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"cdash_receiver.py ({mode}) did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{open(port_file).read().strip()}/submit.php?project=opensci-compat"

    def requests(self):
        path = os.path.join(self.dir, "requests.jsonl")
        return [json.loads(l) for l in open(path)] if os.path.exists(path) else []

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def free_port_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    return f"http://127.0.0.1:{port}/submit.php?project=opensci-compat"


def run_dashboard(a, build_dir, url, **env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CI_", "CTEST_", "OPENSCI_DASHBOARD_"))}
    env.update({"OPENSCI_BUILD_DIR": build_dir, "OPENSCI_CDASH_SUBMIT_URL": url or "", "OPENSCI_CDASH_RETRY_COUNT": "0",
                "OPENSCI_CDASH_TIMEOUT": "2", "OPENSCI_TEST_PARALLEL": "2", "OPENSCI_MIN_LIVE_CELLS": "0",
                "OPENSCI_BACKEND": "cpu"})
    env.update({k: str(v) for k, v in env_extra.items()})
    t0 = time.monotonic()
    p = subprocess.run([a.ctest, "-S", os.path.join(a.source, "scripts/ci/dashboard/test.cmake")], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return p.returncode, p.stdout, time.monotonic() - t0


def tiny_tree(work, name, tests):
    """A binary dir whose CTestTestfile.cmake holds `tests`: (name, command list, properties)."""
    d = os.path.join(work, name)
    os.makedirs(d)
    lines = []
    for test, cmd, props in tests:
        lines.append("add_test([==[%s]==] %s)" % (test, " ".join("[==[%s]==]" % c for c in cmd)))
        if props:
            lines.append("set_tests_properties([==[%s]==] PROPERTIES %s)" % (test, props))
    open(os.path.join(d, "CTestTestfile.cmake"), "w").write("\n".join(lines) + "\n")
    return d


def measurements_of(test):
    out = {}
    for m in test.iter("NamedMeasurement"):
        v = m.find("Value")
        out[m.get("name")] = (m.get("type"), v.text if v is not None else None)
    return out


def scenario_cells(a, work):
    build = os.path.join(work, "cells")
    os.makedirs(build)
    subprocess.run([a.cli, "matrix", "ctest", "--matrix", os.path.join(a.source, "matrix/matrix.json"), "--cli", a.cli,
                    "--work", os.path.join(build, "matrix"), "--out", os.path.join(build, "matrix_tests.cmake")],
                   check=True, stdout=subprocess.DEVNULL)
    open(os.path.join(build, "CTestTestfile.cmake"), "w").write('include("matrix_tests.cmake")\n')
    listing = json.loads(subprocess.run([a.ctest, "--test-dir", build, "-N", "-L", a.labels, "--show-only=json-v1"],
                                        check=True, stdout=subprocess.PIPE, text=True).stdout)
    labels_of = {}
    for t in listing["tests"]:
        for p in t.get("properties", []):
            if p["name"] == "LABELS":
                labels_of[t["name"]] = set(p["value"])
    cells = sorted(n for n, l in labels_of.items() if "cell" in l)
    check(len(cells) > 0, f"the matrix has cells labelled '{a.labels}' to submit ({len(cells)})")

    receiver = Receiver(work, "ok")
    rc, out, secs = run_dashboard(a, build, receiver.url, OPENSCI_TEST_LABELS=a.labels)
    receiver.stop()
    print(f"  cells scenario: ctest -S exit {rc} in {secs:.1f} s")
    reqs = receiver.requests()
    test_put = [r for r in reqs if r["query"].get("FileName", "").endswith("Test.xml")]
    check(len(test_put) == 1, f"one Test.xml upload ({[r['query'].get('FileName') for r in reqs]})")
    check(any(r["query"].get("FileName", "").endswith("Done.xml") for r in reqs), "Done.xml uploaded")
    if not test_put:
        print(out[-4000:])
        return
    q = test_put[0]["query"]
    check(q.get("project") == "opensci-compat", f"project in the submit URL: {q.get('project')}")
    check(q.get("build", "").startswith("cpu-") and "-tf" in q.get("build", ""),
          f"build name names backend, compiler, transformers range: {q.get('build')}")
    check(q.get("stamp", "").endswith("-Experimental"), f"stamp names the model: {q.get('stamp')}")
    check(q.get("MD5") == test_put[0]["md5"], "the MD5 ctest sent matches the body the receiver got")
    uploaded = os.path.join(receiver.dir, os.path.basename(q["FileName"]))
    root = ET.parse(uploaded).getroot()
    check(root.get("BuildName") == q.get("build"), "Test.xml's BuildName is the submitted build")
    by_name = {t.findtext("Name"): t for t in root.iter("Test") if t.get("Status") is not None}
    failed = [n for n, t in by_name.items() if t.get("Status") == "failed"]
    check((rc == 0) == (not failed), f"exit status {rc} matches the run ({len(failed)} failed tests: {failed[:3]})")
    check("submitted Test;Done" in out or "submitted Test Done" in out, "the script says the submission went through")
    results_dir = os.path.join(build, "matrix", "results")
    missing, images = [], 0
    for name in cells:
        t = by_name.get(name)
        if t is None:
            missing.append(name)
            continue
        got_labels = {l.text for l in t.iter("Label")}
        check(got_labels == labels_of[name], f"{name}: labels in Test.xml are the cell's ({sorted(got_labels ^ labels_of[name])})")
        if t.get("Status") == "notrun":
            continue
        m = measurements_of(t)
        result = json.load(open(os.path.join(results_dir, name.replace("/", "+") + ".json")))
        need = MEASUREMENTS + (COMPARISON_MEASUREMENTS if "comparison" in result else [])
        check(all(k in m for k in need), f"{name}: measurements {[k for k in need if k not in m] or 'all'} present")
        check(m.get("verdict", (None, None))[1] == result["verdict"], f"{name}: verdict measurement = result ({result['verdict']})")
        if "comparison" in result and "max_abs_dlogit" in m:
            c = result["comparison"]
            typ, val = m["max_abs_dlogit"]
            check(typ == "numeric/double" and abs(float(val) - float(c["max_abs"])) <= 1e-6 * abs(float(c["max_abs"])) + 1e-300,
                  f"{name}: max_abs_dlogit {val} = result {c['max_abs']}")
            if not c["within_tolerance"]:
                img = m.get("layer_divergence")
                ok = img is not None and img[0] == "image/png" and \
                    base64.b64decode("".join(img[1].split()))[:8] == b"\x89PNG\r\n\x1a\n"
                check(ok, f"{name}: out of tolerance, its per-layer plot is attached as image/png")
                images += ok
    check(not missing, f"every cell is in the uploaded Test.xml (missing: {missing[:5]})")
    check(images > 0, f"at least one out-of-tolerance cell carried its plot ({images})")
    junit = os.path.join(build, "junit.xml")
    if check(os.path.exists(junit), "JUnit file written"):
        cases = ET.parse(junit).getroot().iter("testcase")
        check(sum(1 for _ in cases) == len(by_name), "JUnit lists every test of the run")


def scenario_receivers(a, work):
    """Every receiver state x a green and a red run, concurrently (each in its own tree)."""
    def one(mode, want_green):
        kind = "green" if want_green else "red"
        tests = [(f"{kind}/cell", [a.cmake, "-E", "true"], "LABELS cell")]
        if not want_green:
            tests.append((f"{kind}/fails", [a.cmake, "-E", "false"], ""))
        tree = tiny_tree(work, f"{mode}-{kind}", tests)
        # A slow receiver answers after 30 s; curl gives up once no byte moved for the timeout
        # (its speed window is ~5 s, so ~6 s + OPENSCI_CDASH_TIMEOUT per file).
        receiver = None if mode == "down" else Receiver(work, mode, delay=30)
        url = free_port_url() if mode == "down" else receiver.url
        rc, out, secs = run_dashboard(a, tree, url, OPENSCI_CDASH_TIMEOUT=1)
        if receiver:
            receiver.stop()
        status = open(os.path.join(tree, "dashboard-submit.txt")).read()
        return mode, kind, want_green, rc, out, secs, status

    combos = [(m, g) for m in ["ok", "down", "http500", "slow", "cdash-error"] for g in (True, False)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(combos)) as pool:
        outcomes = list(pool.map(lambda c: one(*c), combos))
    for mode, kind, want_green, rc, out, secs, status in outcomes:
        check((rc == 0) == want_green, f"{mode} receiver, {kind} run: exit {rc} ({secs:.1f} s)")
        if mode == "ok":
            check("SUBMISSION FAILED" not in out and "Test Done: submitted to" in status, f"{mode}, {kind}: submitted")
        else:
            check("SUBMISSION FAILED" in out and "SUBMISSION FAILED" in status and "submitted to" not in status,
                  f"{mode}, {kind}: the failed submission is reported: {status.strip()[:200]}")
        if mode == "slow":
            check(secs < 25, f"slow receiver abandoned after the timeout ({secs:.1f} s, the receiver waits 30 s per file)")
        if (rc == 0) != want_green:
            print(out[-3000:])


def scenario_guards(a, work):
    empty = tiny_tree(work, "empty", [])
    rc, out, _ = run_dashboard(a, empty, "")
    check(rc != 0 and "collected no tests" in out, f"a run that collects no tests fails (exit {rc})")
    check("not submitting" in out, "no URL: the script says it does not submit")
    skip = [sys.executable, "-c", "import sys; sys.exit(77)"]
    dead = tiny_tree(work, "no-live", [("cell/skipped", skip, "LABELS cell SKIP_RETURN_CODE 77"),
                                       ("cell/replay", [a.cmake, "-E", "true"], "LABELS \"cell;golden\""),
                                       ("unit/x", [a.cmake, "-E", "true"], "LABELS unit")])
    rc, out, _ = run_dashboard(a, dead, "", OPENSCI_MIN_LIVE_CELLS=1)
    check(rc != 0 and "0 live cells" in out, f"a run with no live cell (skipped + golden replay only) fails (exit {rc})")
    live = tiny_tree(work, "live", [("cell/ran", [a.cmake, "-E", "true"], "LABELS cell")])
    rc, out, _ = run_dashboard(a, live, "", OPENSCI_MIN_LIVE_CELLS=1)
    check(rc == 0 and "1 live" in out, f"one live cell satisfies OPENSCI_MIN_LIVE_CELLS=1 (exit {rc})")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cli", required=True)
    ap.add_argument("--source", required=True)
    ap.add_argument("--ctest", required=True)
    ap.add_argument("--cmake", required=True)
    ap.add_argument("--labels", default="golden", help="ctest -L regex of the cells submitted in scenario 1")
    ap.add_argument("--scenario", choices=["all", "cells", "receivers", "guards"], default="all")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="opensci-dashboard-")
    t0 = time.monotonic()
    try:
        if a.scenario in ("all", "guards"):
            scenario_guards(a, work)
        if a.scenario in ("all", "receivers"):
            scenario_receivers(a, work)
        if a.scenario in ("all", "cells"):
            scenario_cells(a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{len(failures)} failed checks in {time.monotonic() - t0:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
