#!/usr/bin/env bash
# scripts/ci/check-format.sh on a scratch repository: a change with an unformatted line fails and
# names the file; a formatted change passes; unformatted code the change does not touch passes.
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
repo=$(mktemp -d /tmp/opensci-format-XXXXXX)
trap 'rm -rf "$repo"' EXIT
cd "$repo"
git init -q -b main
git config user.email t@example.org
git config user.name test
cp "$src/.clang-format" .
printf 'int   old_unformatted( int a ){return a;}\n' >old.cpp   # predates the check
printf 'int ok(int a) { return a; }\n' >a.cpp
git add . && git commit -qm base
base=$(git rev-parse HEAD)
fails=0
expect() {  # expect <exit status> <description> [pattern]
  local want=$1 what=$2 pattern=${3:-} out rc=0
  out=$(OPENSCI_FORMAT_REPO="$repo" bash "$src/scripts/ci/check-format.sh" "$base" 2>&1) || rc=$?
  if [ "$rc" -eq "$want" ] && [[ -z $pattern || $out == *"$pattern"* ]]; then
    echo "ok   $what (exit $rc)"
  else
    echo "FAIL $what: exit $rc, expected $want${pattern:+ and '$pattern'}"
    echo "$out" | sed 's/^/    /'
    fails=$((fails + 1))
  fi
}
expect 0 "no change"
printf 'int b(int x){\n  return x*2;}\n' >b.cpp
git add b.cpp && git commit -qm "unformatted"
expect 1 "an unformatted new file fails, naming it" "b/b.cpp"
printf 'int b(int x) { return x * 2; }\n' >b.cpp
git commit -qam "formatted"
expect 0 "the formatted change passes (old.cpp untouched, unformatted, is not checked)"
printf 'int ok(int a) { return a; }\nint   c( ){return 1;}\n' >a.cpp
expect 1 "an unformatted line added to a formatted file fails (uncommitted too)" "a/a.cpp"
echo "$fails failed checks"
exit $((fails > 0))
