#!/usr/bin/env bash
# Two `ctest -j2` runs started at once on ONE environment cache: each environment is built
# exactly once (the other run waits on its lock and reuses it) and both runs pass.
#
#   scripts/ci/concurrent-ctest.sh BUILD_DIR [ENV...]      (default envs: tf-4.50 tf-5.24)
#
# The cache is fresh (a temp dir), so the environments really are built here; it borrows the
# base rootfs of the real cache (a symlink: the base is what takes minutes) and its uv binary.
# Exit 0 = both passed and every environment was built once; 1 = not; 77 = cannot run here
# (no ready base rootfs / uv in the real cache: provision a uv environment first).
set -euo pipefail
build=$(cd "${1:?usage: concurrent-ctest.sh BUILD_DIR [ENV...]}" && pwd)
shift
envs=("$@")
((${#envs[@]})) || envs=(tf-4.50 tf-5.24)
cli="$build/harness/opensci-compat"
matrix="$(cd "$(dirname "$0")/../.." && pwd)/matrix/matrix.json"
real_cache=${OPENSCI_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/opensci-compat}

# The base rootfs the release line uses, and uv, from the real cache.
base_spec=$(python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["_release_line"]["spec"]["base"]))' "$matrix")
base_dir=$("$cli" env status --spec "$base_spec" | awk '/^cache entry: / {print $3}')
if [ ! -f "$base_dir/READY" ]; then
  echo "concurrent-ctest: SKIPPED: the base rootfs $base_dir is not provisioned (run: $cli env provision --spec '$base_spec')"
  exit 77
fi
uv=""
for d in "$real_cache"/tools/uv-*/; do
  if [ -f "$d/READY" ] && [ -x "$d/venv/bin/uv" ]; then uv="$d/venv/bin/uv"; fi
done
if [ -z "$uv" ]; then
  echo "concurrent-ctest: SKIPPED: no uv in $real_cache/tools (provisioning any uv environment fetches it)"
  exit 77
fi

work=$(mktemp -d /tmp/opensci-concurrent-XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/cache/envs"
ln -s "$base_dir" "$work/cache/envs/$(basename "$base_dir")"
export OPENSCI_CACHE_DIR="$work/cache" OPENSCI_UV="$uv"

regex="^cell/($(IFS='|'; echo "${envs[*]}"))/opensci-ref/"
for run in a b; do
  mkdir -p "$work/$run"
  "$cli" matrix ctest --matrix "$matrix" --cli "$cli" --work "$work/$run/matrix" --out "$work/$run/cells.cmake" >/dev/null
  echo "include(\"$work/$run/cells.cmake\")" >"$work/$run/CTestTestfile.cmake"
done
echo "concurrent-ctest: two 'ctest -j2 -R $regex' runs at once, fresh cache $work/cache"
t0=$(date +%s)
ctest --test-dir "$work/a" -j2 -R "$regex" --output-on-failure >"$work/a.log" 2>&1 &
pa=$!
ctest --test-dir "$work/b" -j2 -R "$regex" --output-on-failure >"$work/b.log" 2>&1 &
pb=$!
sa=0
sb=0
wait $pa || sa=$?
wait $pb || sb=$?
echo "concurrent-ctest: runs took $(($(date +%s) - t0)) s; exit codes $sa and $sb"

status=0
for run in a b; do
  line=$(grep -E "tests passed|tests failed out of" "$work/$run.log" || true)
  echo "  run $run: ${line:-no summary}"
done
if ((sa != 0 || sb != 0)); then
  status=1
  for run in a b; do
    echo "=== run $run ==="
    cat "$work/$run.log"
  done
fi
# Each build prints "[env <id>] +Ns stage N: uv venv"; a run that found the entry being built
# waits on its lock and prints "... was provisioned by another process meanwhile" instead.
builds=$(cat "$work/a/Testing/Temporary/LastTest.log" "$work/b/Testing/Temporary/LastTest.log" |
  awk '/stage [0-9]+: uv venv/ { n[$1 " " $2]++ } END { for (k in n) print n[k], k }')
echo "$builds" | sed 's/^/  built /'
distinct=$(echo "$builds" | awk 'NF { c++ } END { print c + 0 }')
twice=$(echo "$builds" | awk '$1 != 1 { c++ } END { print c + 0 }')
waited=$(cat "$work/a.log" "$work/b.log" "$work/a/Testing/Temporary/LastTest.log" "$work/b/Testing/Temporary/LastTest.log" |
  awk '/provisioned by another process meanwhile|waiting for another provisioning/ { c++ } END { print c + 0 }')
echo "  lock waits seen: $waited"
if ((distinct != ${#envs[@]} || twice != 0)); then
  echo "concurrent-ctest: expected each of the ${#envs[@]} environments built exactly once" >&2
  status=1
fi
ready=$(find "$work/cache/envs" -maxdepth 2 -name READY -path "*transformers*" | wc -l)
echo "  READY environments in the fresh cache: $ready (expected ${#envs[@]})"
if ((ready != ${#envs[@]})); then status=1; fi
if ((status == 0)); then echo "concurrent-ctest: PASSED"; else echo "concurrent-ctest: FAILED"; fi
exit $status
