#!/usr/bin/env bash
# Benchmark (not a test): wall time of one toy-cell capture, cold interpreter vs warm capture
# worker, measured in the same run, interleaved (cold, warm, cold, warm, ...) so that machine load
# hits both alike. Each capture is a full `opensci-compat capture` (CLI start, environment
# realise, capture, output check), i.e. what one matrix capture test costs.
#
#   bash bench/bench_capture.sh [build dir (default: build)] [runs per mode (default: 10)]
#   env: BENCH_ENV_SPEC (default: the Debian sid rootfs), BENCH_MODEL (default: opensci-ref toy)
#
# Prints median, min, max and the interquartile range per mode (wall and CPU seconds: on a
# loaded machine wall time is inflated, CPU time much less), the worker's start-up (its imports,
# paid once per environment), and the warm/cold ratios of the medians.
set -euo pipefail

build=${1:-build}
runs=${2:-10}
here=$(cd "$(dirname "$0")/.." && pwd)
cli="$build/harness/opensci-compat"
spec=${BENCH_ENV_SPEC:-'{"provider":"debian-rootfs","suite":"sid"}'}
[[ -x $cli ]] || { echo "bench_capture: $cli not built (ninja -C $build opensci-compat)" >&2; exit 2; }

work=$(mktemp -d /tmp/opensci-bench-capture-XXXXXX)
export OPENSCI_WORKER_DIR="$work/workers"  # a worker of its own, stopped at the end
cleanup() {
  "$cli" env workers --stop --dir "$OPENSCI_WORKER_DIR" > /dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

model=${BENCH_MODEL:-}
if [[ -z $model ]]; then
  model="$work/model"
  "$cli" toy --config "$here/toy_configs/opensci-ref.json" --seed 1 --out "$model" \
    --remote-code "$here/fixtures/remote_code/opensci_ref" > /dev/null
fi

# One capture; prints "CLI-wall capture-wall fork-to-exit CPU-seconds". CPU = the CLI and every
# process it waited for (cold: unshare + chroot + python), plus, warm, the worker's child and the
# worker's own CPU for that capture (fork, bookkeeping).
capture() {
  local mode=$1 out=$2 flag=()
  [[ $mode == cold ]] && flag=(--no-worker)
  /usr/bin/time -f "%e %U %S" -o "$out.time" \
    "$cli" capture --env-spec "$spec" --model "$model" --tokens-file "$here/fixtures/tokens/padded-batch.json" \
    --variant opensci-ref/none --out "$out" --hidden-states --dump-state-dict "${flag[@]}" > "$out.log" 2>&1 ||
    { echo "bench_capture: $mode capture failed, see $out.log:" >&2; tail -5 "$out.log" >&2; exit 1; }
  python3 - "$out/outcome.json" "$out.time" "$mode" << 'EOF'
import json, sys
o = json.load(open(sys.argv[1]))
wall, user, system = map(float, open(sys.argv[2]).read().split()[-3:])
if o["status"] != "ok":
    sys.exit(f"bench_capture: {sys.argv[3]} capture status {o['status']}: {o['detail']}")
runner = o["runner"]
if runner["mode"] != sys.argv[3]:
    sys.exit(f"bench_capture: asked for a {sys.argv[3]} capture, got {runner['mode']}: {runner}")
cpu = user + system + (runner.get("child_cpu_seconds") or 0) + (runner.get("worker_cpu_seconds") or 0)
print(wall, o["wall_seconds"], runner.get("fork_to_exit_seconds") or 0, cpu)
EOF
}

echo "bench_capture: $runs runs per mode, env $spec, model $model, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
t0=$(date +%s.%N)
first=$(capture worker "$work/warmup")
t1=$(date +%s.%N)
echo "worker start: first capture (worker started and imports done) $(python3 -c "print(f'{$t1 - $t0:.2f}')") s" \
     "(log: $(ls "$OPENSCI_WORKER_DIR"/*.log))"
grep -h "ready:" "$OPENSCI_WORKER_DIR"/*.log | sed 's/^/  /'
: > "$work/cold.txt"
: > "$work/worker.txt"
for ((i = 0; i < runs; i++)); do
  capture cold "$work/cold-$i" >> "$work/cold.txt"
  capture worker "$work/warm-$i" >> "$work/worker.txt"
done
python3 - "$work/cold.txt" "$work/worker.txt" << 'EOF'
import statistics, sys

def stats(path):
    rows = [tuple(map(float, line.split())) for line in open(path) if line.strip()]
    return [[r[i] for r in rows] for i in range(4)]

def line(name, xs):
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return (f"{name:<28} median {statistics.median(xs):6.3f} s   min {min(xs):6.3f}   max {max(xs):6.3f}   "
            f"IQR {q[0]:6.3f}-{q[2]:6.3f}   (n={len(xs)})")

cold, cold_cap, _, cold_cpu = stats(sys.argv[1])
warm, warm_cap, warm_fork, warm_cpu = stats(sys.argv[2])
print(line("cold: CLI wall", cold))
print(line("cold: capture process", cold_cap))
print(line("cold: CPU (CLI+python)", cold_cpu))
print(line("warm: CLI wall", warm))
print(line("warm: capture (send->exit)", warm_cap))
print(line("warm: child fork->exit", warm_fork))
print(line("warm: CPU (CLI+child+worker)", warm_cpu))
for name, c, w in (("CLI wall", cold, warm), ("CPU", cold_cpu, warm_cpu)):
    print(f"warm/cold ({name} medians): {statistics.median(w) / statistics.median(c):.3f}  "
          f"(cold is {statistics.median(c) / statistics.median(w):.1f}x the warm)")
EOF
