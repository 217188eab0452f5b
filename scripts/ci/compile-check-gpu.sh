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
#              $OPENSCI_CUDA_ARCHITECTURES (default 80;90), GEMM cuBLAS.
#   hip        hipcc (Debian: hipcc libamdhip64-dev, installed when missing), targets
#              $OPENSCI_HIP_ARCHITECTURES (default gfx90a;gfx942; those this hipcc cannot target
#              are dropped with a CMake warning), GEMM rocBLAS when found, else the tiled kernel.
#   emulation  the same kernel sources on the host-thread device, and their tests RUN: the only
#              variant whose kernels execute on a machine without a GPU.
# Without a device the cuda/hip test executables are run too and must all report "not run"
# (exit 77 with the runtime's reason), never "passed".
#
# Environment: OPENSCI_JOBS (default: nproc), OPENSCI_BUILD_DIR_{CUDA,HIP,EMU} (default
# build-cuda, build-hip, build-emu).
set -euo pipefail
cd "$(dirname "$0")/../.."
jobs=${OPENSCI_JOBS:-$(nproc)}
variants=("$@")
((${#variants[@]})) || variants=(cuda hip emulation)

gpu_targets=(opensci_gpu test_gpu_embedding test_gpu_rms_norm test_gpu_rope test_gpu_attention test_gpu_swiglu
             test_gpu_elementwise test_gpu_gemm test_gpu_moe test_gpu_forward opensci-bench-gpu-forward opensci-compat)
declare -A summary=()
status=0

apt_install() {  # installs the packages that are missing and that apt knows
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" && continue
    if apt-cache policy "$p" 2>/dev/null | grep -q "Candidate: [0-9]"; then missing+=("$p"); fi
  done
  ((${#missing[@]})) || return 0
  echo "compile-check-gpu: installing ${missing[*]}"
  [ "$(id -u)" = 0 ] || { echo "compile-check-gpu: need root to install ${missing[*]}" >&2; return 1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

# Every GPU test must have been skipped (no device) or passed (a device); prints the tally.
check_tests() {
  local dir=$1 label=$2 out
  out=$(ctest --test-dir "$dir" -L "$label" --timeout 1800 2>&1) || true
  local total passed skipped
  total=$(sed -n 's/.*tests failed out of \([0-9]*\).*/\1/p' <<<"$out")
  passed=$(grep -cE "Test +#[0-9]+: .* Passed" <<<"$out" || true)
  skipped=$(grep -cE "Test +#[0-9]+: .*(\*\*\*Skipped|Not Run)" <<<"$out" || true)
  echo "$out" | grep -E "Test +#[0-9]+:" | sed 's/^ *[0-9]*\/[0-9]* /    /' | head -40
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
  echo "=== $name: build ${gpu_targets[*]}"
  if ! cmake --build "$dir" -j "$jobs" --target "${gpu_targets[@]}"; then
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
        apt_install nvidia-cuda-toolkit || true
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
      if build_variant cuda "$dir" -DOPENSCI_WITH_CUDA=ON -DCMAKE_CUDA_COMPILER="$nvcc" \
          "-DOPENSCI_CUDA_ARCHITECTURES=$archs" && check_tests "$dir" cuda; then
        summary[cuda]="OK: nvcc $version ($nvcc), sm $archs, GEMM cuBLAS; compiled and linked ${#gpu_targets[@]} targets"
      else
        summary[cuda]=${summary[cuda]:-"FAILED: tests"}
        status=1
      fi
      ;;
    hip)
      apt_install hipcc libamdhip64-dev libamd-comgr-dev libhsa-runtime-dev librocblas-dev || true
      if ! command -v hipcc >/dev/null; then
        echo "compile-check-gpu: no hipcc and apt could not install it" >&2
        summary[hip]="NOT CHECKED: no hipcc"
        status=1
        continue
      fi
      version=$(hipconfig --version 2>/dev/null | tail -1)
      clang=$(hipconfig --full 2>/dev/null | grep -m1 "clang version" || true)
      dir=${OPENSCI_BUILD_DIR_HIP:-build-hip}
      archs=${OPENSCI_HIP_ARCHITECTURES:-gfx90a;gfx942}
      if build_variant hip "$dir" -DOPENSCI_WITH_HIP=ON "-DOPENSCI_HIP_ARCHITECTURES=$archs" && check_tests "$dir" rocm; then
        built=$(grep -m1 "opensci kernels: HIP" "$dir.configure.log" | sed 's/.*targets \([^,]*\), GEMM \(.*\)/targets \1, GEMM \2/')
        summary[hip]="OK: HIP $version ($clang), requested $archs, $built; compiled and linked ${#gpu_targets[@]} targets"
      else
        summary[hip]=${summary[hip]:-"FAILED: tests"}
        status=1
      fi
      ;;
    emulation)
      dir=${OPENSCI_BUILD_DIR_EMU:-build-emu}
      if build_variant emulation "$dir" -DOPENSCI_GPU_EMULATION=ON && check_tests "$dir" gpu-emulated; then
        summary[emulation]="OK: kernels built with $(c++ --version | head -1), every gpu-emulated test RAN and passed"
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
