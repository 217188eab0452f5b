#!/usr/bin/env python3
"""Time transformers (sdpa attention, bf16) on a GPU at a config's shape, prefill.

The counterpart of bench/bench_gpu_forward.cpp: same config (default the published open-sci-ref
1.7B shape, bench/configs/opensci-ref-1.7b.json), same batch sizes, same sequence length, same
FLOP count, random weights (from_config: nothing is downloaded or written to disk). The model
class comes from the remote code next to the config (fixtures/remote_code/opensci_ref), as users
load it. Give the C++ bench this script's JSON with --compare to print the ratio:

    python3 harness/python/bench_gpu_transformers.py --peak-tflops 989 --out /tmp/tf.json
    build-cuda/bench/opensci-bench-gpu-forward --peak-tflops 989 --compare /tmp/tf.json

Runs where torch sees a CUDA or ROCm device (torch.cuda); stdlib, torch and transformers only.
"""

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import hf_load

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIR = os.path.dirname(os.path.dirname(HERE))


def prefill_flops(c, batch, seq):
    """FLOPs of one prefill, counted as the C++ benches do (causal attention: seq (seq + 1) / 2 pairs)."""
    h, d, nh = c["hidden_size"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"], c["num_attention_heads"]
    nkv = c.get("num_key_value_heads") or nh
    per_layer = h * d * (2 * nh + 2 * nkv) + 3 * h * c["intermediate_size"]
    linear = batch * seq * (c["num_hidden_layers"] * per_layer + h * c["vocab_size"])
    attention = c["num_hidden_layers"] * batch * nh * d * seq * (seq + 1)
    return 2 * (linear + attention)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(SOURCE_DIR, "bench", "configs", "opensci-ref-1.7b.json"))
    p.add_argument("--remote-code", default=os.path.join(SOURCE_DIR, "fixtures", "remote_code", "opensci_ref"),
                   help="directory whose *.py serve the config's auto_map")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16", choices=hf_load.DTYPES)
    p.add_argument("--attn-impl", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device dense peak for --dtype, TFLOP/s")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", required=True, help="JSON file for the results")
    args = p.parse_args(argv)
    args.batch = [int(b) for b in args.batch.split(",")]
    if min(args.batch + [args.seq, args.repeats]) < 1 or args.warmup < 0:
        p.error("batch, seq and repeats must be >= 1, warmup >= 0")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    if not torch.cuda.is_available():
        print("bench_gpu_transformers: torch sees no CUDA/ROCm device", file=sys.stderr)
        return 77
    with open(args.config, encoding="utf-8") as f:
        config_json = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    with tempfile.TemporaryDirectory(prefix="opensci-bench-") as model_dir:
        with open(os.path.join(model_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config_json, f)
        trust = hf_load.needs_remote_code(config_json)
        if trust:
            for name in os.listdir(args.remote_code):
                if name.endswith(".py"):
                    shutil.copy(os.path.join(args.remote_code, name), model_dir)
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust, local_files_only=True)
        dtype_key = "dtype" if hf_load.version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
        kwargs = {dtype_key: getattr(torch, args.dtype), "attn_implementation": args.attn_impl,
                  "trust_remote_code": trust}
        torch.manual_seed(args.seed)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, **kwargs).eval()

    generator = torch.Generator().manual_seed(args.seed)
    runs = []
    for batch in args.batch:
        shape = (batch, args.seq)
        inputs = {
            "input_ids": torch.randint(0, config_json["vocab_size"], shape, generator=generator),
            "attention_mask": torch.ones(shape, dtype=torch.int64),
            "position_ids": torch.arange(args.seq).expand(shape).contiguous(),
        }
        inputs = {k: v.to("cuda") for k, v in inputs.items()}
        seconds = []
        with torch.inference_mode():
            for i in range(args.warmup + args.repeats):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(**inputs)
                torch.cuda.synchronize()
                if i >= args.warmup:
                    seconds.append(time.perf_counter() - t0)
        median = statistics.median(seconds)
        flops = prefill_flops(config_json, batch, args.seq)
        tflops = flops / median / 1e12
        runs.append({"batch": batch, "median_seconds": median, "seconds": seconds, "flops": flops, "tflops": tflops,
                     "fraction_of_peak_tflops": tflops / args.peak_tflops if args.peak_tflops else 0.0})
        peak = f" ({100 * tflops / args.peak_tflops:.1f}% of {args.peak_tflops:.0f})" if args.peak_tflops else ""
        print(f"batch {batch} x seq {args.seq}: median {median * 1e3:.2f} ms, {batch * args.seq / median:.0f} tokens/s, "
              f"{tflops:.1f} TFLOP/s{peak}")
        del inputs
        torch.cuda.empty_cache()

    result = {
        "config": args.config,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "attn_implementation": getattr(model.config, "_attn_implementation", args.attn_impl),
        "dtype": args.dtype,
        "seq": args.seq,
        "device": torch.cuda.get_device_name(0),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "seed": args.seed,
        "peak_tflops": args.peak_tflops,
        "runs": runs,
        "versions": hf_load.library_versions(),
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
