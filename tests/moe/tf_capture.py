#!/usr/bin/env python3
"""Fallback for harness/python/capture.py when that script is absent: the same options (subset)
and outputs; also used for the fp64 run, which needs --experts-implementation eager for native
qwen3_moe (5.12.1's default grouped_mm experts refuse fp64 on CPU: "Expected mat_a to be
Float32, BFloat16 or Float16 matrix, got Double"). Loads --model with transformers (trust_remote_code when the config has an auto_map),
runs --tokens-file, writes OUT/output.safetensors (logits F32, input_ids, attention_mask) and,
with --dump-state-dict, OUT/state_dict.safetensors (the loaded state dict plus non-persistent
buffers, floating tensors as F32)."""

import argparse
import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--tokens-file", required=True)
    p.add_argument("--dtype", required=True, choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu", choices=("cpu",))
    p.add_argument("--out-dir", required=True)
    p.add_argument("--dump-state-dict", action="store_true")
    p.add_argument("--hidden-states", action="store_true", help="accepted for compatibility; not written")
    p.add_argument("--experts-implementation", help="passed to from_pretrained (5.x), e.g. eager")
    a = p.parse_args(argv)
    with open(os.path.join(a.model, "config.json"), encoding="utf-8") as f:
        trust = bool(json.load(f).get("auto_map"))
    extra = {"experts_implementation": a.experts_implementation} if a.experts_implementation else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, trust_remote_code=trust, dtype=DTYPES[a.dtype],
                                                              **extra)
    model.eval()
    with open(a.tokens_file, encoding="utf-8") as f:
        tok = json.load(f)
    ids = torch.tensor(tok["input_ids"], dtype=torch.int64)
    mask = torch.tensor(tok.get("attention_mask", [[1] * ids.shape[1]] * ids.shape[0]), dtype=torch.int64)
    pos = (mask.cumsum(-1) - 1).clamp(min=0) * mask
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    os.makedirs(a.out_dir, exist_ok=True)
    meta = {"producer": "tests/moe/tf_capture.py", "transformers": transformers.__version__, "dtype": a.dtype}
    save_file({"logits": logits.contiguous(), "input_ids": ids, "attention_mask": mask, "position_ids": pos},
              os.path.join(a.out_dir, "output.safetensors"), metadata=meta)
    if a.dump_state_dict:
        tensors = dict(model.state_dict())
        for name, buf in model.named_buffers():
            tensors.setdefault(name, buf)
        out = {n: (t.detach().float() if t.is_floating_point() else t.detach().long()).contiguous().clone()
               for n, t in tensors.items()}
        save_file(out, os.path.join(a.out_dir, "state_dict.safetensors"), metadata=meta)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
