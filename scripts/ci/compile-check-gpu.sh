#!/usr/bin/env bash
# GPU compile-and-link checks (issue 5): builds the kernels, the GPU forward, the GPU tests, the
# GPU benchmark and the CLI for each variant, with warnings as errors, and says what it checked.
# Exits non-zero when a variant fails to configure, compile or link (a kernel that no longer
# compiles fails here), or when a requested toolchain is missing and cannot be installed.
#
#   scripts/ci/compile-check-gpu.sh [cuda] [hip] [emulation]     (default: all three)
#
#   cuda       nvcc (CUDAToolkit: $CUDACXX, /usr/local/cuda/bin/nvcc or PATH; Debian's
#              nvidia-cuda-toolkit from non-free if apt has it), architectures
#              $OPENSCI_CUDA_ARCHITECTURES (default 80;90), GEMM cuBLAS; with NCCL (nccl.h and
#              libnccl beside the toolkit) also the NCCL communicator of the sharded forward
#              (parallel/, OPENSCI_WITH_NCCL, bootstrapped over MPI) and its test.
#   hip        hipcc (Debian: hipcc libamdhip64-dev, installed when missing), targets
#              $OPENSCI_HIP_ARCHITECTURES (default gfx90a;gfx942; those this hipcc cannot target
#              are dropped with a CMake warning), GEMM rocBLAS when found, else the tiled kernel;
#              the RCCL communicator when apt has librccl-dev (Debian 12 does not: said so).
#   emulation  the same kernel sources on the host-thread device, and their tests RUN: the only
#              variant whose kernels execute on a machine without a GPU.
# Without a device the cuda/hip test executables are run too and must all report "not run"
# (exit 77 with the runtime's reason), never "passed".
#
# Environment: OPENSCI_JOBS (default: nproc), OPENSCI_BUILD_DIR_{CUDA,HIP,EMU} (default
# build-cuda, build-hip, build-emu), OPENSCI_EMU_ALL_TOYS=1: the emulated GPU forward on every toy.
# By default the emulated forward runs on one toy per kernel path (opensci-ref-theta: MHA, qk-norm,
# tied, head_dim != hidden/heads; opensci-qwen3: GQA, untied; qwen3-moe: MoE routing) and says which
# it left out: the others exercise the same kernels (the published variants are opensci-ref's
# architecture) and cost ~6 of the ~10 serial minutes on 2 cores; every op test always runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
jobs=${OPENSCI_JOBS:-$(nproc)}
variants=("$@")
((${#variants[@]})) || variants=(cuda hip emulation)

gpu_targets=(opensci_gpu test_gpu_embedding test_gpu_rms_norm test_gpu_rope test_gpu_attention test_gpu_swiglu
             test_gpu_elementwise test_gpu_gemm test_gpu_moe test_gpu_forward opensci-bench-gpu-forward)
# The CLI with the GPU backend linked in (the whole harness again, minutes on 2 cores): built in
# the CUDA variant, where GPU runners use it; the HIP and emulated variants check the kernels, their
# tests and benchmark (the ROCm nightly job builds the HIP CLI on its runner).
declare -A summary=() extra_targets=([cuda]="opensci-compat")
status=0

# Package checks without `cmd | grep -q` (under pipefail grep's early exit kills the writer with
# SIGPIPE and the pipeline reports failure even on a match).
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
has_candidate() {
  local policy
  policy=$(apt-cache policy "$1" 2>/dev/null) || return 1
  [[ $policy =~ Candidate:\ [0-9] ]]
}
apt_log=$(mktemp /tmp/compile-check-gpu-apt.XXXXXX)
trap 'rm -f "$apt_log"' EXIT
apt_updated=0
apt_refresh() {  # apt-get update once per run (a fresh machine may have no package lists at all)
  ((apt_updated)) && return 0
  apt_updated=1
  if ! apt-get update -q -o Acquire::Retries=3 >"$apt_log" 2>&1; then
    echo "compile-check-gpu: apt-get update failed:" >&2
    tail -15 "$apt_log" | sed 's/^/    /' >&2
    return 1
  fi
}
# apt_install PKG...: installs the missing ones; on failure prints apt's own message, which
# names the package ("E: Unable to locate package ..."), and returns 1. Sets apt_error.
apt_error=""
apt_install() {
  local missing=() p
  for p in "$@"; do installed "$p" || missing+=("$p"); done
  ((${#missing[@]})) || return 0
  if [ "$(id -u)" != 0 ]; then
    apt_error="need root to install ${missing[*]}"
    echo "compile-check-gpu: $apt_error" >&2
    return 1
  fi
  echo "compile-check-gpu: installing ${missing[*]}"
  apt_refresh || { apt_error="apt-get update failed (see above)"; return 1; }
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o Acquire::Retries=3 --no-install-recommends \
      "${missing[@]}" >"$apt_log" 2>&1; then
    apt_error="apt-get could not install ${missing[*]}: $(grep -E '^E: ' "$apt_log" | tr '\n' ' ')"
    echo "compile-check-gpu: apt-get install ${missing[*]} failed:" >&2
    tail -15 "$apt_log" | sed 's/^/    /' >&2
    return 1
  fi
}
# apt_install_optional PKG...: installs those apt has a candidate for; says which it has not.
apt_install_optional() {
  local p
  for p in "$@"; do
    installed "$p" && continue
    [ "$(id -u)" = 0 ] && apt_refresh || true
    if has_candidate "$p"; then
      apt_install "$p" || echo "compile-check-gpu: optional $p could not be installed: $apt_error"
    else
      echo "compile-check-gpu: optional package $p is not available from apt here (built without it)"
    fi
  done
}

# Every GPU test must have been skipped (no device) or passed (a device); prints the tally.
check_tests() {
  local dir=$1 label=$2 out
  shift 2
  out=$(ctest --test-dir "$dir" -L "$label" --timeout 1800 -j "$jobs" "$@" 2>&1) || true
  local total passed skipped
  total=$(sed -n 's/.*tests failed out of \([0-9]*\).*/\1/p' <<<"$out")
  passed=$(grep -cE "Test +#[0-9]+: .* Passed" <<<"$out" || true)
  skipped=$(grep -cE "Test +#[0-9]+: .*(\*\*\*Skipped|Not Run)" <<<"$out" || true)
  # awk reads all of its input (no early exit, no SIGPIPE for the writer under pipefail).
  awk '/Test +#[0-9]+:/ && n++ < 40 { sub(/^ *[0-9]*\/[0-9]* /, "    "); print }' <<<"$out"
  if [ -z "$total" ] || [ "$total" -eq 0 ]; then
    echo "compile-check-gpu: no '$label' tests collected in $dir" >&2
    return 1
  fi
  if ((passed + skipped != total)); then
    echo "compile-check-gpu: '$label' tests in $dir: $passed passed, $skipped not run, of $total: some failed" >&2
    return 1
  fi
  echo "  tests ($label): $total collected, $passed passed, $skipped not run (no device: exit 77)"
}

build_variant() {
  local name=$1 dir=$2
  shift 2
  echo "=== $name: configure $dir"
  if ! cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DOPENSCI_WARNINGS_AS_ERRORS=ON \
      -DOPENSCI_BUILD_TESTS=ON -DOPENSCI_BUILD_BENCH=ON "$@" >"$dir.configure.log" 2>&1; then
    tail -30 "$dir.configure.log" >&2
    summary[$name]="FAILED to configure (see $dir.configure.log)"
    return 1
  fi
  grep -E "opensci kernels:|CMake Warning" -A1 "$dir.configure.log" | sed 's/^/  /' || true
  local targets=("${gpu_targets[@]}")
  # shellcheck disable=SC2206
  [ -n "${extra_targets[$name]:-}" ] && targets+=(${extra_targets[$name]})
  echo "=== $name: build ${targets[*]}"
  if ! cmake --build "$dir" -j "$jobs" --target "${targets[@]}"; then
    summary[$name]="FAILED to compile or link (output above)"
    return 1
  fi
}

for variant in "${variants[@]}"; do
  case $variant in
    cuda)
      nvcc=${CUDACXX:-}
      [ -n "$nvcc" ] || { [ -x /usr/local/cuda/bin/nvcc ] && nvcc=/usr/local/cuda/bin/nvcc; } || true
      [ -n "$nvcc" ] || nvcc=$(command -v nvcc || true)
      if [ -z "$nvcc" ]; then
        apt_install_optional nvidia-cuda-toolkit  # Debian non-free; CI images bring /usr/local/cuda
        nvcc=$(command -v nvcc || true)
      fi
      if [ -z "$nvcc" ]; then
        echo "compile-check-gpu: no nvcc (set CUDACXX, install the CUDA toolkit in /usr/local/cuda, or enable non-free for nvidia-cuda-toolkit)" >&2
        summary[cuda]="NOT CHECKED: no nvcc"
        status=1
        continue
      fi
      version=$("$nvcc" --version | sed -n 's/.*release [0-9.]*, V\([0-9.]*\).*/\1/p')
      dir=${OPENSCI_BUILD_DIR_CUDA:-build-cuda}
      archs=${OPENSCI_CUDA_ARCHITECTURES:-80;90}
      # NCCL for the sharded forward's GPU ranks (needs MPI for its bootstrap: install-deps.sh).
      cuda_root=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
      nccl_flags=() nccl_note="no NCCL (nccl.h not beside $cuda_root): NCCL communicator not built"
      nccl_h=""
      for h in "$cuda_root/include/nccl.h" /usr/local/include/nccl.h /usr/include/nccl.h; do
        if [ -z "$nccl_h" ] && [ -f "$h" ]; then nccl_h=$h; fi
      done
      if [ -n "$nccl_h" ]; then
        nccl_v=$(awk '/^#define NCCL_(MAJOR|MINOR|PATCH) /{v = v (v ? "." : "") $3} END {print v}' "$nccl_h")
        nccl_flags=(-DOPENSCI_WITH_NCCL=ON -DOPENSCI_WITH_MPI=ON)
        extra_targets[cuda]+=" opensci_parallel test_nccl_communicator"
        nccl_note="NCCL $nccl_v communicator + its test"
      fi
      if build_variant cuda "$dir" -DOPENSCI_WITH_CUDA=ON -DCMAKE_CUDA_COMPILER="$nvcc" \
          "-DOPENSCI_CUDA_ARCHITECTURES=$archs" "${nccl_flags[@]}" && check_tests "$dir" cuda; then
        summary[cuda]="OK: nvcc $version ($nvcc), sm $archs, GEMM cuBLAS, $nccl_note; compiled and linked ${#gpu_targets[@]} targets"
      else
        summary[cuda]=${summary[cuda]:-"FAILED: tests"}
        status=1
      fi
      ;;
    hip)
      # Debian 12 ships hipcc 5.2 and the HIP runtime headers; rocBLAS is not packaged there (the
      # kernels then use their own tiled GEMM), so it is optional.
      if ! apt_install hipcc libamdhip64-dev libamd-comgr-dev libhsa-runtime-dev; then
        summary[hip]="NOT CHECKED: $apt_error"
        status=1
        continue
      fi
      apt_install_optional librocblas-dev
      rccl_flags=() rccl_note="RCCL: not packaged here (apt has no librccl-dev; Debian 12 ships none), RCCL communicator not built"
      if has_candidate librccl-dev && apt_install librccl-dev; then
        rccl_flags=(-DOPENSCI_WITH_RCCL=ON -DOPENSCI_WITH_MPI=ON)
        extra_targets[hip]="opensci_parallel test_nccl_communicator"
        rccl_note="RCCL communicator + its test"
      fi
      if ! command -v hipcc >/dev/null; then
        echo "compile-check-gpu: hipcc is installed as a package but not on PATH ($PATH)" >&2
        summary[hip]="NOT CHECKED: hipcc not on PATH"
        status=1
        continue
      fi
      # hipconfig, like hipcc, picks the nvidia platform when a CUDA toolkit is present.
      export HIP_PLATFORM=${HIP_PLATFORM:-amd}
      version=$(hipconfig --version 2>/dev/null | tail -1)
      clang=$(hipconfig --full 2>/dev/null || true)
      clang=$(awk '/clang version/ && !n++' <<<"$clang")
      dir=${OPENSCI_BUILD_DIR_HIP:-build-hip}
      archs=${OPENSCI_HIP_ARCHITECTURES:-gfx90a;gfx942}
      if build_variant hip "$dir" -DOPENSCI_WITH_HIP=ON "-DOPENSCI_HIP_ARCHITECTURES=$archs" "${rccl_flags[@]}" &&
          check_tests "$dir" rocm; then
        built=$(grep -m1 "opensci kernels: HIP" "$dir.configure.log" | sed 's/.*targets \([^,]*\), GEMM \(.*\)/targets \1, GEMM \2/')
        summary[hip]="OK: HIP $version ($clang), requested $archs, $built; $rccl_note; compiled and linked ${#gpu_targets[@]} targets"
      else
        summary[hip]=${summary[hip]:-"FAILED: tests"}
        status=1
      fi
      ;;
    emulation)
      dir=${OPENSCI_BUILD_DIR_EMU:-build-emu}
      emu_exclude=()
      if [ "${OPENSCI_EMU_ALL_TOYS:-0}" != 1 ]; then
        emu_exclude=(-E '^gpu/forward/(opensci-ref|opensci-ref-published|opensci-ref-published-tied|opensci-moe)$')
        echo "  emulated forward on opensci-ref-theta, opensci-qwen3, qwen3-moe; left out (same kernels):" \
             "opensci-ref, opensci-ref-published, opensci-ref-published-tied, opensci-moe (OPENSCI_EMU_ALL_TOYS=1 runs them)"
      fi
      if build_variant emulation "$dir" -DOPENSCI_GPU_EMULATION=ON && check_tests "$dir" gpu-emulated "${emu_exclude[@]}"; then
        cxx_version=$(c++ --version)
        summary[emulation]="OK: kernels built with ${cxx_version%%$'\n'*}, every gpu-emulated test RAN and passed"
      else
        summary[emulation]=${summary[emulation]:-"FAILED: tests (kernel logic)"}
        status=1
      fi
      ;;
    *)
      echo "compile-check-gpu: unknown variant '$variant' (cuda, hip, emulation)" >&2
      exit 2
      ;;
  esac
done

echo
echo "=== GPU compile checks"
for variant in "${variants[@]}"; do
  printf '  %-10s %s\n' "$variant" "${summary[$variant]:-not run}"
done
exit $status
