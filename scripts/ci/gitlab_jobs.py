#!/usr/bin/env python3
"""Which jobs of .gitlab-ci.yml run in which pipeline, the way GitLab decides it: `extends`
merged, `workflow:rules` and each job's `rules` evaluated for a pipeline source. gitlabci-local
runs jobs but ignores rules, so scripts/ci/gitlab-local.sh asks this script which jobs a pipeline
kind runs. Needs PyYAML (the CI tools venv has it).

  gitlab_jobs.py FILE list [--json]                 every job: stage, pipelines, tags, scripts, artifacts
  gitlab_jobs.py FILE select SOURCE [--cpu-only]    the jobs a SOURCE pipeline starts by itself, in stage order

SOURCE: merge_request_event | schedule | push | web. Only the rule forms this project uses are
understood ($VAR == "text", $VAR == $VAR, ||, &&, bare `when`); anything else is an error, never
a guess.
"""
import json
import re
import sys

import yaml

SOURCES = ["merge_request_event", "schedule", "push", "web"]
KEYWORDS = {"stages", "variables", "workflow", "default", "include", "image", "services", "cache", "before_script",
            "after_script"}
GPU_TAGS = {"nvidia-gpu", "amd-gpu", "privileged"}


def merge(base, over):
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve(doc, name, seen=()):
    job = doc[name]
    ext = job.get("extends", [])
    ext = [ext] if isinstance(ext, str) else ext
    out = {}
    for e in ext:
        if e in seen:
            raise SystemExit(f"gitlab_jobs: extends cycle at {e}")
        out = merge(out, resolve(doc, e, seen + (name,)))
    return merge(out, {k: v for k, v in job.items() if k != "extends"})


def env_for(source):
    return {"CI_PIPELINE_SOURCE": source, "CI_DEFAULT_BRANCH": "main",
            "CI_COMMIT_BRANCH": "main" if source in ("push", "schedule", "web") else ""}


def evaluate(expr, env):
    def term(t):
        t = t.strip()
        m = re.fullmatch(r'\$(\w+)\s*(==|!=)\s*(?:"([^"]*)"|\'([^\']*)\'|\$(\w+))', t)
        if not m:
            raise SystemExit(f"gitlab_jobs: rule expression not understood: {t!r}")
        left = env.get(m.group(1), "")
        right = env.get(m.group(5), "") if m.group(5) else (m.group(3) if m.group(3) is not None else m.group(4))
        return (left == right) if m.group(2) == "==" else (left != right)
    return any(all(term(a) for a in alt.split("&&")) for alt in expr.split("||"))


def when_in(rules, env):
    """The job's `when` in this pipeline: on_success, manual, never."""
    if rules is None:
        return "on_success"
    for r in rules:
        if "if" not in r or evaluate(r["if"], env):
            return r.get("when", "on_success")
    return "never"


def jobs(path):
    doc = yaml.safe_load(open(path))
    out = []
    stages = doc.get("stages", ["build", "test", "deploy"])
    for name in doc:
        if name in KEYWORDS or name.startswith("."):
            continue
        j = resolve(doc, name)
        pipelines = {}
        for s in SOURCES:
            env = env_for(s)
            created = when_in(doc.get("workflow", {}).get("rules"), env) != "never"
            w = when_in(j.get("rules"), env) if created else "never"
            if w != "never":
                pipelines[s] = w
        arts = j.get("artifacts", {})
        out.append({"name": name, "stage": j.get("stage", "test"), "stage_index": stages.index(j.get("stage", "test")),
                    "pipelines": pipelines, "tags": j.get("tags", []), "image": j.get("image"),
                    "script": j.get("script", []), "after_script": j.get("after_script", []),
                    "variables": {**doc.get("variables", {}), **j.get("variables", {})},
                    "cache": j.get("cache"), "junit": arts.get("reports", {}).get("junit"),
                    "artifact_paths": arts.get("paths", []), "needs": j.get("needs", [])})
    return sorted(out, key=lambda j: (j["stage_index"], j["name"]))


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    path, cmd = sys.argv[1], sys.argv[2]
    all_jobs = jobs(path)
    if cmd == "list":
        if "--json" in sys.argv:
            json.dump(all_jobs, sys.stdout, indent=1)
            return
        for j in all_jobs:
            where = ", ".join(f"{s}" + (f" ({w})" if w != "on_success" else "") for s, w in j["pipelines"].items())
            print(f"{j['name']:<18} {j['stage']:<6} tags={','.join(j['tags']) or '-':<12} pipelines: {where or 'none'}")
    elif cmd == "select":
        source = sys.argv[3]
        if source not in SOURCES:
            raise SystemExit(f"gitlab_jobs: unknown pipeline source {source!r} ({', '.join(SOURCES)})")
        for j in all_jobs:
            if j["pipelines"].get(source) != "on_success":
                continue
            if "--cpu-only" in sys.argv and GPU_TAGS & set(j["tags"]):
                continue
            print(j["name"])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
