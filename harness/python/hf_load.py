"""Loading a model directory with transformers the way users do, across 4.48 ... 5.x.

Shared by capture.py and bench_forward.py. Runs inside an isolated environment: stdlib, torch
and transformers (with its own dependencies, e.g. numpy) only. torch and transformers are
imported inside the functions so that the caller decides when an import failure happens and
can attribute it to its "import" stage.
"""

import json
import os
import platform
import re
import sys

DTYPES = ("float32", "bfloat16", "float64")


def version_tuple(version):
    """'4.56.0.dev0' -> (4, 56, 0): the leading numeric components."""
    parts = []
    for piece in version.split("+")[0].split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):  # '0rc1': a pre-release tail ends the numeric part
            break
    return tuple(parts)


def library_versions():
    import torch
    import transformers

    try:
        import numpy

        numpy_version = numpy.__version__
    except ImportError:
        numpy_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        # Which torch: a Debian package of a base rootfs (/usr/lib/python3/dist-packages) or a
        # wheel from the index in the venv (the environment's manifest says where it came from).
        "torch_file": getattr(torch, "__file__", None),
        "transformers": transformers.__version__,
        "transformers_file": getattr(transformers, "__file__", None),
        "numpy": numpy_version,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "executable": sys.executable,
        # Where the dependencies came from matters for overlay environments (a transformers
        # source tree + pure-Python dependencies first on the path): record what was imported,
        # its distribution metadata (None = importable without metadata, so transformers'
        # import-time pin check skipped it), and the pins transformers checked.
        "dependencies": {name: _module_record(name) for name in ("huggingface_hub", "tokenizers", "safetensors")},
        "transformers_pins": _transformers_pins(("tokenizers", "huggingface-hub", "safetensors")),
    }


def _module_record(name):
    import importlib
    import importlib.metadata

    try:
        module = importlib.import_module(name)
    except Exception as e:  # not installed, or broken: both are facts worth recording
        return {"importable": False, "error": f"{type(e).__name__}: {e}"}
    try:
        metadata_version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        metadata_version = None
    return {"importable": True, "version": getattr(module, "__version__", None),
            "metadata_version": metadata_version, "file": getattr(module, "__file__", None)}


def _transformers_pins(names):
    try:
        from transformers.dependency_versions_table import deps
    except Exception:
        return None
    return {n: deps.get(n) for n in names}


def read_config_json(model_dir):
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def needs_remote_code(config_json):
    """A config with an auto_map is served by the remote code next to it."""
    return bool(config_json.get("auto_map"))


def load_config(model_dir, trust_remote_code):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code, local_files_only=True)


def load_model(model_dir, dtype, device, attn_impl, trust_remote_code):
    """AutoModelForCausalLM.from_pretrained with an explicit dtype (hazard H6: 5.x would otherwise
    take the checkpoint's dtype, 4.x fp32), moved to `device`, in eval mode.

    attn_impl "default" passes nothing, so the version's own default is what gets measured.
    Returns (model, the from_pretrained keyword arguments used, as strings)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    # `torch_dtype` was renamed `dtype` in 4.56 (the old name warns from then on).
    dtype_key = "dtype" if version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
    kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": True, dtype_key: getattr(torch, dtype)}
    if attn_impl != "default":
        kwargs["attn_implementation"] = attn_impl
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    # A tensor still on the meta device was neither loaded nor initialised (measured: 5.3.0 leaves
    # a tied lm_head there when the checkpoint has no lm_head.weight, H17). Name it, instead of
    # torch's "Cannot copy out of meta tensor" from .to() below.
    meta = [n for n, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
            if t.device.type == "meta"]
    if meta:
        raise RuntimeError(f"from_pretrained left {len(meta)} tensor(s) on the meta device (neither loaded from "
                           f"the checkpoint nor initialised): {', '.join(meta[:8])}")
    model = model.to(device).eval()
    return model, {k: str(v) for k, v in kwargs.items()}
