#!/usr/bin/env python3
"""Writes a directory laid out like a published open-sci-ref model on the Hub: config.json with
the published 1.7B shape (bf16, no tie_word_embeddings key, as the published config class relies
on the 4.x default), the published-style remote code, the weights in two safetensors shards with
model.safetensors.index.json. Payloads are sparse (holes read as zeros), so the 3.4 GB the headers
describe take no disk: toyify reads headers only.

  make_published_like.py --out DIR [--remote-code fixtures/remote_code/opensci_ref_published]
                         [--variant published|renamed-extra]
"""
import argparse
import json
import os
import shutil
import struct

P = argparse.ArgumentParser()
P.add_argument("--out", required=True)
P.add_argument("--remote-code", default=os.path.join(os.path.dirname(__file__), "../../fixtures/remote_code/opensci_ref_published"))
P.add_argument("--variant", default="published", choices=["published", "renamed-extra"])
P.add_argument("--layers", type=int, default=24, help="fewer layers of the same shape (quicker to hash on a test Hub)")
a = P.parse_args()

H, L, A, D, F, V = 2048, a.layers, 32, 64, 8192, 50304
config = {
    "_name_or_path": "open-sci/open-sci-ref-v0.01-1.7b-nemotron-hq-1T-16384",
    "architectures": ["OpensciForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_opensci.OpensciConfig",
        "AutoModel": "modeling_opensci.OpensciModel",
        "AutoModelForCausalLM": "modeling_opensci.OpensciForCausalLM",
    },
    "bos_token_id": 0,
    "eos_token_id": 0,
    "head_dim": D,
    "hidden_act": "silu",
    "hidden_size": H,
    "initializer_range": 0.02,
    "intermediate_size": F,
    "max_position_embeddings": 4096,
    "mlp_bias": True,
    "model_type": "opensci",
    "num_attention_heads": A,
    "num_hidden_layers": L,
    "num_key_value_heads": A,
    "pretraining_tp": 1,
    "qk_layernorm": True,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.48.3",
    "use_cache": True,
    "vocab_size": V,
}
tensors = {"model.embed_tokens.weight": [V, H], "model.norm.weight": [H]}
for l in range(L):
    p = f"model.layers.{l}."
    tensors[p + "input_layernorm.weight"] = [H]
    tensors[p + "post_attention_layernorm.weight"] = [H]
    for proj, shape in (("q_proj", [A * D, H]), ("k_proj", [A * D, H]), ("v_proj", [A * D, H]), ("o_proj", [H, A * D])):
        tensors[p + f"self_attn.{proj}.weight"] = shape
        tensors[p + f"self_attn.{proj}.bias"] = [shape[0]]
    tensors[p + "self_attn.q_layernorm.weight"] = [D]
    tensors[p + "self_attn.k_layernorm.weight"] = [D]
    for proj, shape in (("gate_proj", [F, H]), ("up_proj", [F, H]), ("down_proj", [H, F])):
        tensors[p + f"mlp.{proj}.weight"] = shape
        tensors[p + f"mlp.{proj}.bias"] = [shape[0]]
if a.variant == "renamed-extra":
    # An exporter that persisted the RoPE buffer and kept an extra per-layer tensor.
    for l in range(L):
        tensors[f"model.layers.{l}.self_attn.rotary_emb.inv_freq"] = [D // 2]

os.makedirs(a.out, exist_ok=True)
for f in os.listdir(a.remote_code):
    if f.endswith(".py"):
        shutil.copy(os.path.join(a.remote_code, f), os.path.join(a.out, f))
with open(os.path.join(a.out, "config.json"), "w") as f:
    json.dump(config, f, indent=2)

names = sorted(tensors)
half = len(names) // 2
shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
weight_map, total = {}, 0
for shard, members in shards.items():
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for n in members:
        dtype = "F32" if n.endswith("inv_freq") else "BF16"
        size = (4 if dtype == "F32" else 2)
        for s in tensors[n]:
            size *= s
        header[n] = {"dtype": dtype, "shape": tensors[n], "data_offsets": [offset, offset + size]}
        offset += size
        weight_map[n] = shard
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(os.path.join(a.out, shard), "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)  # sparse payload
    total += offset
with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
print(f"wrote {a.out}: {len(names)} tensors in 2 shards ({total / 1e9:.2f} GB, sparse)")
