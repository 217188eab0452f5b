#!/usr/bin/env bash
# The test suite: installs what is missing, builds with warnings as errors, runs every CTest
# test (unit tests, the compatibility matrix with real transformers in the Debian sid
# environment, MoE converter cells, GPU compile checks). CI (.ci/run) runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${OPENSCI_BUILD_DIR:-build}
jobs=${OPENSCI_JOBS:-$(nproc)}

bash scripts/install-deps.sh
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DOPENSCI_WARNINGS_AS_ERRORS=ON -DOPENSCI_WITH_LIBTORCH=ON
cmake --build "$build" -j "$jobs"

# Guard: a suite that collects no tests, or no matrix cells, must not look green.
total=$(ctest --test-dir "$build" -N | sed -n 's/^Total Tests: //p')
cells=$(ctest --test-dir "$build" -N -L cell | sed -n 's/^Total Tests: //p')
echo "collected ${total:-0} tests, ${cells:-0} matrix cells"
if [ "${total:-0}" -eq 0 ] || [ "${cells:-0}" -eq 0 ]; then
  echo "error: no tests or no matrix cells collected" >&2
  exit 1
fi

status=0
# GPU backends: CUDA and HIP compile-and-link checks (no device here: their tests must report
# Not Run), and the same kernels executed on the host-thread emulator.
bash scripts/ci/compile-check-gpu.sh cuda hip emulation || status=1

set +e
ctest --test-dir "$build" --output-on-failure -j "$jobs" --timeout 3600 --output-junit junit.xml 2>&1 | tee "$build/ctest.log"
ctest_status=${PIPESTATUS[0]}
set -e
((ctest_status == 0)) || status=$ctest_status
# The matrix as a table (cells that ran, failed or were not run, with their reasons).
"$build/harness/opensci-compat" report --results "$build/matrix/results" \
  --markdown "$build/matrix/report.md" --html "$build/matrix/report.html" || true
# CTest's verdict last, so it is the closing summary of this run.
grep -E "tests passed|tests failed out of" "$build/ctest.log" | tail -1
exit $status
