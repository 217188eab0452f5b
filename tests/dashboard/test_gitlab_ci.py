#!/usr/bin/env python3
"""The GitLab pipeline file, exercised for real:

1. it validates against GitLab's published CI schema (the copy check-jsonschema ships), and a
   broken copy does not (the lint can fail);
2. gitlabci-local lists every job, and the pipelines have what issue 12 asks: merge requests build
   and test on the CPU (unit + live cells, JUnit), compile CUDA and HIP, check formatting; the
   nightly runs GPU matrix cells on CUDA and ROCm runners (tags, resource spec, environment cache,
   JUnit, HTML report, JSON results); every test job fails on zero live cells;
3. the cheap merge-request jobs (format, pipeline-lint) run through gitlabci-local in host mode.
   The build and test jobs cost a full build: scripts/ci/gitlab-local.sh runs them by hand.
Exit 77 (skipped, with the reason) when the CI tools cannot be installed from PyPI here.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)
    return ok


def sh(cmd, **kw):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def main():
    source = os.path.abspath(sys.argv[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("CI_")}
    lint = sh(["bash", os.path.join(source, "scripts/ci/lint-gitlab-ci.sh")], env=env)
    if lint.returncode == 77:
        print("SKIP: the CI tools (gitlabci-local, check-jsonschema) could not be installed from PyPI here:\n" + lint.stdout)
        return 77
    check(lint.returncode == 0 and "validation done" in lint.stdout,
          f".gitlab-ci.yml validates against GitLab's CI schema: {lint.stdout.strip()[-200:]}")
    work = tempfile.mkdtemp(prefix="opensci-gitlab-ci-")
    try:
        text = open(os.path.join(source, ".gitlab-ci.yml")).read()
        for name, broken in [("misspelt key", text.replace("  script:\n", "  scirpt:\n", 1)),
                             ("bad artifacts:when", text.replace("when: always", "when: sometimes", 1))]:
            path = os.path.join(work, "broken.yml")
            open(path, "w").write(broken)
            r = sh(["bash", os.path.join(source, "scripts/ci/lint-gitlab-ci.sh"), path], env=env)
            check(r.returncode == 1 and "validation errors" in r.stdout, f"a pipeline file with a {name} fails the lint")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    listing = sh(["bash", os.path.join(source, "scripts/ci/gitlab-local.sh"), "--list", "--json"], env=env)
    if not check(listing.returncode == 0, "gitlab-local.sh --list"):
        print(listing.stdout)
        return 1
    jobs = {j["name"]: j for j in json.loads(listing.stdout[listing.stdout.index("["):])}
    gcil = os.path.join(os.environ.get("OPENSCI_CI_TOOLS", os.path.join(
        os.environ.get("OPENSCI_CACHE_DIR", os.path.expanduser("~/.cache/opensci-compat")), "ci-tools")), "bin", "gcil")
    dump = sh([gcil, "--no-color", "--dump"], cwd=source, env=env).stdout
    listed = set(re.findall(r"^([A-Za-z0-9_.-]+):\s*$", dump, re.M))
    check(set(jobs) <= listed, f"gitlabci-local lists every job ({sorted(set(jobs) - listed)} missing)")

    def in_pipeline(source_kind):
        return {n: j for n, j in jobs.items() if j["pipelines"].get(source_kind) == "on_success"}

    def runs(j, text):
        return any(text in line for line in j["script"])

    mr = in_pipeline("merge_request_event")
    check(any(runs(j, "dashboard/configure.cmake") and runs(j, "dashboard/build.cmake") for j in mr.values()),
          "merge requests: a CPU build job (ctest -S configure + build)")
    tests = [j for j in mr.values() if runs(j, "dashboard/test.cmake")]
    check(bool(tests) and all(j["junit"] for j in tests), "merge requests: a test job (ctest -S test) with its JUnit report")
    check(all(int(j["variables"].get("OPENSCI_MIN_LIVE_CELLS", "0")) >= 1 for j in tests),
          "merge requests: the test job fails on zero live cells")
    check(all(not j["variables"].get("OPENSCI_TEST_LABELS") for j in tests),
          "merge requests: the CPU test job runs every test (unit and live CPU cells)")
    check(any(runs(j, "compile-check-gpu.sh cuda") for j in mr.values()), "merge requests: CUDA compile check")
    check(any(runs(j, "compile-check-gpu.sh hip") for j in mr.values()), "merge requests: HIP compile check")
    check(any(runs(j, "check-format.sh") for j in mr.values()), "merge requests: format check")
    check(all(not set(j["tags"]) & {"nvidia-gpu", "amd-gpu"} for j in mr.values()), "merge requests: no GPU runner needed")

    nightly = in_pipeline("schedule")
    for kind, tag, label in [("CUDA", "nvidia-gpu", "cuda"), ("ROCm", "amd-gpu", "rocm")]:
        gpu = [j for j in nightly.values() if tag in j["tags"]]
        if not check(len(gpu) == 1, f"nightly: one {kind} job on a '{tag}' runner"):
            continue
        j = gpu[0]
        v = j["variables"]
        check(runs(j, "dashboard/test.cmake") and label in v.get("OPENSCI_TEST_LABELS", "") and
              "gpu-system" in v.get("OPENSCI_TEST_LABELS", ""),
              f"nightly {kind}: runs the GPU tests and GPU matrix cells ({v.get('OPENSCI_TEST_LABELS')})")
        check(bool(v.get("OPENSCI_RESOURCE_SPEC_FILE")) and runs(j, "gpu-resource-spec.sh"),
              f"nightly {kind}: a resource spec file of the runner's GPUs")
        check(bool(j["cache"]) and any("envs" in p for p in j["cache"]["paths"]), f"nightly {kind}: the environment cache")
        check(bool(j["junit"]) and any(p.endswith("report.html") for p in j["artifact_paths"]) and
              any(p.endswith("results/") for p in j["artifact_paths"]),
              f"nightly {kind}: JUnit, the HTML report and the JSON results as artifacts")
        check(int(v.get("OPENSCI_MIN_LIVE_CELLS", "0")) >= 1, f"nightly {kind}: fails on zero live cells")
    check(any(runs(j, "fresh-machine.sh") for j in nightly.values()), "nightly: the fresh-machine job is kept")

    # The cheap merge-request jobs, for real, through gitlabci-local in host mode.
    r = sh(["bash", os.path.join(source, "scripts/ci/gitlab-local.sh"), "format", "pipeline-lint"], env=env)
    print(r.stdout[-1500:])
    check(r.returncode == 0 and re.search(r"format\s+passed", r.stdout) and re.search(r"pipeline-lint\s+passed", r.stdout)
          and "check-format: ok" in r.stdout and "validation done" in r.stdout,
          "gitlabci-local ran the format and pipeline-lint jobs and both passed")
    print(f"{len(failures)} failed checks")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
