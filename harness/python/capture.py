#!/usr/bin/env python3
"""Capture one transformers forward pass of a model directory, for comparison with the C++
reference (opensci-compat forward).

Runs inside an isolated environment (one transformers version), with the standard library,
torch and transformers only. Writes into --out-dir:
  output.safetensors  logits F32 [b, s, V]; input_ids, attention_mask, position_ids I64 [b, s];
                      with --hidden-states the per-layer F32 [b, s, H] tensors named as the
                      reference names them: hidden.embed, attn.{i}, mlp.{i}, hidden.layer.{i},
                      hidden.final_norm
  state_dict.safetensors  (--dump-state-dict) model.state_dict() after loading, as F32 under
                      the HF names, plus the non-persistent buffers (e.g. rotary inv_freq), so
                      loaded weights and recreated buffers can be checked against the checkpoint
  provenance.json     versions, dtypes, device, attention implementation, shims (per stage, with
                      what each did), RoPE inv_freq buffers as loaded vs the config, timings, how
                      it ran ("runner": a cold interpreter, or a child of the capture worker
                      harness/python/worker.py with the worker's pid, start, captures served and
                      the clean-start check), ...
  error.json          only on failure: {stage, type, message, traceback}; exit status 3
Non-finite logits are written as they are (the C++ side judges them) and counted in provenance.
"""

import argparse
import datetime
import inspect
import json
import logging
import os
import struct
import sys
import time
import traceback
import warnings

import hf_load
import shims

EXIT_FAILURE = 3


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (config.json, safetensors, remote code)")
    p.add_argument("--tokens-file", required=True, help='JSON {"input_ids": [[..]], "attention_mask"?, "position_ids"?}')
    p.add_argument("--dtype", required=True, choices=hf_load.DTYPES)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--attn-impl", default="default", choices=("default", "eager", "sdpa"))
    p.add_argument("--out-dir", required=True)
    p.add_argument("--hidden-states", action="store_true", help="also write per-layer hidden states")
    p.add_argument("--dump-state-dict", action="store_true", help="also write the loaded state dict")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--shim", action="extend", nargs="+", default=[], metavar="NAME",
                   help="runtime shims; each runs in its own stage (pre-load: before loading, post-load: on the "
                        "loaded model before the forward): "
                        + ", ".join(f"{n} ({s.stage}, {s.hazard})" for n, s in sorted(shims.SHIMS.items())))
    return p.parse_args(argv)


# --- inputs -----------------------------------------------------------------------------------

def read_tokens(path):
    """Token batch as lists of rows. Missing attention_mask: all ones. Missing position_ids:
    cumsum(mask) - 1 with pads at 0, the rule of the C++ reference (TokenBatch::from_json_file)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)

    def matrix(key):
        rows = data.get(key)
        if rows is None:
            return None
        if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
            raise ValueError(f"{path}: '{key}' must be a non-empty list of rows")
        if any(not isinstance(v, int) or isinstance(v, bool) for r in rows for v in r):
            raise ValueError(f"{path}: '{key}' must hold integers only")
        return rows

    ids = matrix("input_ids")
    if ids is None:
        raise ValueError(f"{path}: no 'input_ids'")
    seq = len(ids[0])
    if seq == 0 or any(len(r) != seq for r in ids):
        raise ValueError(f"{path}: input_ids rows must be non-empty and of equal length (pad them)")
    mask = matrix("attention_mask") or [[1] * seq for _ in ids]
    pos = matrix("position_ids")
    if pos is None:
        pos = []
        for row in mask:
            running, out = 0, []
            for m in row:
                out.append(running if m else 0)
                running += 1 if m else 0
            pos.append(out)
    for key, m in (("attention_mask", mask), ("position_ids", pos)):
        if len(m) != len(ids) or any(len(r) != seq for r in m):
            raise ValueError(f"{path}: '{key}' shape differs from input_ids [{len(ids)}, {seq}]")
    if any(v not in (0, 1) for r in mask for v in r):
        raise ValueError(f"{path}: attention_mask must be 0/1")
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


# --- safetensors --------------------------------------------------------------------------------

_ST_DTYPES = {"float32": "F32", "int64": "I64"}


def write_safetensors(path, tensors, metadata):
    """Minimal safetensors writer: 8-byte little-endian header length, JSON header (dtype, shape,
    data_offsets) with names sorted and payloads packed in that order, the header padded with
    spaces so the payload starts 8-byte aligned. Same layout as the C++ SafetensorsWriter.
    tensors: name -> CPU torch tensor of float32 or int64."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors payloads are little-endian; this writer assumes a little-endian host")
    header, payloads, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        st_dtype = _ST_DTYPES.get(str(t.dtype).replace("torch.", ""))
        if st_dtype is None:
            raise TypeError(f"{name}: cannot write dtype {t.dtype} (only float32 and int64)")
        data = t.numpy().tobytes()
        header[name] = {"dtype": st_dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        payloads.append(data)
        offset += len(data)
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for data in payloads:
            f.write(data)
    os.replace(tmp, path)


# --- capture ------------------------------------------------------------------------------------

def find_layers(base_model):
    """The decoder's ModuleList named 'layers' (shallowest one) under the base model."""
    import torch

    found = [(name, m) for name, m in base_model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and name.split(".")[-1] == "layers"]
    if not found:
        raise RuntimeError(f"{type(base_model).__name__} has no ModuleList named 'layers'")
    return min(found, key=lambda item: item[0].count("."))[1]


def attach_hidden_hooks(model, store):
    """Forward hooks recording the reference's named hidden states into store (float32, CPU)."""
    import torch

    base = model.base_model
    norm = getattr(base, "norm", None)
    if norm is None:
        raise RuntimeError(f"{type(base).__name__} has no final 'norm' module")

    def record(name):
        def hook(_module, _inputs, output):
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            store[name] = tensor.detach().to("cpu", dtype=torch.float32)

        return hook

    targets = [("hidden.embed", model.get_input_embeddings()), ("hidden.final_norm", norm)]
    for i, layer in enumerate(find_layers(base)):
        targets += [(f"attn.{i}", layer.self_attn), (f"mlp.{i}", layer.mlp), (f"hidden.layer.{i}", layer)]
    return [module.register_forward_hook(record(name)) for name, module in targets]


class _LogCollector(logging.Handler):
    """Keeps transformers' warnings (e.g. 'weights not initialized from the checkpoint') for the
    provenance: they are often the first sign of a hazard."""

    def __init__(self, sink):
        super().__init__(level=logging.WARNING)
        self.sink = sink

    def emit(self, record):
        self.sink.append(f"{record.name}: {record.getMessage()}")


def run(args, prov, progress):
    """The capture proper; progress["stage"] names the stage an exception escaped from."""
    progress["stage"] = "import"
    import torch
    import transformers

    prov["versions"] = hf_load.library_versions()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").addHandler(_LogCollector(prov["warnings"]))
    if args.threads:
        torch.set_num_threads(args.threads)
    prov["torch_threads"] = torch.get_num_threads()
    shims.check_names(args.shim)
    prov["shims"] = shims.apply_shims(args.shim, "pre-load")

    progress["stage"] = "config"
    config_json = hf_load.read_config_json(args.model)
    trust = hf_load.needs_remote_code(config_json)
    prov["trust_remote_code"] = trust
    config = hf_load.load_config(args.model, trust)
    prov["config_class"] = type(config).__name__
    prov["model_type"] = getattr(config, "model_type", None)

    progress["stage"] = "load"
    t0 = time.perf_counter()
    model, load_kwargs = hf_load.load_model(args.model, args.dtype, args.device, args.attn_impl, trust)
    prov["load_seconds"] = time.perf_counter() - t0
    prov["from_pretrained_kwargs"] = load_kwargs
    if args.device == "cuda":
        prov["cuda_device"] = torch.cuda.get_device_name()
    prov["shim_effects"] = shims.effects()
    describe_model(model, prov)
    # Where the remote code was imported from (the per-run HF_MODULES_CACHE, also in a worker).
    prov["remote_code_files"] = sorted(m.__file__ for n, m in list(sys.modules.items())
                                       if n.startswith("transformers_modules.") and getattr(m, "__file__", None))
    # The RoPE buffers as transformers left them (before any post-load shim): H3 evidence.
    prov["inv_freq_as_loaded"] = describe_inv_freq(model)

    progress["stage"] = "post-load"
    prov["shims"] += shims.apply_shims(args.shim, "post-load", model)

    progress["stage"] = "forward"
    tokens = read_tokens(args.tokens_file)
    inputs = {k: torch.tensor(v, dtype=torch.int64) for k, v in tokens.items()}
    hidden = {}
    hooks = attach_hidden_hooks(model, hidden) if args.hidden_states else []
    with torch.inference_mode():
        t0 = time.perf_counter()
        # attention_mask and position_ids always explicit: no version's defaults enter the run.
        out = model(**{k: v.to(args.device) for k, v in inputs.items()})
        if args.device == "cuda":
            torch.cuda.synchronize()
        prov["forward_seconds"] = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    logits = (out.logits if hasattr(out, "logits") else out[0]).detach().to("cpu", dtype=torch.float32)
    prov["logits_shape"] = list(logits.shape)
    prov["logits_nonfinite"] = int((~torch.isfinite(logits)).sum())

    progress["stage"] = "write"
    meta = {"producer": "harness/python/capture.py", "transformers": transformers.__version__,
            "torch": torch.__version__, "dtype": args.dtype, "device": args.device}
    write_safetensors(os.path.join(args.out_dir, "output.safetensors"), dict(inputs, logits=logits, **hidden), meta)
    if args.dump_state_dict:
        write_safetensors(os.path.join(args.out_dir, "state_dict.safetensors"), loaded_tensors(model), meta)


def describe_model(model, prov):
    """What actually got loaded: class and source file, parameter dtypes, attention
    implementation, tying, parameter and buffer names."""
    import torch

    cls = type(model)
    prov["model_class"] = f"{cls.__module__}.{cls.__qualname__}"
    prov["model_module_file"] = inspect.getsourcefile(cls)
    dtypes = {}
    for _, p in model.named_parameters():
        key = str(p.dtype).replace("torch.", "")
        dtypes[key] = dtypes.get(key, 0) + 1
    prov["parameter_dtypes"] = dtypes
    # What the model actually ran in (the diagnosis compares it with the requested dtype: H6).
    prov["effective_dtype"] = "+".join(sorted(dtypes)) if dtypes else None
    prov["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    prov["lm_head_tied"] = bool(out_emb is not None and out_emb.weight.data_ptr() == in_emb.weight.data_ptr())
    prov["config_tie_word_embeddings"] = getattr(model.config, "tie_word_embeddings", None)
    prov["config_rope_theta"] = getattr(model.config, "rope_theta", None)
    rope_parameters = getattr(model.config, "rope_parameters", None)
    prov["config_rope_parameters"] = json.loads(json.dumps(rope_parameters, default=str))
    prov["parameters"] = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    persistent = set(model.state_dict())
    prov["buffers"] = [n for n, _ in model.named_buffers()]
    prov["non_persistent_buffers"] = [n for n in prov["buffers"] if n not in persistent]
    prov["meta_tensors"] = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                            if t.device == torch.device("meta")]


def describe_inv_freq(model):
    """Every inv_freq buffer: its first values and its max relative error against 1/theta^(2i/d)
    from the config (plain RoPE). Finite, non-zero garbage shows up here as a large error."""
    import math

    import torch

    out = []
    for name, module, buf in shims.inv_freq_buffers(model):
        config = getattr(module, "config", None) or model.config
        try:
            err = shims.max_rel_error(buf, shims.config_inv_freq(config))
        except Exception as e:  # a config without the keys plain RoPE needs
            err = f"not computed: {type(e).__name__}: {e}"
        head = [float(v) for v in buf.detach().flatten()[:4].to("cpu", dtype=torch.float64)]
        out.append({"name": name, "shape": list(buf.shape), "dtype": str(buf.dtype).replace("torch.", ""),
                    "first_values": [v if math.isfinite(v) else str(v) for v in head],
                    "max_rel_error_vs_config": err if not isinstance(err, float) or math.isfinite(err) else "inf"})
    return out


def loaded_tensors(model):
    """state_dict (tied names included) plus the non-persistent buffers it leaves out, on the
    CPU: floating tensors as float32, the rest as int64."""
    import torch

    tensors = dict(model.state_dict())
    for name, buf in model.named_buffers():
        tensors.setdefault(name, buf)
    return {name: t.detach().to("cpu", dtype=torch.float32 if t.is_floating_point() else torch.int64)
            for name, t in tensors.items()}


def runner_record():
    """How this capture runs: {"mode": "cold"} for `python capture.py`, else what the capture
    worker (worker.py) that forked this process put into the opensci_capture_worker module."""
    module = sys.modules.get("opensci_capture_worker")
    context = getattr(module, "context", None)
    if not isinstance(context, dict):
        return {"mode": "cold", "pid": os.getpid()}
    record = {k: v for k, v in context.items() if k != "import_warnings"}
    record["pid"] = os.getpid()
    return record


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.out_dir, exist_ok=True)
    for stale in ("error.json", "output.safetensors", "state_dict.safetensors", "provenance.json"):
        if os.path.exists(os.path.join(args.out_dir, stale)):
            os.remove(os.path.join(args.out_dir, stale))
    prov = {
        "status": "ok",
        "argv": sys.argv,
        "model_dir": os.path.abspath(args.model),
        "tokens_file": os.path.abspath(args.tokens_file),
        "requested_dtype": args.dtype,
        "device": args.device,
        "requested_attn_impl": args.attn_impl,
        "warnings": [],
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "runner": runner_record(),
    }
    # In a worker, torch and transformers were imported before this process existed: the
    # warnings they raised then are the ones a cold run records during its import stage.
    module = sys.modules.get("opensci_capture_worker")
    import_warnings = list(getattr(module, "context", {}).get("import_warnings", [])) if module else []
    progress = {"stage": "import"}
    exit_code = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run(args, prov, progress)
        except Exception as e:
            tb = traceback.format_exc()
            sys.stderr.write(tb)
            error = {"stage": progress["stage"], "type": type(e).__name__, "message": str(e), "traceback": tb}
            with open(os.path.join(args.out_dir, "error.json"), "w", encoding="utf-8") as f:
                json.dump(error, f, indent=2)
            prov.update(status="error", error_stage=progress["stage"], error_type=type(e).__name__)
            exit_code = EXIT_FAILURE
    prov["warnings"] += import_warnings + [f"{w.category.__name__}: {w.message}" for w in caught]
    with open(os.path.join(args.out_dir, "provenance.json"), "w", encoding="utf-8") as f:
        json.dump(prov, f, indent=2, default=str)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
