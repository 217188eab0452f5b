#!/usr/bin/env bash
# The merge request's format check: clang-format (the repository's .clang-format) over the C++
# and CUDA lines the change touches, compared with its merge base. Code the change does not touch
# is not part of the check (the tree predates it); every line a change adds must be formatted.
#
#   scripts/ci/check-format.sh [BASE]
#
# BASE: a commit; default $CI_MERGE_REQUEST_DIFF_BASE_SHA, else the merge base of HEAD with
# origin/main or main. OPENSCI_FORMAT_REPO: the repository to check (default: this one).
# Exit 0: formatted; 1: not (the diff that fixes it is printed); 2: cannot check.
set -euo pipefail
repo=${OPENSCI_FORMAT_REPO:-$(cd "$(dirname "$0")/../.." && pwd)}
cd "$repo"
if ! command -v git-clang-format >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "check-format: installing clang-format"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends clang-format >/dev/null ||
      { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends clang-format >/dev/null; }
  fi
fi
if ! command -v git-clang-format >/dev/null 2>&1; then
  echo "check-format: git-clang-format not found (Debian: apt-get install clang-format)" >&2
  exit 2
fi
base=${1:-${CI_MERGE_REQUEST_DIFF_BASE_SHA:-}}
if [ -z "$base" ]; then
  for ref in origin/main main; do
    if git rev-parse -q --verify "$ref^{commit}" >/dev/null; then
      base=$(git merge-base HEAD "$ref")
      break
    fi
  done
fi
if [ -z "$base" ] || ! git rev-parse -q --verify "$base^{commit}" >/dev/null; then
  echo "check-format: no base commit to compare with ('${base}'); give one: check-format.sh BASE" >&2
  exit 2
fi
extensions=c,cc,cpp,cxx,h,hh,hpp,cu,cuh
changed=$(git diff --name-only --diff-filter=ACMR "$base" -- | awk -F. -v ext=",$extensions," 'index(ext, "," $NF ",")' | wc -l)
out=$(git clang-format --diff --extensions "$extensions" "$base" -- 2>&1) || true
if [[ $out == *"diff --git"* ]]; then
  echo "$out"
  echo
  echo "check-format: FAILED: lines changed since $(git rev-parse --short "$base") are not formatted as .clang-format says."
  echo "  Fix: git clang-format --extensions $extensions $(git rev-parse --short "$base")"
  exit 1
fi
echo "check-format: ok: $changed C++/CUDA file(s) changed since $(git rev-parse --short "$base"), their changed lines formatted ($(clang-format --version))"
