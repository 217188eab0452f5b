#!/usr/bin/env bash
# Builds opensci-compat, runs the default compatibility matrix (real transformers 5.12.1 in a
# cached Debian sid environment against the C++ reference) and prints the table of cells.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${OPENSCI_BUILD_DIR:-build}
jobs=${OPENSCI_JOBS:-$(nproc)}

bash scripts/install-deps.sh
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DOPENSCI_WITH_LIBTORCH=ON
cmake --build "$build" -j "$jobs"
ctest --test-dir "$build" -L matrix -j "$jobs" --timeout 3600 || true
exec "$build/harness/opensci-compat" report --results "$build/matrix/results" \
  --markdown "$build/matrix/report.md" --html "$build/matrix/report.html"
