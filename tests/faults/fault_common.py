"""Shared pieces of the fault-injection capture scripts: each tests/faults/<case>/capture.py
stands in for harness/python/capture.py (same command line) and misbehaves in one way, so the
C++ side can prove that no misbehaviour is ever judged a pass. Stdlib only."""
import argparse
import json
import os
import struct


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--out-dir", required=True)
    p.add_argument("--tokens-file", required=True)
    args, _ = p.parse_known_args()
    return args


def read_tokens(path):
    with open(path) as f:
        j = json.load(f)
    ids = j["input_ids"]
    mask = j.get("attention_mask") or [[1] * len(r) for r in ids]
    pos = []
    for row in mask:
        run, out = 0, []
        for m in row:
            out.append(run if m else 0)
            run += 1 if m else 0
        pos.append(out)
    return ids, mask, pos


def write_safetensors(path, tensors):
    """tensors: name -> (dtype 'F32'|'I64', shape, flat values)."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        dtype, shape, values = tensors[name]
        fmt = "<%d%s" % (len(values), "f" if dtype == "F32" else "q")
        blob = struct.pack(fmt, *values)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * ((8 - (8 + len(text)) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def write_output(out_dir, tokens_file, vocab, logit):
    """A well-formed output.safetensors for the requested batch whose logits are all `logit`."""
    ids, mask, pos = read_tokens(tokens_file)
    b, s = len(ids), len(ids[0])
    flat = lambda m: [v for row in m for v in row]
    write_safetensors(os.path.join(out_dir, "output.safetensors"), {
        "logits": ("F32", [b, s, vocab], [logit] * (b * s * vocab)),
        "input_ids": ("I64", [b, s], flat(ids)),
        "attention_mask": ("I64", [b, s], flat(mask)),
        "position_ids": ("I64", [b, s], flat(pos)),
    })
