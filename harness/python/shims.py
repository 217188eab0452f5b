"""Runtime shims: patches applied inside the capture process before a model is loaded.

Each shim repairs one version hazard (HAZARDS.md) the way a user would at runtime, without
editing the model's remote code. A matrix cell names the shims it needs (`capture.py --shim
NAME ...`) and each applied shim is recorded in the run's provenance, so a passing cell always
says which repairs it depended on.

To add a shim: write a function that patches the running transformers and returns a short
string saying what it did (or why nothing was needed), and decorate it with
`@shim("name", "hazard id", "one-line summary")`.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Shim:
    name: str
    hazard: str
    summary: str
    apply: object  # () -> str


SHIMS = {}


def shim(name, hazard, summary):
    def register(fn):
        if name in SHIMS:
            raise ValueError(f"shim '{name}' registered twice")
        SHIMS[name] = Shim(name, hazard, summary, fn)
        return fn

    return register


def apply_shims(names):
    """Applies the named shims in order; returns their provenance records."""
    unknown = [n for n in names if n not in SHIMS]
    if unknown:
        raise KeyError(f"unknown shim(s) {unknown}; known: {sorted(SHIMS)}")
    records = []
    for name in names:
        s = SHIMS[name]
        records.append({"name": s.name, "hazard": s.hazard, "summary": s.summary, "detail": s.apply()})
    return records


@shim("kwargs-alias", "H1", "make TransformersKwargs and LossKwargs both importable from transformers.utils")
def _kwargs_alias():
    # <= 4.53 defines only LossKwargs, >= 4.54 only TransformersKwargs (both TypedDicts meant for
    # `Unpack[...]` annotations), so one can stand in for the other. Remote code imports them from
    # transformers.utils or from transformers.utils.generic; patch both modules.
    import transformers.utils
    import transformers.utils.generic

    modules = (transformers.utils, transformers.utils.generic)
    present = {n: getattr(m, n) for m in modules for n in ("TransformersKwargs", "LossKwargs") if hasattr(m, n)}
    if not present:
        raise RuntimeError("transformers defines neither TransformersKwargs nor LossKwargs; nothing to alias")
    source = "TransformersKwargs" if "TransformersKwargs" in present else "LossKwargs"
    added = []
    for m in modules:
        for n in ("TransformersKwargs", "LossKwargs"):
            if not hasattr(m, n):
                setattr(m, n, present[source])
                added.append(f"{m.__name__}.{n}")
    return f"aliased {', '.join(added)} to {source}" if added else "both names already present"


def _default_rope_parameters(config=None, device=None, seq_len=None, **rope_kwargs):
    """The 4.x 'default' RoPE init: inv_freq = 1 / theta^(arange(0, d, 2) / d) in fp32, attention
    factor 1.0. Same signature as 4.x (the config may be None with `base` and `dim` given as
    keywords, as very old callers did); `seq_len` is unused for plain RoPE."""
    import torch

    if config is None:
        base, dim = rope_kwargs["base"], rope_kwargs["dim"]
    else:
        # 4.x read config.rope_theta; a 5.x config may keep theta only in rope_parameters.
        base = getattr(config, "rope_theta", None)
        if base is None:
            params = getattr(config, "rope_parameters", None) or {}
            layer_type = rope_kwargs.get("layer_type")
            base = (params[layer_type] if layer_type else params).get("rope_theta", 10000.0)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    return 1.0 / (base**exponent), 1.0


@shim("rope-default", "H2", "put the 4.x 'default' entry back into ROPE_INIT_FUNCTIONS")
def _rope_default():
    from transformers import modeling_rope_utils

    table = modeling_rope_utils.ROPE_INIT_FUNCTIONS
    if "default" in table:
        return "ROPE_INIT_FUNCTIONS already has 'default'"
    table["default"] = _default_rope_parameters
    return "added ROPE_INIT_FUNCTIONS['default'] (inv_freq = 1/theta^(arange(0,d,2)/d), factor 1.0)"
