#!/usr/bin/env bash
# Installs what opensci-compat needs on Debian 12 (run as root). Idempotent: only missing
# packages are installed. GPU toolchains (nvcc, hipcc) are optional: see scripts/ci/.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  libfmt-dev nlohmann-json3-dev libcli11-dev catch2 libbenchmark-dev
  libopenblas-dev libopenblas-openmp-dev   # one OpenMP pool for BLAS and our ops (see CMakeLists.txt)
  debootstrap        # builds the Debian sid environment (real transformers 5.12.1 + torch)
  util-linux         # unshare: private mount namespaces for the rootfs environment
  python3            # the 'system' environment provider's tests
  python3-venv python3-pip  # uv comes from the index: a venv of python3 + `pip install uv` (<cache>/tools)
  libtorch-dev       # the libtorch backend: torch numerics without transformers (backends/libtorch)
  libcurl4-openssl-dev libssl-dev  # `opensci-compat download`: the Hub client (harness/src/hub.cpp), sha256
  libopenmpi-dev openmpi-bin   # MPI ranks of the sharded (sp/ep) reference forward (parallel/)
)

missing=()
for p in "${packages[@]}"; do
  # No `dpkg-query | grep -q` here: under pipefail grep's early exit can fail the pipeline.
  [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps: need root to install packages: ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q -o Acquire::Retries=3
  apt-get install -y -q -o Acquire::Retries=3 --no-install-recommends "${missing[@]}"
else
  echo "install-deps: all build dependencies present"
fi
