#!/usr/bin/env python3
"""Time a transformers forward pass (prefill) of a model directory.

The C++ bench runs the reference forward on the same model directory and shape; the report
puts the two side by side. Token ids are drawn from a fixed seed so both sides can use the
same batch; the mask is all ones and position_ids are passed explicitly (0 .. seq-1), as the
capture does. Runs inside an isolated environment: stdlib, torch and transformers only.
"""

import argparse
import datetime
import json
import statistics
import sys
import time

import hf_load


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, required=True, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=10, help="timed forward passes")
    p.add_argument("--warmup", type=int, default=2, help="untimed forward passes first")
    p.add_argument("--dtype", default="float32", choices=hf_load.DTYPES)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--attn-impl", default="default", choices=("default", "eager", "sdpa"))
    p.add_argument("--seed", type=int, default=1234, help="seed of the random token ids")
    p.add_argument("--out", required=True, help="JSON file for the results")
    args = p.parse_args(argv)
    if min(args.batch, args.seq, args.threads, args.repeats) < 1 or args.warmup < 0:
        p.error("batch, seq, threads and repeats must be >= 1, warmup >= 0")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    trust = hf_load.needs_remote_code(hf_load.read_config_json(args.model))
    t0 = time.perf_counter()
    model, load_kwargs = hf_load.load_model(args.model, args.dtype, args.device, args.attn_impl, trust)
    load_seconds = time.perf_counter() - t0

    generator = torch.Generator().manual_seed(args.seed)
    vocab = model.get_input_embeddings().num_embeddings
    shape = (args.batch, args.seq)
    inputs = {
        "input_ids": torch.randint(0, vocab, shape, generator=generator),
        "attention_mask": torch.ones(shape, dtype=torch.int64),
        "position_ids": torch.arange(args.seq).expand(shape).contiguous(),
    }
    inputs = {k: v.to(args.device) for k, v in inputs.items()}

    def forward():
        model(**inputs)
        if args.device == "cuda":
            torch.cuda.synchronize()

    seconds = []
    with torch.inference_mode():
        for _ in range(args.warmup):
            forward()
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            forward()
            seconds.append(time.perf_counter() - t0)

    median = statistics.median(seconds)
    result = {
        "model_dir": args.model,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "from_pretrained_kwargs": load_kwargs,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "batch": args.batch,
        "seq": args.seq,
        "dtype": args.dtype,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "seed": args.seed,
        "load_seconds": load_seconds,
        "seconds": seconds,
        "median_seconds": median,
        "min_seconds": min(seconds),
        "tokens_per_second": args.batch * args.seq / median,
        "versions": hf_load.library_versions(),
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"median {median * 1e3:.3f} ms, min {min(seconds) * 1e3:.3f} ms, "
          f"{result['tokens_per_second']:.0f} tokens/s ({args.batch}x{args.seq}, {result['threads']} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
