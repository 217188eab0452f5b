"""Runtime shims: patches applied inside the capture process, in two stages.

Each shim repairs one version hazard (HAZARDS.md) the way a user would at runtime, without
editing the model's remote code:
  pre-load   patches the running transformers before the model is loaded (an import alias, a
             missing table entry, a wrapped method);
  post-load  repairs the loaded model before the forward pass (e.g. a buffer transformers left
             uninitialised).
A matrix cell names the shims it needs (`capture.py --shim NAME ...`, in any order: each runs in
its own stage) and every applied shim is recorded in the run's provenance with its stage and
what it did, so a passing cell always says which repairs it depended on. A shim that finds
nothing to repair says so in its record; a shim that cannot do its job raises.

To add a shim: write a function that patches the running transformers (pre-load: no
arguments) or the loaded model (post-load: the model) and returns a short string saying what it
did (or why nothing was needed), and decorate it with
`@shim("name", "hazard id", "one-line summary", stage="pre-load" | "post-load")`.
"""

import dataclasses
import functools

STAGES = ("pre-load", "post-load")


@dataclasses.dataclass(frozen=True)
class Shim:
    name: str
    hazard: str
    summary: str
    stage: str
    apply: object  # pre-load: () -> str; post-load: (model) -> str


SHIMS = {}

# What the installed shims did while the model was loading (filled by wrapped methods).
_EFFECTS = {}


_COUNTS = {}


def note_effect(name, text):
    _EFFECTS.setdefault(name, []).append(text)


def count_effect(name, what):
    key = (name, what)
    _COUNTS[key] = _COUNTS.get(key, 0) + 1


def effects():
    """{shim name: [what it did during loading, ...]} for the provenance."""
    out = {k: list(v) for k, v in _EFFECTS.items()}
    for (name, what), n in sorted(_COUNTS.items()):
        out.setdefault(name, []).append(f"{what}: {n}")
    return out


def shim(name, hazard, summary, stage="pre-load"):
    if stage not in STAGES:
        raise ValueError(f"shim '{name}': stage must be one of {STAGES}, got {stage!r}")

    def register(fn):
        if name in SHIMS:
            raise ValueError(f"shim '{name}' registered twice")
        SHIMS[name] = Shim(name, hazard, summary, stage, fn)
        return fn

    return register


def check_names(names):
    """Raises KeyError naming every unknown shim (before anything is applied)."""
    unknown = [n for n in names if n not in SHIMS]
    if unknown:
        raise KeyError(f"unknown shim(s) {unknown}; known: {sorted(SHIMS)}")


def apply_shims(names, stage="pre-load", model=None):
    """Applies the named shims of `stage`, in the order named; returns their provenance records.
    Shims of the other stage are skipped here (they run in their own stage)."""
    check_names(names)
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    records = []
    for name in names:
        s = SHIMS[name]
        if s.stage != stage:
            continue
        detail = s.apply() if stage == "pre-load" else s.apply(model)
        records.append({"name": s.name, "hazard": s.hazard, "stage": s.stage, "summary": s.summary, "detail": detail})
    return records


def _transformers_major():
    import transformers

    return int(transformers.__version__.split(".")[0])


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


# --- 5.x construction and loading hazards (pre-load) ----------------------------------------------


def _input_embedding_weight_name(model):
    """Qualified name of the input embedding matrix ("model.embed_tokens.weight")."""
    emb = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is emb:
            return f"{name}.weight" if name else "weight"
    raise RuntimeError(f"{type(model).__name__}: input embeddings not found among its modules")


@shim("tied-keys-dict", "H4", "turn a list-form _tied_weights_keys into the {target: source} dict 5.x expects")
def _tied_keys_dict():
    # 5.x reads `_tied_weights_keys` as {tied parameter: parameter it is tied to} in post_init
    # (and save_pretrained) and crashes on the 4.x list. post_init runs at the end of the model's
    # __init__, when the embedding is known, so the list is converted there, on the class.
    if _transformers_major() < 5:
        return "not needed: transformers 4.x expects the list form"
    from transformers import PreTrainedModel

    if getattr(PreTrainedModel.post_init, "_opensci_shim", False):
        return "already installed"
    original = PreTrainedModel.post_init

    @functools.wraps(original)
    def post_init(self, *args, **kwargs):
        cls = type(self)
        keys = cls.__dict__.get("_tied_weights_keys")
        if isinstance(keys, (list, tuple)):
            source = _input_embedding_weight_name(self)
            cls._tied_weights_keys = {k: source for k in keys}
            note_effect("tied-keys-dict", f"{cls.__name__}._tied_weights_keys {list(keys)} -> {cls._tied_weights_keys}")
        return original(self, *args, **kwargs)

    post_init._opensci_shim = True
    PreTrainedModel.post_init = post_init
    return "wrapped PreTrainedModel.post_init (list -> {name: input embedding weight}, on first construction)"


@shim("tie-default", "H5", "give configs without tie_word_embeddings the 4.x default (True) again")
def _tie_default():
    # 4.x PretrainedConfig defaulted tie_word_embeddings to True; 5.x reads
    # getattr(config, "tie_word_embeddings", False). A class-level default restores the 4.x
    # reading for configs that never set the attribute; configs that set it (every native 5.x
    # config, and any config.json with the key) keep their own value.
    if _transformers_major() < 5:
        return "not needed: transformers 4.x defaults tie_word_embeddings to True"
    import transformers

    base = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig
    if getattr(base, "tie_word_embeddings", None) is True:
        return f"{base.__name__}.tie_word_embeddings already defaults to True"
    base.tie_word_embeddings = True
    return f"set class default {base.__name__}.tie_word_embeddings = True"


@shim("guard-init", "H8", "never let _init_weights re-initialise a module whose parameters were all loaded")
def _guard_init():
    # 5.0/5.1 call the model's _init_weights on every module after loading; 4.x-style remote
    # code writes through `.data` and wipes the loaded weights. 5.2+ skip such modules; this
    # wrapper does the same on any version (loaded parameters carry `_is_hf_initialized` in 5.x;
    # in 4.x nothing is flagged and the wrapper changes nothing).
    from transformers import PreTrainedModel

    original = getattr(PreTrainedModel, "_initialize_weights", None)
    if original is None:
        return "PreTrainedModel has no _initialize_weights: nothing to guard"
    if getattr(original, "_opensci_shim", False):
        return "already installed"

    @functools.wraps(original)
    def _initialize_weights(self, module, *args, **kwargs):
        own = list(module.parameters(recurse=False))
        if own and all(getattr(p, "_is_hf_initialized", False) for p in own):
            module._is_hf_initialized = True
            count_effect("guard-init", f"skipped re-initialising loaded {type(module).__name__} modules")
            return None
        return original(self, module, *args, **kwargs)

    _initialize_weights._opensci_shim = True
    PreTrainedModel._initialize_weights = _initialize_weights
    return "wrapped PreTrainedModel._initialize_weights (skip modules whose own parameters are all loaded)"


# --- post-load ---------------------------------------------------------------------------------------


def config_inv_freq(config, dtype=None):
    """1/theta^(2i/d) from the config, in fp64 (theta: top-level rope_theta, what the model was
    trained with, else rope_parameters'; d: head_dim * partial_rotary_factor)."""
    import torch

    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * (getattr(config, "partial_rotary_factor", None) or 1.0))
    inv = 1.0 / float(theta) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return inv if dtype is None else inv.to(dtype)


def inv_freq_buffers(model):
    """(qualified name, owning module, buffer) for every buffer named inv_freq."""
    out = []
    for mod_name, module in model.named_modules():
        buf = module._buffers.get("inv_freq") if hasattr(module, "_buffers") else None
        if buf is not None:
            out.append((f"{mod_name}.inv_freq" if mod_name else "inv_freq", module, buf))
    return out


def max_rel_error(got, expected):
    import torch

    got = got.detach().to("cpu", torch.float64)
    if got.shape != expected.shape:
        return float("inf")
    err = ((got - expected).abs() / expected.abs()).max().item()
    return err if err == err else float("inf")  # NaN -> inf


@shim("recompute-inv-freq", "H3", "recompute every RoPE inv_freq buffer from the config after loading",
      stage="post-load")
def _recompute_inv_freq(model):
    # 5.x builds models on the meta device; non-persistent buffers of remote-code models come
    # back uninitialised and can hold finite, non-zero garbage. So no value is trusted or
    # "checked": every inv_freq buffer is overwritten from the config (plain RoPE), in place.
    import torch

    found = inv_freq_buffers(model)
    if not found:
        return "no inv_freq buffers: nothing to recompute"
    done = []
    for name, module, buf in found:
        config = getattr(module, "config", None) or model.config
        rope_type = getattr(module, "rope_type", "default")
        if rope_type != "default":
            raise RuntimeError(f"{name}: rope_type {rope_type!r}; this shim recomputes plain (default) RoPE only")
        expected = config_inv_freq(config)
        if tuple(buf.shape) != tuple(expected.shape):
            raise RuntimeError(f"{name}: buffer shape {tuple(buf.shape)} != config's {tuple(expected.shape)}")
        before = max_rel_error(buf, expected)
        with torch.no_grad():
            buf.copy_(expected.to(device=buf.device, dtype=buf.dtype))
            original = getattr(module, "original_inv_freq", None)
            if isinstance(original, torch.Tensor) and original is not buf and original.shape == buf.shape:
                original.copy_(buf)
        done.append(f"{name} (max rel error before: {before:.3g})")
    return f"recomputed {len(done)} buffer(s) from the config: " + ", ".join(done)
