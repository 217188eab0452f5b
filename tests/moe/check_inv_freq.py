#!/usr/bin/env python3
"""H3 immunity of remote code: load MODEL_DIR with transformers (trust_remote_code, fp32, CPU),
run TOKENS_FILE, then overwrite every `inv_freq` buffer with garbage (finite, non-zero: what 5.x
can leave in a recreated non-persistent buffer) and run again. The logits must be bit-identical:
the rotary embedding has to compute its frequencies from the config, not read the buffer.
Also reports how far the buffer transformers left after loading is from 1/theta^(2i/d)."""

import json
import sys

import torch
import transformers


def main(model_dir, tokens_file):
    with open(tokens_file, encoding="utf-8") as f:
        tokens = json.load(f)
    inputs = {k: torch.tensor(v, dtype=torch.int64) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32)
    model.eval()
    buffers = [(n, b) for n, b in model.named_buffers() if n.endswith("inv_freq")]
    if not buffers:
        print(f"FAIL inv-freq {model_dir}: no inv_freq buffer to poison (nothing proven)")
        return 1
    cfg = model.config
    expected = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    loaded_dev = max((b.to(torch.float64).cpu() - expected).abs().max().item() for _, b in buffers)
    with torch.inference_mode():
        clean = model(**inputs).logits.clone()
        gen = torch.Generator().manual_seed(1234)
        for _, b in buffers:
            b.copy_(torch.rand(b.shape, generator=gen) * 3 + 0.1)
        poisoned = model(**inputs).logits
    same = torch.equal(clean, poisoned)
    print(f"{'PASS' if same else 'FAIL'} inv-freq {model_dir} (transformers {transformers.__version__}): logits "
          f"{'bit-identical' if same else 'CHANGED'} after filling {len(buffers)} inv_freq buffer(s) with garbage "
          f"(max |d| {(clean - poisoned).abs().max().item():.3e}); the buffer as loaded deviates from "
          f"1/theta^(2i/d) by up to {loaded_dev:.3e}")
    return 0 if same else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: check_inv_freq.py MODEL_DIR TOKENS_FILE")
    sys.exit(main(sys.argv[1], sys.argv[2]))
