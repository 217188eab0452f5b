#!/usr/bin/env bash
# The test suite: installs what is missing, builds with warnings as errors, runs every CTest
# test (unit tests, the compatibility matrix with real transformers in the Debian sid
# environment, MoE converter cells, GPU compile checks). CI (.ci/run) runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${OPENSCI_BUILD_DIR:-build}
jobs=${OPENSCI_JOBS:-$(nproc)}

# Wall time of each phase, printed at the end (where a slow run spends its time).
phases=()
phase_start=$SECONDS
phase() { phases+=("$1 $((SECONDS - phase_start))s"); phase_start=$SECONDS; }
# The capture workers (one warm python per environment) outlive ctest; stop them when we leave.
stop_workers() {
  [ -x "$build/harness/opensci-compat" ] && "$build/harness/opensci-compat" env workers --stop >/dev/null 2>&1 || true
}
trap stop_workers EXIT

bash scripts/install-deps.sh
phase deps
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DOPENSCI_WARNINGS_AS_ERRORS=ON -DOPENSCI_WITH_LIBTORCH=ON \
  -DOPENSCI_WITH_MPI=ON
cmake --build "$build" -j "$jobs"
phase build

# Guard: a suite that collects no tests, or no matrix cells, must not look green.
total=$(ctest --test-dir "$build" -N | sed -n 's/^Total Tests: //p')
cells=$(ctest --test-dir "$build" -N -L cell | sed -n 's/^Total Tests: //p')
echo "collected ${total:-0} tests, ${cells:-0} matrix cells"
if [ "${total:-0}" -eq 0 ] || [ "${cells:-0}" -eq 0 ]; then
  echo "error: no tests or no matrix cells collected" >&2
  exit 1
fi

status=0
problems=()
# GPU backends: CUDA and HIP compile-and-link checks (no device here: their tests must report
# Not Run), and the same kernels executed on the host-thread emulator.
if bash scripts/ci/compile-check-gpu.sh cuda hip emulation; then
  gpu_note="GPU compile checks ok"
else
  status=1
  problems+=("GPU compile checks failed (see '=== GPU compile checks' above)")
  gpu_note="GPU compile checks FAILED"
fi
phase gpu-compile-checks

# The grid and the tally read build/matrix/results: start it empty, so that a result of an
# earlier run (another tier, a cell since removed, a cell this run did not reach) is never
# reported, or counted as run, as this run's.
rm -rf -- "$build/matrix/results"
set +e
ctest --test-dir "$build" --output-on-failure -j "$jobs" --timeout 3600 --output-junit junit.xml 2>&1 | tee "$build/ctest.log"
ctest_status=${PIPESTATUS[0]}
set -e
phase ctest
ctest_line=$(grep -E "tests passed|tests failed out of" "$build/ctest.log" | tail -1 || true)
if ((ctest_status != 0)); then
  status=1
  problems+=("ctest exited $ctest_status: ${ctest_line:-no summary}")
fi
# Ran, not just collected: how many cells ran live, replayed a golden, or were Not Run and why.
# Fails when nothing ran live or a cell of an environment the matrix requires did not run.
tally_status=0
nightly_flag=()  # a build configured with -DOPENSCI_NIGHTLY=ON ran the nightly cells too
grep -qx "OPENSCI_NIGHTLY:BOOL=ON" "$build/CMakeCache.txt" && nightly_flag=(--nightly)
tally=$("$build/harness/opensci-compat" matrix tally --matrix matrix/matrix.json --work "$build/matrix" "${nightly_flag[@]}") ||
  tally_status=$?
echo "$tally"
tally_line=$(head -n 1 <<<"$tally")
if ((tally_status != 0)); then
  status=1
  problems+=("${tally_line:-matrix tally failed}: see the FAIL lines above")
fi
# The matrix as a table (cells that ran, failed or were not run, with their reasons).
"$build/harness/opensci-compat" report --results "$build/matrix/results" "${nightly_flag[@]}" \
  --markdown "$build/matrix/report.md" --html "$build/matrix/report.html" || true

phase report
stop_workers

# The overall verdict is the last line printed, whatever failed.
echo
echo "test.sh: wall time by phase: ${phases[*]} (total ${SECONDS}s)"
if ((status == 0)); then
  echo "test.sh: PASSED — ctest: ${ctest_line:-?}; ${tally_line#matrix tally: }; $gpu_note"
else
  echo "test.sh: FAILED — $(IFS=';'; echo "${problems[*]}")"
fi
exit $status
