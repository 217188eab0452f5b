#!/usr/bin/env bash
# A CI job's report (after_script): the grid and table in the log, report.md / report.html and
# per-layer plots next to the cell results. Never fails the job: the test step decides that.
#   scripts/ci/report.sh BUILD_DIR
set -uo pipefail
build=${1:?usage: report.sh BUILD_DIR}
cli="$build/harness/opensci-compat"
if [ ! -x "$cli" ]; then
  echo "report: no $cli (the build did not finish): no report"
  exit 0
fi
nightly=()  # a -DOPENSCI_NIGHTLY=ON build ran the nightly cells: those without a result are Not Run
grep -qx "OPENSCI_NIGHTLY:BOOL=ON" "$build/CMakeCache.txt" 2>/dev/null && nightly=(--nightly)
"$cli" report --results "$build/matrix/results" "${nightly[@]}" --markdown "$build/matrix/report.md" \
  --html "$build/matrix/report.html" --png-dir "$build/matrix/plots" --color never
echo "report: $build/matrix/report.html, $build/matrix/report.md (report exit $?)"
exit 0
