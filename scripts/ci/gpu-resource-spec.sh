#!/usr/bin/env bash
# Writes a CTest resource spec file listing this machine's GPUs, one slot each, for
#   ctest --resource-spec-file FILE -j N     (tests with RESOURCE_GROUPS gpus:1 get a GPU each)
#
#   scripts/ci/gpu-resource-spec.sh OUT.json
#
# The GPU count: $OPENSCI_GPU_COUNT if set, else nvidia-smi -L, else rocm-smi --showid. The ids
# are runtime device ordinals 0..N-1, i.e. after CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES (a
# runner that hides GPUs should count the visible ones: set OPENSCI_GPU_COUNT). Exits 1 when no
# GPU is found: a GPU job without GPUs must not pass by running nothing.
set -euo pipefail
out=${1:?usage: gpu-resource-spec.sh OUT.json}
count=${OPENSCI_GPU_COUNT:-}
source_of_count="OPENSCI_GPU_COUNT"
if [ -z "$count" ] && command -v nvidia-smi >/dev/null 2>&1; then
  listing=$(nvidia-smi -L 2>/dev/null || true)
  count=$(awk '/^GPU [0-9]+:/ { n++ } END { print n + 0 }' <<<"$listing")
  source_of_count="nvidia-smi -L"
fi
if { [ -z "$count" ] || [ "$count" = 0 ]; } && command -v rocm-smi >/dev/null 2>&1; then
  listing=$(rocm-smi --showid 2>/dev/null || true)
  count=$(awk '/^GPU\[[0-9]+\]/ { split($1, a, /[][]/); seen[a[2]] = 1 } END { n = 0; for (k in seen) n++; print n }' <<<"$listing")
  source_of_count="rocm-smi --showid"
fi
if ! [[ ${count:-} =~ ^[0-9]+$ ]] || [ "$count" -eq 0 ]; then
  echo "gpu-resource-spec: no GPU found (${source_of_count}: '${count:-none}'); set OPENSCI_GPU_COUNT" >&2
  exit 1
fi
{
  printf '{\n  "version": {"major": 1, "minor": 0},\n  "local": [{"gpus": ['
  for ((i = 0; i < count; i++)); do
    printf '%s{"id": "%d", "slots": 1}' "$([ $i -gt 0 ] && echo ', ')" "$i"
  done
  printf ']}]\n}\n'
} >"$out"
echo "gpu-resource-spec: $count GPU(s) ($source_of_count) -> $out"
