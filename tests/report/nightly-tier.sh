#!/usr/bin/env bash
# `report` on a build without the nightly tier: the nightly cells (which no CTest test could have
# run) are left out of the grid and counted in its header, not shown as Not Run; with --nightly
# they are declared cells like the others. Fails unless declared(without) + left out ==
# declared(with --nightly), with a nonzero number left out.
#   nightly-tier.sh CLI MATRIX WORKDIR
set -euo pipefail
cli=$1 matrix=$2 work=$3
rm -rf -- "$work" && mkdir -p "$work/results"
out=$("$cli" report --results "$work/results" --matrix "$matrix" --color never)
without=${out%%$'\n'*}
out=$("$cli" report --results "$work/results" --matrix "$matrix" --nightly --color never)
with=${out%%$'\n'*}
echo "without --nightly: $without"
echo "with --nightly:    $with"
d1=$(sed -n 's/.* \([0-9][0-9]*\) cells declared.*/\1/p' <<<"$without")
left=$(sed -n 's/.*(\([0-9][0-9]*\) cells of tier nightly not in this run left out.*/\1/p' <<<"$without")
d2=$(sed -n 's/.* \([0-9][0-9]*\) cells declared.*/\1/p' <<<"$with")
if [ -z "$d1" ] || [ -z "$left" ] || [ -z "$d2" ] || [ "$left" -eq 0 ] || [ $((d1 + left)) -ne "$d2" ] ||
  grep -q "tier nightly" <<<"$with"; then
  echo "FAIL: expected N declared + M (> 0) nightly left out without --nightly, N + M declared with it"
  exit 1
fi
echo "ok: $d1 declared + $left nightly left out = $d2 with --nightly"
