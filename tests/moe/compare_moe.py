#!/usr/bin/env python3
"""Comparisons of the MoE check (tests/moe/check_transformers.sh). Runs inside the rootfs that
holds torch + safetensors. Each subcommand prints one PASS/FAIL line with its figures and exits
non-zero on failure.

  tensors-equal DIR_A DIR_B
      Two checkpoint directories (HF: model.safetensors or an index; Megatron: mp_rank_XX/)
      hold the same tensor names, dtypes and shapes, and every tensor's bytes are equal.
  state-dict STATE_DICT CKPT_DIR
      transformers' loaded state dict (capture.py --dump-state-dict: every floating tensor as
      F32) equals the checkpoint bit for bit: each checkpoint tensor, upcast to F32 when stored
      in BF16/F16 (exact), has identical bytes under the same name. State-dict entries the
      checkpoint lacks must be explained: a tied lm_head.weight equal to the embeddings, or a
      non-persistent buffer (listed).
  logits A B [--tol T] [--exact]
      Two forward outputs (capture.py / opensci-compat forward: 'logits' [b, s, V] F32 and
      'attention_mask'): over the positions both masks mark as tokens, max |dlogit| <= T
      (or == 0 with --exact) and the argmax is identical at every position.
"""

import argparse
import glob
import json
import os
import sys

import torch
from safetensors import safe_open


def checkpoint_tensors(directory):
    """name -> (file, name) for an HF directory or a Megatron one (names prefixed 'mp_rank_XX/')."""
    ranks = sorted(glob.glob(os.path.join(directory, "mp_rank_[0-9][0-9]")))
    parts = [(os.path.basename(r) + "/", r) for r in ranks] or [("", directory)]
    out = {}
    for prefix, d in parts:
        index = os.path.join(d, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        for fn in files:
            with safe_open(os.path.join(d, fn), framework="pt") as f:
                for name in f.keys():
                    if prefix + name in out:
                        raise SystemExit(f"FAIL {directory}: tensor {prefix + name} appears in two shards")
                    out[prefix + name] = os.path.join(d, fn)
    return out


def load(path, name):
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(name)


def raw_bytes(t):
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def cmd_tensors_equal(a, b):
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    if set(ta) != set(tb):
        only_a, only_b = sorted(set(ta) - set(tb)), sorted(set(tb) - set(ta))
        print(f"FAIL tensors-equal {a} vs {b}: names differ; only in A: {only_a[:8]}, only in B: {only_b[:8]}")
        return 1
    total = 0
    for name in sorted(ta):
        x, y = load(ta[name], name.split("/")[-1]), load(tb[name], name.split("/")[-1])
        if x.dtype != y.dtype or list(x.shape) != list(y.shape):
            print(f"FAIL tensors-equal: '{name}' is {x.dtype} {list(x.shape)} in A, {y.dtype} {list(y.shape)} in B")
            return 1
        if raw_bytes(x) != raw_bytes(y):
            print(f"FAIL tensors-equal: '{name}' {x.dtype} {list(x.shape)} differs in its bytes between {a} and {b}")
            return 1
        total += x.numel() * x.element_size()
    print(f"PASS tensors-equal {a} == {b}: {len(ta)} tensors, {total} bytes, byte-identical")
    return 0


def cmd_state_dict(state_dict_path, ckpt_dir):
    ck = checkpoint_tensors(ckpt_dir)
    with safe_open(state_dict_path, framework="pt") as f:
        sd_names = set(f.keys())
    compared, total = 0, 0
    for name in sorted(ck):
        if name not in sd_names:
            print(f"FAIL state-dict: checkpoint tensor '{name}' is not in transformers' state dict ({state_dict_path})")
            return 1
        ours, theirs = load(ck[name], name), load(state_dict_path, name)
        if list(ours.shape) != list(theirs.shape):
            print(f"FAIL state-dict: '{name}' has shape {list(ours.shape)} in {ckpt_dir}, "
                  f"{list(theirs.shape)} in transformers' state dict")
            return 1
        ours32 = ours.to(torch.float32)  # exact for F32/BF16/F16
        if raw_bytes(ours32) != raw_bytes(theirs):
            diff = (ours32 - theirs).abs().max().item()
            print(f"FAIL state-dict: '{name}' {list(ours.shape)} differs from transformers' loaded tensor "
                  f"(max |d| {diff:.3e})")
            return 1
        compared += 1
        total += ours.numel()
    extra = sorted(sd_names - set(ck))
    explained = []
    for name in extra:
        if name == "lm_head.weight" and "model.embed_tokens.weight" in ck:
            if raw_bytes(load(state_dict_path, name)) != raw_bytes(load(state_dict_path, "model.embed_tokens.weight")):
                print("FAIL state-dict: extra lm_head.weight is not the (tied) embedding matrix")
                return 1
            explained.append("lm_head.weight (tied to the embeddings)")
        elif name.endswith("inv_freq"):
            explained.append(f"{name} (non-persistent buffer)")
        else:
            print(f"FAIL state-dict: transformers holds '{name}', which {ckpt_dir} lacks")
            return 1
    print(f"PASS state-dict {state_dict_path} == {ckpt_dir}: {compared} tensors ({total} values) bit-identical; "
          f"extra in the state dict: {len(explained)} [{'; '.join(explained[:4])}{' ...' if len(explained) > 4 else ''}]")
    return 0


def cmd_logits(a, b, tol, exact):
    la, lb = load(a, "logits").to(torch.float64), load(b, "logits").to(torch.float64)
    ma, mb = load(a, "attention_mask"), load(b, "attention_mask")
    if la.shape != lb.shape or not torch.equal(ma, mb):
        print(f"FAIL logits: {a} {list(la.shape)} and {b} {list(lb.shape)} are not the same batch (shape or mask)")
        return 1
    keep = ma.bool()
    xa, xb = la[keep], lb[keep]  # [tokens, V]
    diff = (xa - xb).abs().max().item()
    arg_a, arg_b = xa.argmax(-1), xb.argmax(-1)
    argmax_same = bool(torch.equal(arg_a, arg_b))
    limit = 0.0 if exact else tol
    ok = diff <= limit and argmax_same
    print(f"{'PASS' if ok else 'FAIL'} logits {os.path.basename(os.path.dirname(a)) or a}/{os.path.basename(a)} vs "
          f"{os.path.basename(os.path.dirname(b)) or b}/{os.path.basename(b)}: max|dlogit| = {diff:.3e} "
          f"(limit {limit:g}) over {int(keep.sum())} token positions, argmax identical: {argmax_same}")
    return 0 if ok else 1


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("tensors-equal")
    s.add_argument("a")
    s.add_argument("b")
    s = sub.add_parser("state-dict")
    s.add_argument("state_dict")
    s.add_argument("checkpoint")
    s = sub.add_parser("logits")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--tol", type=float, default=1e-4)
    s.add_argument("--exact", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "tensors-equal":
        return cmd_tensors_equal(args.a, args.b)
    if args.cmd == "state-dict":
        return cmd_state_dict(args.state_dict, args.checkpoint)
    return cmd_logits(args.a, args.b, args.tol, args.exact)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
