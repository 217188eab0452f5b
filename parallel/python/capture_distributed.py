#!/usr/bin/env python3
"""Capture one forward pass of transformers' own distributed path, run under torchrun (gloo on
CPU, NCCL on CUDA): tensor parallel (from_pretrained(tp_plan="auto")) or expert parallel
(from_pretrained(distributed_config=DistributedConfig(enable_expert_parallel=True))), one process
per rank. Rank 0 writes what harness/python/capture.py writes (output.safetensors with logits,
ids, mask, positions and the per-layer hidden states, provenance.json; error.json on failure)
into --out-dir; the C++ side (parallel/src/capture_distributed.cpp) judges the run.

Where the transformers version or the model has no such path, nothing is run: the script writes
unsupported.json {"reason": ...} and exits 77, and the cell is Not Run with that reason:
  tp_plan            from_pretrained(tp_plan=...) exists from transformers 4.47; the model's config
                     class must carry base_model_tp_plan (native qwen3/qwen3_moe do; remote code
                     may not);
  expert parallel    transformers.distributed.DistributedConfig(enable_expert_parallel) from 4.54;
                     the config class must carry base_model_ep_plan (qwen3_moe from 5.x).
"""

import argparse
import datetime
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.environ.get("OPENSCI_CAPTURE_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "harness", "python")))

import capture  # noqa: E402  (harness/python: read_tokens, write_safetensors, attach_hidden_hooks)
import hf_load  # noqa: E402

EXIT_FAILURE = 3
EXIT_UNSUPPORTED = 77


class Unsupported(Exception):
    """This version / model has no such distributed path."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--tokens-file", required=True)
    p.add_argument("--mode", required=True, choices=("tp", "ep"))
    p.add_argument("--dtype", default="float32", choices=hf_load.DTYPES)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out-dir", required=True)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def distributed_kwargs(mode, transformers, config):
    """from_pretrained kwargs of the distributed path, or Unsupported with the reason."""
    import inspect

    version = transformers.__version__
    if mode == "tp":
        params = inspect.signature(transformers.PreTrainedModel.from_pretrained).parameters
        source = inspect.getsource(transformers.PreTrainedModel.from_pretrained)
        if "tp_plan" not in params and '"tp_plan"' not in source and "'tp_plan'" not in source:
            raise Unsupported(f"transformers {version} has no tensor-parallel from_pretrained(tp_plan=...) (added in 4.47)")
        plan = getattr(config, "base_model_tp_plan", None)
        if not plan:
            raise Unsupported(f"transformers {version}: {type(config).__name__} has no base_model_tp_plan, so "
                              "tp_plan='auto' has nothing to shard (remote code without a TP plan)")
        return {"tp_plan": "auto"}, {"base_model_tp_plan": plan}
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        raise Unsupported(f"transformers {version} has no transformers.distributed.DistributedConfig "
                          "(expert parallel from_pretrained(distributed_config=...) came in 4.54)")
    if "enable_expert_parallel" not in inspect.signature(DistributedConfig).parameters:
        raise Unsupported(f"transformers {version}: DistributedConfig has no enable_expert_parallel")
    plan = getattr(config, "base_model_ep_plan", None)
    if not plan:
        raise Unsupported(f"transformers {version}: {type(config).__name__} has no base_model_ep_plan, so "
                          "enable_expert_parallel has nothing to shard")
    return {"distributed_config": DistributedConfig(enable_expert_parallel=True)}, {"base_model_ep_plan": plan}


def checkpoint_shapes(model_dir):
    """name -> shape of every tensor in the model's safetensors files (headers only)."""
    import struct

    shapes = {}
    for fname in sorted(os.listdir(model_dir)):
        if fname.endswith(".safetensors"):
            with open(os.path.join(model_dir, fname), "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def run(args, prov, progress):
    progress["stage"] = "import"
    import torch
    import torch.distributed as dist
    import transformers

    prov["versions"] = hf_load.library_versions()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    prov.update(rank=rank, world=world, mode=args.mode)

    progress["stage"] = "config"
    config_json = hf_load.read_config_json(args.model)
    trust = hf_load.needs_remote_code(config_json)
    config = hf_load.load_config(args.model, trust)
    prov["config_class"] = type(config).__name__
    kwargs, plan = distributed_kwargs(args.mode, transformers, config)
    prov["plan"] = plan

    progress["stage"] = "init_process_group"
    backend = "nccl" if args.device == "cuda" else "gloo"
    import no_libuv

    no_libuv.patch()  # the agent-store client of env:// (Debian's torch has no libuv)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    prov["backend"] = backend

    progress["stage"] = "load"
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model, dtype=getattr(torch, args.dtype), trust_remote_code=trust, **kwargs)
    model.eval()
    prov["load_seconds"] = time.perf_counter() - t0
    prov["from_pretrained_kwargs"] = {k: str(v) for k, v in kwargs.items()}
    prov["tp_size"] = getattr(model, "_tp_size", None)
    prov["device_mesh"] = str(getattr(model, "_device_mesh", None))
    # Evidence that the model really is sharded (a replicated model would compare trivially):
    # parameters whose local shape on this rank is smaller than in the checkpoint.
    on_disk = checkpoint_shapes(args.model)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0
    sharded = {}
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        full = on_disk.get(name)
        if full is not None and list(local.shape) != full:
            sharded[name] = {"local": list(local.shape), "checkpoint": full}
        elif full is None and name.endswith((".experts.gate_up_proj", ".experts.down_proj")) and \
                local.shape[0] < experts:  # fused experts [E, ...]: the checkpoint stores them one by one
            sharded[name] = {"local": list(local.shape), "experts": experts}
        elif full is None and hasattr(p, "placements"):
            sharded[name] = {"local": list(local.shape), "placements": str(p.placements)}
    prov["sharded_parameters"] = len(sharded)
    prov["sharded_examples"] = dict(list(sharded.items())[:4])
    if not sharded:
        raise RuntimeError(f"{args.mode} x{world}: from_pretrained({', '.join(kwargs)}) left every parameter whole on "
                           f"rank {rank}: nothing was sharded")

    progress["stage"] = "forward"
    tokens = capture.read_tokens(args.tokens_file)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else torch.device("cpu")
    inputs = {k: torch.tensor(v, dtype=torch.int64) for k, v in tokens.items()}
    hidden = {}
    hooks = capture.attach_hidden_hooks(model, hidden)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(**{k: v.to(device) for k, v in inputs.items()})
        prov["forward_seconds"] = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    logits = out.logits
    if hasattr(logits, "full_tensor"):  # a DTensor (sharded vocab): gather it
        logits = logits.full_tensor()
    logits = logits.detach().to("cpu", dtype=torch.float32)
    for name, t in list(hidden.items()):
        if hasattr(t, "full_tensor"):
            hidden[name] = t.full_tensor().to("cpu", dtype=torch.float32)
    prov["logits_shape"] = list(logits.shape)
    prov["logits_nonfinite"] = int((~torch.isfinite(logits)).sum())

    progress["stage"] = "write"
    if rank == 0:
        meta = {"producer": "parallel/python/capture_distributed.py", "transformers": transformers.__version__,
                "torch": torch.__version__, "dtype": args.dtype, "device": args.device, "mode": args.mode,
                "world": str(world)}
        capture.write_safetensors(os.path.join(args.out_dir, "output.safetensors"), dict(inputs, logits=logits, **hidden),
                                  meta)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    os.makedirs(args.out_dir, exist_ok=True)
    prov = {"status": "ok", "argv": sys.argv, "model_dir": os.path.abspath(args.model), "requested_dtype": args.dtype,
            "device": args.device,
            "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    progress = {"stage": "import"}
    code = 0
    try:
        run(args, prov, progress)
    except Unsupported as e:
        prov.update(status="unsupported", reason=str(e))
        if rank == 0:
            with open(os.path.join(args.out_dir, "unsupported.json"), "w", encoding="utf-8") as f:
                json.dump({"reason": str(e)}, f)
        code = EXIT_UNSUPPORTED
    except Exception as e:
        tb = traceback.format_exc()
        sys.stderr.write(f"rank {rank}: {tb}")
        error = {"stage": progress["stage"], "type": type(e).__name__, "message": f"rank {rank}: {e}", "traceback": tb}
        with open(os.path.join(args.out_dir, f"error.rank{rank}.json"), "w", encoding="utf-8") as f:
            json.dump(error, f, indent=2)
        if rank == 0 or not os.path.exists(os.path.join(args.out_dir, "error.json")):
            with open(os.path.join(args.out_dir, "error.json"), "w", encoding="utf-8") as f:
                json.dump(error, f, indent=2)
        prov.update(status="error", error_stage=progress["stage"], error_type=type(e).__name__)
        code = EXIT_FAILURE
    with open(os.path.join(args.out_dir, f"provenance.rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(prov, f, indent=2, default=str)
    if rank == 0:
        with open(os.path.join(args.out_dir, "provenance.json"), "w", encoding="utf-8") as f:
            json.dump(prov, f, indent=2, default=str)
    return code


if __name__ == "__main__":
    sys.exit(main())
