#!/usr/bin/env bash
# Builds opensci-compat, runs the default compatibility matrix (real transformers 5.12.1 in a
# cached Debian sid environment, and the golden replays of other versions, against the C++
# reference) and prints the table of cells. The whole release line (every transformers minor
# from the index) is scripts/test.sh's.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${OPENSCI_BUILD_DIR:-build}
jobs=${OPENSCI_JOBS:-$(nproc)}

bash scripts/install-deps.sh
# The same configuration as scripts/test.sh, so that the second README command reuses this build.
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DOPENSCI_WARNINGS_AS_ERRORS=ON -DOPENSCI_WITH_LIBTORCH=ON \
  -DOPENSCI_WITH_MPI=ON
cmake --build "$build" -j "$jobs"
# The grid and the tally read build/matrix/results: start it empty, so that a result of an
# earlier run (another tier, a cell since removed, a cell this run did not reach) is never
# reported, or counted as run, as this run's.
rm -rf -- "$build/matrix/results"
# The default environment and the replays (their toy / patch / env fixtures come along).
ctest --test-dir "$build" -L matrix -R '^(cell|capture)/(debian-sid|golden-[^/]*)/' -j "$jobs" --timeout 3600 || true
rc=0
"$build/harness/opensci-compat" report --results "$build/matrix/results" \
  --markdown "$build/matrix/report.md" --html "$build/matrix/report.html" || rc=$?
echo
echo "quickstart: ran the debian-sid environment (Debian's transformers 5.12.1, torch 2.14.1) and the golden"
echo "replays; the other columns of the grid are Not Run here. 'bash scripts/test.sh' runs every transformers"
echo "release 4.48 ... 5.24 from the index (the CI tier); build/matrix/report.html has the per-layer plots."
exit $rc
