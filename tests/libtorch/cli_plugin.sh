#!/usr/bin/env bash
# The CLI's libtorch backend goes through the plugin (dlopen at first use): the CLI itself must
# not link libtorch (its ~0.9 s start-up would be paid by every CTest test), and
# `forward --backend libtorch` must still compute the reference's logits.
#   cli_plugin.sh CLI SOURCE_DIR WORK
set -euo pipefail
cli=$1 src=$2 work=$3
rm -rf "$work" && mkdir -p "$work"
case "$(ldd "$cli")" in
  *libtorch*) echo "FAIL: $cli links libtorch (it must dlopen the plugin):"; ldd "$cli" | grep torch; exit 1 ;;
esac
"$cli" toy --config "$src/toy_configs/opensci-qwen3.json" --seed 1 --out "$work/model" >/dev/null
"$cli" forward --model "$work/model" --tokens 5,17,42,7,99,3 --dtype fp64 --backend libtorch --out "$work/torch.safetensors"
"$cli" forward --model "$work/model" --tokens 5,17,42,7,99,3 --dtype fp64 --backend cpu --out "$work/ref.safetensors"
# fp64 against fp64: the tightest profile (fp32-vs-fp32) with orders of magnitude to spare.
"$cli" compare "$work/torch.safetensors" "$work/ref.safetensors" --tolerance-file "$src/matrix/tolerances.json" \
  --tolerance fp32-vs-fp32
