#!/usr/bin/env python3
"""The transformers release line of matrix/matrix.json, from the package index.

Reads the index's project page for transformers (PEP 691 JSON: PyPI, devpi, any simple index
that speaks it), takes the newest non-yanked final release of every minor from the matrix's
`_release_line.from` up to the newest, and (with --write) rewrites in matrix/matrix.json:

  - one environment per minor, "<prefix><major>.<minor>" (e.g. tf-5.3), declaring that exact
    version; its spec is `_release_line.spec` with "transformers" set to it;
  - the environment "latest": spec transformers "latest" (resolved by the index once per UTC
    day), declared as the newest minor ("5.24": the env test fails, naming both versions, when
    the index has moved past it — run this script again);
  - the "environments" list of every cell marked "_release_line": true (all minors, in order,
    plus "latest" where the cell lists it), or "_release_line": "4.51" (the minors from 4.51 on).

Without --write it prints what it found and what would change (exit 0). Standard library only.

    python3 scripts/release-line.py                    # show
    python3 scripts/release-line.py --write            # update matrix/matrix.json, then review the diff
"""

import argparse
import json
import os
import re
import ssl
import sys
import urllib.request

FINAL = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


def default_index():
    for var in ("UV_DEFAULT_INDEX", "UV_INDEX_URL", "PIP_INDEX_URL"):
        if os.environ.get(var):
            return os.environ[var]
    return "https://pypi.org/simple"


def fetch_project(index, project):
    url = index.rstrip("/") + "/" + project + "/"
    req = urllib.request.Request(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    ctx = ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE") or None)
    with urllib.request.urlopen(req, timeout=60, context=ctx) as r:
        ctype = r.headers.get("Content-Type", "")
        body = r.read()
    if "json" not in ctype:
        raise SystemExit(f"{url}: the index answered {ctype!r}, not PEP 691 JSON (application/vnd.pypi.simple.v1+json)")
    return url, json.loads(body)


def version_of(filename, project):
    stem = filename[len(project) + 1:] if filename.lower().startswith(project + "-") else None
    if stem is None:
        return None
    if filename.endswith(".whl"):
        return stem.split("-")[0]
    if filename.endswith(".tar.gz"):
        return stem[: -len(".tar.gz")]
    return None


def release_line(files, start):
    """{(major, minor): "X.Y.Z"}: newest final, non-yanked release per minor >= start."""
    live = {}
    for f in files:
        v = version_of(f["filename"], "transformers")
        if not v or not FINAL.match(v):
            continue
        if f.get("yanked"):
            continue
        live.setdefault(v, True)
    best = {}
    for v in live:
        t = tuple(int(x) for x in FINAL.match(v).groups())
        if t[:2] < start:
            continue
        if t[:2] not in best or t > best[t[:2]][0]:
            best[t[:2]] = (t, v)
    return {k: best[k][1] for k in sorted(best)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--matrix", default=os.path.join(os.path.dirname(__file__), "..", "matrix", "matrix.json"))
    p.add_argument("--index", default=default_index(), help="simple index URL (default: $UV_DEFAULT_INDEX, "
                   "$UV_INDEX_URL, $PIP_INDEX_URL, https://pypi.org/simple)")
    p.add_argument("--write", action="store_true", help="rewrite the matrix file")
    args = p.parse_args(argv)

    with open(args.matrix, encoding="utf-8") as f:
        matrix = json.load(f)
    cfg = matrix.get("_release_line")
    if not isinstance(cfg, dict) or "from" not in cfg or "spec" not in cfg:
        raise SystemExit(f"{args.matrix}: no '_release_line' object with 'from' and 'spec'")
    start = tuple(int(x) for x in cfg["from"].split("."))
    prefix = cfg.get("prefix", "tf-")
    url, project = fetch_project(args.index, "transformers")
    line = release_line(project.get("files", []), start)
    if not line:
        raise SystemExit(f"{url}: no final transformers release >= {cfg['from']}")
    newest = max(line)

    envs = matrix["environments"]
    names = []
    changes = []
    for (major, minor), version in line.items():
        name = f"{prefix}{major}.{minor}"
        names.append(name)
        spec = json.loads(json.dumps(cfg["spec"]))
        spec["transformers"] = version
        entry = {"transformers": version, "spec": spec}
        if "required" in cfg:
            entry["required"] = cfg["required"]
        old = envs.get(name)
        if old is None:
            changes.append(f"+ {name}: {version}")
        elif old.get("transformers") != version or old.get("spec") != spec:
            changes.append(f"~ {name}: {old.get('transformers')} -> {version}")
        for keep in ("expect", "patch_sets", "_about"):
            if old and keep in old:
                entry[keep] = old[keep]
        envs[name] = entry
    for name in [n for n in envs if n.startswith(prefix) and n not in names and envs[n]["spec"].get("provider") == cfg["spec"].get("provider")]:
        changes.append(f"- {name} (no longer on the index's release line)")
        del envs[name]
    latest_spec = json.loads(json.dumps(cfg["spec"]))
    latest_spec["transformers"] = "latest"
    latest_declared = f"{newest[0]}.{newest[1]}"
    old = envs.get("latest", {})
    if old.get("transformers") != latest_declared:
        changes.append(f"~ latest: declared {old.get('transformers')} -> {latest_declared} (newest: {line[newest]})")
    envs["latest"] = dict(old, transformers=latest_declared, spec=latest_spec)
    if "required" in cfg:
        envs["latest"]["required"] = cfg["required"]
    envs["latest"].setdefault(
        "_about", "The newest release on the index, resolved once per UTC day; declared as the newest minor of the "
        "release line, so the env test fails (naming both versions) once the index moves on: rerun "
        "scripts/release-line.py.")
    for cell in matrix["cells"]:
        if not cell.get("_release_line"):
            continue
        # "_release_line": "4.51" starts that cell's line at 4.51 (e.g. an architecture that older
        # releases do not have); true = the whole line.
        first = cell["_release_line"]
        first = tuple(int(x) for x in first.split(".")) if isinstance(first, str) else start
        wanted = [n for n, k in zip(names, line) if k >= first]
        wanted += ["latest"] if "latest" in cell.get("environments", []) else []
        extra = [e for e in cell.get("environments", []) if e not in wanted and not (e.startswith(prefix) or e == "latest")]
        if cell.get("environments") != extra + wanted:
            changes.append(f"~ cell '{cell.get('_about', cell.get('models'))}': {len(wanted)} release-line environments")
        cell["environments"] = extra + wanted
    cfg["resolved_from"] = url
    cfg["versions"] = [line[k] for k in line]

    print(f"{url}: {len(line)} minors from {cfg['from']}: " + " ".join(line[k] for k in line))
    for c in changes:
        print("  " + c)
    if not changes:
        print("  matrix is up to date")
    if args.write:
        with open(args.matrix + ".tmp", "w", encoding="utf-8") as f:
            json.dump(matrix, f, indent=2)
            f.write("\n")
        os.replace(args.matrix + ".tmp", args.matrix)
        print(f"wrote {args.matrix}: review with git diff")
    return 0


if __name__ == "__main__":
    sys.exit(main())
