#!/usr/bin/env python3
"""Record a capture directory as a golden fixture (fixtures/golden/<version>/<model>/<patch set>/).

Golden fixtures are real captures from transformers versions that CI cannot provision (no
network there); the matrix's "golden" provider replays them and judges them against the C++
reference like any live capture. This script is run by hand on a machine that has the version,
right after `opensci-compat capture`:

    python3 harness/python/golden.py --capture CAPDIR --out fixtures/golden/5.2.0/opensci-ref-published/hotfix \\
        --how "opensci-compat patch ... && opensci-compat capture ..." --source "transformers v5.2.0 (git tag, commit ...)"

Standard library only. It copies outcome.json, provenance.json, output.safetensors and
error.json as they are, and state_dict.safetensors trimmed to its small tensors (norm weights,
biases, RoPE inv_freq buffers: the evidence the diagnosis reads for H3 / H7 / H8) unless
--full-state-dict is given (needed where the evidence is a large matrix, e.g. an untied lm_head
for H5). It refuses tensors that are not float32/int64 and files over --max-bytes, and writes
golden.json: where the capture came from, how it was run, what was trimmed, sha256 of each file.
"""

import argparse
import datetime
import hashlib
import json
import os
import shutil
import struct
import sys

COPIED = ("outcome.json", "provenance.json", "output.safetensors", "error.json")


def read_safetensors(path):
    """(header dict without __metadata__, metadata dict, payload bytes)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        payload = f.read()
    meta = header.pop("__metadata__", {})
    return header, meta, payload


def write_safetensors(path, tensors, meta):
    """tensors: name -> (dtype, shape, bytes); names sorted, header padded to 8 bytes (the layout
    harness/python/capture.py and the C++ writer use)."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = meta
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def check_dtypes(path):
    header, _, _ = read_safetensors(path)
    bad = {k: v["dtype"] for k, v in header.items() if v["dtype"] not in ("F32", "I64")}
    if bad:
        raise SystemExit(f"{path}: golden tensors must be F32 (or I64 ids), found {bad}")


def trim_state_dict(src, dst, max_elements):
    header, meta, payload = read_safetensors(src)
    kept, dropped = {}, []
    for name, info in header.items():
        count = 1
        for d in info["shape"]:
            count *= d
        if count <= max_elements or name.endswith("inv_freq"):
            a, b = info["data_offsets"]
            kept[name] = (info["dtype"], info["shape"], payload[a:b])
        else:
            dropped.append(name)
    meta = dict(meta, golden_trimmed=f"tensors with more than {max_elements} elements dropped: {len(dropped)}")
    write_safetensors(dst, kept, meta)
    return sorted(kept), sorted(dropped)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--capture", required=True, help="capture dir written by opensci-compat capture")
    p.add_argument("--out", required=True, help="fixtures/golden/<version>/<model>/<patch set>")
    p.add_argument("--source", required=True, help="where this transformers came from (tag, commit, base env)")
    p.add_argument("--how", required=True, help="the commands that produced the capture")
    p.add_argument("--note", default="", help="anything a reader should know (e.g. the expected hazard)")
    p.add_argument("--full-state-dict", action="store_true", help="keep every tensor of state_dict.safetensors")
    p.add_argument("--max-elements", type=int, default=4096, help="trim: keep tensors up to this many elements")
    p.add_argument("--max-bytes", type=int, default=2_000_000, help="refuse a golden file larger than this")
    args = p.parse_args(argv)

    cap = args.capture
    outcome_path = os.path.join(cap, "outcome.json")
    if not os.path.exists(outcome_path):
        raise SystemExit(f"{cap}: no outcome.json (not a capture dir?)")
    with open(outcome_path, encoding="utf-8") as f:
        outcome = json.load(f)
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    files = {}
    for name in COPIED:
        src = os.path.join(cap, name)
        if os.path.exists(src):
            if name.endswith(".safetensors"):
                check_dtypes(src)
            shutil.copyfile(src, os.path.join(args.out, name))
    state = os.path.join(cap, "state_dict.safetensors")
    trimmed = None
    if os.path.exists(state):
        check_dtypes(state)
        dst = os.path.join(args.out, "state_dict.safetensors")
        if args.full_state_dict:
            shutil.copyfile(state, dst)
        else:
            kept, dropped = trim_state_dict(state, dst, args.max_elements)
            trimmed = {"kept": kept, "dropped": dropped,
                       "rule": f"tensors of more than {args.max_elements} elements dropped (inv_freq always kept); "
                               "the diagnosis compares only the tensors present"}
    for name in sorted(os.listdir(args.out)):
        path = os.path.join(args.out, name)
        size = os.path.getsize(path)
        if size > args.max_bytes:
            raise SystemExit(f"{path}: {size} bytes > --max-bytes {args.max_bytes}; golden fixtures stay toy-sized")
        files[name] = {"bytes": size, "sha256": sha256(path)}
    env = outcome.get("environment", {})
    record = {
        "_about": "A real capture replayed by the matrix's golden provider. Produced by harness/python/golden.py.",
        "recorded_at_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "status": outcome.get("status"),
        "detail": outcome.get("detail"),
        "shims": outcome.get("shims", []),
        "environment": env,
        "source": args.source,
        "how": args.how,
        "note": args.note,
        "state_dict": "full" if args.full_state_dict else ("trimmed" if trimmed else "none"),
        "state_dict_trimmed": trimmed,
        "files": files,
    }
    with open(os.path.join(args.out, "golden.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    total = sum(v["bytes"] for v in files.values())
    print(f"{args.out}: {len(files)} files, {total} bytes, status {outcome.get('status')}, "
          f"transformers {env.get('transformers')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
