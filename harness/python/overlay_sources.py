#!/usr/bin/env python3
"""Prepare the source trees the `overlay` environments of other transformers versions use.

Runs on the host (standard library + git), never inside an environment, and writes OUTSIDE the
repository (default /var/cache/opensci-src): fetched code is never committed. What it makes:

  transformers-<v>/                 `git archive v<v> src setup.py` of a transformers clone with
                                    release tags, plus OPENSCI-LOCAL-CHANGES saying what (if
                                    anything) was changed
  huggingface_hub-<v>/src/          `git archive v<v> src` of huggingface_hub + a minimal
                                    <name>-<v>.dist-info/METADATA (transformers 4.x checks the
                                    hub's distribution version at import: >=0.24/0.34, <1.0)
  tokenizers-<v>-debian/            Debian's python3-tokenizers (package dir + its dist-info),
                                    copied from a debian-rootfs environment
  tokenizers-<v>-debian-nometadata/ the same package dir WITHOUT dist-info

Why the tokenizers dirs: transformers 4.48 ... 5.2 import tokenizers unconditionally on the
AutoConfig path (integrations/ggml.py), and pin it at import (4.48: <0.22; 4.57, 5.0, 5.2:
<=0.23.0) while the only tokenizers available offline is Debian's 0.23.1.
  * 4.x: the pin is checked only when tokenizers' distribution metadata is found
    (is_tokenizers_available() needs the version), so the metadata-less copy is imported and not
    checked. transformers itself is unmodified.
  * 5.0 / 5.2 check whenever the module is importable, so the pin in the extracted tree's
    dependency_versions_table.py is relaxed to <=0.23.1 - the same relaxation Debian ships in
    its python3-transformers 5.12.1 (">=0.20,<=0.23.1"). This is the ONLY change, recorded in
    the tree's OPENSCI-LOCAL-CHANGES and visible in every capture's provenance
    (versions.transformers_pins, versions.dependencies).
Captures never tokenize (token ids come from fixtures/tokens/*.json).

Example (the mirrors come from the `fetch` of github:8b-is/transformers and
github:huggingface/huggingface_hub; the rootfs is the default environment's):

    python3 harness/python/overlay_sources.py \\
        --transformers-git /work/.mirror/8b-is+transformers/repo \\
        --hub-git /work/.mirror/huggingface+huggingface_hub/repo \\
        --tokenizers-from ~/.cache/opensci-compat/envs/debian-sid-<hash>/rootfs/usr/lib/python3/dist-packages

It prints the environment variables matrix/PROPOSED-versions.json expects.
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys

TRANSFORMERS = ("4.48.0", "4.57.6", "5.0.0", "5.2.0")
HUB = "0.36.2"
# (version, exact upstream pin line, relaxed pin line)
PIN_RELAXATIONS = {
    "5.0.0": ('"tokenizers": "tokenizers>=0.22.0,<=0.23.0",', '"tokenizers": "tokenizers>=0.22.0,<=0.23.1",'),
    "5.2.0": ('"tokenizers": "tokenizers>=0.22.0,<=0.23.0",', '"tokenizers": "tokenizers>=0.22.0,<=0.23.1",'),
}


def git(git_dir, *args):
    return subprocess.run(["git", "--git-dir", git_dir, *args], check=True, capture_output=True, text=True).stdout


def extract(git_dir, tag, paths, dest):
    if os.path.exists(dest):
        shutil.rmtree(dest)
    os.makedirs(dest)
    archive = subprocess.run(["git", "--git-dir", git_dir, "archive", tag, *paths], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return git(git_dir, "rev-list", "-n1", tag).strip()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transformers-git", required=True, help="bare git dir of a transformers clone with release tags")
    p.add_argument("--hub-git", required=True, help="bare git dir of a huggingface_hub clone with release tags")
    p.add_argument("--tokenizers-from", required=True,
                   help="a dist-packages dir holding Debian's tokenizers/ and tokenizers-*.dist-info")
    p.add_argument("--out", default="/var/cache/opensci-src")
    p.add_argument("--versions", nargs="+", default=list(TRANSFORMERS))
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    if out == repo or out.startswith(repo + os.sep):
        raise SystemExit(f"{out} is inside the repository; fetched code must stay outside it")
    os.makedirs(out, exist_ok=True)
    exports = {}

    for v in args.versions:
        dest = os.path.join(out, f"transformers-{v}")
        commit = extract(args.transformers_git, f"v{v}", ["src", "setup.py"], dest)
        note = (f"transformers v{v} extracted with: git --git-dir={args.transformers_git} archive v{v} src setup.py "
                f"| tar -x (commit {commit}).\n")
        if v in PIN_RELAXATIONS:
            table = os.path.join(dest, "src", "transformers", "dependency_versions_table.py")
            before, after = PIN_RELAXATIONS[v]
            text = open(table, encoding="utf-8").read()
            if text.count(before) != 1:
                raise SystemExit(f"{table}: expected the pin line {before!r} exactly once")
            open(table, "w", encoding="utf-8").write(text.replace(before, after))
            note += (f"ONE local change: src/transformers/dependency_versions_table.py {before} -> {after}: the only "
                     "tokenizers available offline is Debian's 0.23.1, transformers imports tokenizers unconditionally "
                     "(integrations/ggml.py on the AutoConfig path) and checks the pin at import. Debian relaxes the same "
                     "pin in its python3-transformers 5.12.1. Nothing else is changed; captures never tokenize.\n")
        else:
            note += "No local changes.\n"
        open(os.path.join(dest, "OPENSCI-LOCAL-CHANGES"), "w").write(note)
        major, minor = v.split(".")[:2]
        exports[f"OPENSCI_TRANSFORMERS_SRC_{major}_{minor}"] = dest
        print(f"transformers {v}: {dest} (commit {commit[:12]}){' [pin relaxed]' if v in PIN_RELAXATIONS else ''}")

    hub_root = os.path.join(out, f"huggingface_hub-{HUB}")
    commit = extract(args.hub_git, f"v{HUB}", ["src"], hub_root)
    info = os.path.join(hub_root, "src", f"huggingface_hub-{HUB}.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write(f"Metadata-Version: 2.1\nName: huggingface_hub\nVersion: {HUB}\n"
                f"Summary: extracted from git tag v{HUB} (commit {commit}) of huggingface_hub (src/ only) by opensci-compat\n")
    open(os.path.join(info, "top_level.txt"), "w").write("huggingface_hub\n")
    exports["OPENSCI_HF_HUB_SRC_0_36"] = os.path.join(hub_root, "src")
    print(f"huggingface_hub {HUB}: {hub_root}/src (commit {commit[:12]})")

    infos = glob.glob(os.path.join(args.tokenizers_from, "tokenizers-*.dist-info"))
    if len(infos) != 1 or not os.path.isdir(os.path.join(args.tokenizers_from, "tokenizers")):
        raise SystemExit(f"{args.tokenizers_from}: expected tokenizers/ and one tokenizers-*.dist-info")
    tok_version = os.path.basename(infos[0])[len("tokenizers-"):-len(".dist-info")]
    for suffix, with_meta in (("debian", True), ("debian-nometadata", False)):
        dest = os.path.join(out, f"tokenizers-{tok_version}-{suffix}")
        if os.path.exists(dest):
            shutil.rmtree(dest)
        shutil.copytree(os.path.join(args.tokenizers_from, "tokenizers"), os.path.join(dest, "tokenizers"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        if with_meta:
            shutil.copytree(infos[0], os.path.join(dest, os.path.basename(infos[0])))
        open(os.path.join(dest, "README"), "w").write(
            f"Debian python3-tokenizers {tok_version} copied from {args.tokenizers_from} by "
            f"harness/python/overlay_sources.py, {'with' if with_meta else 'WITHOUT'} its dist-info metadata. "
            "Needs libonig5 in the base environment.\n")
        exports["OPENSCI_TOKENIZERS_DEBIAN" + ("" if with_meta else "_NOMETA")] = dest
        print(f"tokenizers {tok_version} ({suffix}): {dest}")

    print()
    for k, v in sorted(exports.items()):
        print(f"export {k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
