"""One registry for every model: BST variants and the paper's baselines, by name and size.

    import blockstate
    blockstate.list_models()                        # ['bst-sh-s4', ..., 'gpt', 'slide', 'transformer-xl', ...]
    model = blockstate.create_model("bst-sh-s4", size="tiny", vocab_size=8192)   # overrides: config fields
    config = blockstate.model_config("slide", size="paper")                      # the config alone

Names: ``bst-{sh,mh,mf}-{s4,unstructured,explicit}`` (``s4`` = the S4D kernel), ``gpt`` (full causal attention),
``slide`` (sliding window W, keys/values carried), ``transformer-xl`` (window = half a training segment, carried),
``brect`` (Block-Recurrent Transformer, Rec:fixed:skip), ``gss-hybrid`` (gated state spaces + block attention).
Sizes: ``tiny``, ``small``, ``paper`` (``blockstate.models.SIZES``). At every size the baselines' budget knobs
(FFN width, GSS widths and depth) are tuned so each lands within 5% of ``bst-sh-s4``; at paper size Slide is
~190M and Rec:fixed:skip ~196M, the paper's figures. ``blockstate models`` prints the table. An unknown name
raises ValueError listing the known ones. Every model is a ``PreTrainedModel`` loadable with
``AutoModelForCausalLM`` whose ``forward(input_ids, labels=None, ...)`` returns fp32 ``logits`` (B, L, V) and,
with labels, the mean next-token ``loss`` (labels are the input ids, shifted inside; -100 is ignored).

Carrying state across training segments (the one interface the trainer uses)
--------------------------------------------------------------------------
Every model has ``carries_state: bool`` (read it on the instance, or with ``carries_state(model)``, which also
looks through DDP/FSDP wrappers). For a model that carries state::

    out = model(input_ids, labels=labels, carry=carry, reset=reset, carry_length=None)
    carry = out.carry          # pass it with the row's next segment

- ``carry``: the ``out.carry`` of the previous segment of the same rows, or None to start fresh. It is a
  ``SegmentCarry`` (a NamedTuple of tuples of tensors, batch on dim 0), already detached: no gradient flows
  across segments. Treat it as opaque; ``map_carry(fn, carry)`` applies ``fn`` to every tensor (``.to(device)``,
  selecting rows). DDP moves it like any other input.
- ``reset``: optional BoolTensor (B,), True where the row's segment starts a new document; that row runs as if
  ``carry`` were None (its carry is dropped), exactly.
- ``carry_length``: optional int; the returned carry is the state after the first ``carry_length`` tokens (the
  rest of the segment still runs, from that state). The data pipeline's default ``overlap=1`` repeats a segment's
  last token as the next one's first, so pass ``L - 1`` there; with ``overlap=0`` leave it None.
- ``out`` is a ``SegmentLMOutput`` (a ``CausalLMOutput``) with the extra field ``carry``.

What is carried, and what agrees with one long pass: Slide and Transformer-XL carry each layer's last W
keys/values, so a segment continued from the carry equals the same tokens at the end of one long sequence
(sliding attention is relative, so this holds at any offset). BRecT also carries its recurrent state; it walks
blocks in order, so the continuation is exact when segments (and ``carry_length``) are multiples of W. A carry
must hold W positions: a row that has seen fewer than W tokens cannot be continued (ValueError), only reset.
Models that carry nothing (``bst-*``, ``gpt``, ``gss-hybrid``) accept ``carry``/``reset`` as keywords and
ignore them; read ``getattr(out, "carry", None)``.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from blockstate.models import SIZES, BlockStateConfig, BlockStateForCausalLM, preset_config
from blockstate.models.baselines import (
    BlockRecurrentForCausalLM,
    BlockTransformerForCausalLM,
    GatedStateSpaceForCausalLM,
)
from blockstate.models.configuration_baselines import (
    FULL_ATTENTION,
    BlockRecurrentConfig,
    BlockTransformerConfig,
    GatedStateSpaceConfig,
)
from blockstate.models.presets import size_fields
from blockstate.models.stateful import SegmentCarry, SegmentLMOutput, map_carry

REFERENCE_MODEL = "bst-sh-s4"  # the budget every baseline is matched to, size by size
KERNEL_NAMES = {"s4": "s4d", "unstructured": "unstructured", "explicit": "explicit"}

# The paper's reported sizes at its ~200M setting (Table 1; Slide:12L, Trsf-XL:2048 and Rec:fixed:skip from its
# baselines), for the models it reported one for: ``blockstate models`` prints them beside the counts.
PAPER_PARAMETERS = {"bst-sh-s4": 202e6, "bst-mh-s4": 218e6, "bst-mf-s4": 217e6, "bst-sh-unstructured": 206e6,
                    "bst-mf-unstructured": 221e6, "slide": 190e6, "transformer-xl": 190e6, "brect": 196e6}

# Budget knobs per size, tuned so each baseline lands within 5% of bst-sh-s4 (tests/test_registry.py checks it).
ATTENTION_FFN = {"tiny": 1280, "small": 1856, "paper": 4352}  # gpt / slide / transformer-xl: paper Slide 190.1M
BRECT_FFN = {"tiny": 1024, "small": 1600, "paper": 4224}  # paper Rec:fixed:skip 196.4M (S = W = 512 states)
GSS = {  # paper size is the GSS paper's own layer (F = 4E, H = E/4, N = 512 DSS modes) at 16 layers; the smaller
    # sizes keep 4/3 the BST depth, H = D/4 and N = 512, and narrow F to the budget
    "tiny": dict(num_hidden_layers=6, gss_hidden_size=832, gss_narrow_size=64),
    "small": dict(num_hidden_layers=12, gss_hidden_size=1216, gss_narrow_size=96),
    "paper": dict(num_hidden_layers=16, gss_hidden_size=4096, gss_narrow_size=256),
}


# The preset chosen by ``blockstate ablate`` on books (README, "Long context on books"): the paper's layout of BST
# layers, each BST layer's FFN a GLU gated by its SSM output (``ssm_residual="ffn"``, beyond the paper), blocks that
# also attend to the previous block, and the FFN width matched to bst-sh-s4's parameter count at every size. The
# paper's configurations keep their names.
TUNED = {"sh": "s4"}  # variant -> kernel of the registered ``bst-<variant>-<kernel>-gated`` presets (MF: no gain)
TUNED_SETTINGS: dict[str, Any] = {"ssm_residual": "ffn", "attend_previous_block": True}


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: ``config(size, **overrides)`` builds its config, ``model_class(config)`` the model."""

    name: str
    description: str
    config: Callable[..., PretrainedConfig]
    model_class: type[PreTrainedModel]
    paper_parameters: float | None = None  # the paper's figure at its ~200M setting, where it reported one


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, config: Callable[..., PretrainedConfig], model_class: type[PreTrainedModel],
                   description: str = "", paper_parameters: float | None = None, replace: bool = False) -> ModelEntry:
    """Add a model under ``name``; ``config(size: str, **overrides)`` must return its config."""
    if name in _REGISTRY and not replace:
        raise ValueError(f"model {name!r} is already registered (pass replace=True to replace it)")
    entry = ModelEntry(name, description, config, model_class, paper_parameters)
    _REGISTRY[name] = entry
    return entry


def list_models() -> list[str]:
    """Every registered name, in registration order (BST variants first, then the baselines)."""
    return list(_REGISTRY)


def _normalise(name: str) -> str:
    name = str(name).strip().lower().replace("_", "-")
    return name[:-1] if name.startswith("bst-") and name.endswith("-s4d") else name


def get_model_entry(name: str) -> ModelEntry:
    """The entry of ``name`` (case-insensitive, ``_`` = ``-``, ``s4d`` = ``s4``); ValueError listing known names."""
    key = _normalise(name)
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; known models: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


# Attributes every Hugging Face config understands although no blockstate __init__ names them (token ids, cache)
HF_FIELDS = frozenset({"pad_token_id", "bos_token_id", "eos_token_id", "use_cache", "output_attentions",
                       "tie_word_embeddings", "torch_dtype", "dtype", "name_or_path", "registry_name"})


@functools.cache
def known_fields(config_class: type[PretrainedConfig]) -> frozenset[str]:
    """The config fields ``config_class`` reads: the named parameters of every ``__init__`` in its MRO, the
    attributes of a default instance, and ``HF_FIELDS``."""
    names = set(HF_FIELDS)
    for klass in config_class.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names |= {n for n, p in inspect.signature(init).parameters.items()
                      if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    try:
        names |= set(config_class().to_dict())
    except (TypeError, ValueError):  # a config without defaults: its signatures are enough
        pass
    return frozenset(names)


def check_overrides(name: str, config_class: type[PretrainedConfig], overrides: dict[str, Any],
                    where: str = "override") -> None:
    """ValueError for a key of ``overrides`` that ``config_class`` does not know, with the closest known field.

    Hugging Face configs store unknown keyword arguments silently, so a misspelt override (``hiden_size=64``)
    would otherwise train the default model and only leave the typo in config.json. Only the user-facing entry
    points check (this registry, ``--model-arg``, YAML ``model_args``); ``from_pretrained`` of a saved config
    is left alone, since HF passes it extra keys of its own."""
    known = known_fields(config_class)
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = (f": did you mean {close[0]!r}?" if close else
                    f"; its fields are {', '.join(sorted(k for k in known if not k.startswith('_')))}")
            raise ValueError(f"unknown {where} {key!r} for model {name} ({config_class.__name__} has no such "
                             f"field){hint}")


def model_config(name: str, size: str = "tiny", **overrides: Any) -> PretrainedConfig:
    """The config of ``name`` at ``size``; keyword overrides (config fields) win over the preset. An override
    that is not a field of the model's config is a ValueError naming the closest field."""
    entry = get_model_entry(name)
    config = entry.config(size, **overrides)
    check_overrides(entry.name, type(config), overrides, "config field")
    config.registry_name = entry.name  # saved with the model, so reports can name what they load
    return config


def create_model(name: str, size: str = "tiny", **overrides: Any) -> PreTrainedModel:
    """A freshly initialised model (seed torch first for a reproducible init)."""
    entry = get_model_entry(name)
    return entry.model_class(model_config(name, size, **overrides))


def _meta_model(name: str, size: str, **overrides: Any) -> PreTrainedModel:
    entry = get_model_entry(name)
    config = model_config(name, size, **overrides)
    with torch.device("meta"):  # shapes only: no memory, even at paper size
        return entry.model_class(config)


def count_model_parameters(name: str, size: str = "tiny", **overrides: Any) -> int:
    """Distinct parameters (tied embeddings once), counted on the meta device."""
    return sum(p.numel() for p in _meta_model(name, size, **overrides).parameters())


def parameter_table(names: list[str] | None = None, sizes: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per model: parameters per size, the ratio to bst-sh-s4 at that size, the paper's figure."""
    sizes = list(sizes or SIZES)
    reference = {size: count_model_parameters(REFERENCE_MODEL, size) for size in sizes}
    rows = []
    for name in names or list_models():
        entry = get_model_entry(name)
        models = {size: _meta_model(entry.name, size) for size in sizes}
        params = {size: sum(p.numel() for p in m.parameters()) for size, m in models.items()}
        rows.append(dict(name=entry.name, description=entry.description,
                         carries_state=any(carries_state(m) for m in models.values()), parameters=params,
                         ratio={size: params[size] / reference[size] for size in sizes},
                         paper=entry.paper_parameters))
    return rows


def model_name(config: PretrainedConfig) -> str | None:
    """The registry name of a (loaded) config: the one ``model_config`` recorded, else inferred for BST configs."""
    name = getattr(config, "registry_name", None)
    if name:
        return name
    if type(config) is BlockStateConfig:
        kernel = {v: k for k, v in KERNEL_NAMES.items()}[config.kernel]
        return f"bst-{config.variant}-{kernel}"
    return None


def carries_state(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the model inside a DDP / FSDP wrapper) carries state across segments."""
    return bool(getattr(getattr(model, "module", model), "carries_state", False))


# -- presets ----------------------------------------------------------------------------------------------------
def _bst(variant: str, kernel: str) -> Callable[..., PretrainedConfig]:
    def build(size: str, **overrides: Any) -> BlockStateConfig:
        return preset_config(size, variant, kernel, **overrides)

    return build


def _bst_gated(variant: str, short: str) -> Callable[..., PretrainedConfig]:
    """``bst-<variant>-<short>`` with the ``TUNED`` settings and the FFN matched to bst-sh-s4's count."""
    kernel = KERNEL_NAMES[short]

    def build(size: str, **overrides: Any) -> BlockStateConfig:
        size_fields(size)  # an unknown size is named before the FFN is matched at it
        tuned = {**TUNED_SETTINGS, **overrides}
        if "intermediate_size" not in overrides:
            tuned["intermediate_size"] = matched_ffn(f"bst-{variant}-{short}", size, tuned)
        return preset_config(size, variant, kernel, **tuned)

    return build


SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def matched_ffn(name: str, size: str, overrides: dict[str, Any], target: int | None = None) -> int:
    """The FFN width (a multiple of 32) that gives ``name`` with ``overrides`` ``target`` parameters (default:
    bst-sh-s4's count at ``size`` with the same width, depth, heads and vocabulary). The count is linear in the
    width, so two counts on the meta device solve it. Used by the tuned presets and by ``blockstate ablate``."""
    key = json.dumps([name, size, overrides, target], sort_keys=True, default=str)
    if key not in _MATCHED_FFN:
        if target is None:
            shape = {k: v for k, v in overrides.items() if k in SHAPE_FIELDS}
            target = count_model_parameters(REFERENCE_MODEL, size, **shape)

        def count(width: int) -> int:
            return count_model_parameters(name, size, **{**overrides, "intermediate_size": width})

        width = model_config(name, size, **overrides).intermediate_size
        slope = count(width) - count(width - 32)
        _MATCHED_FFN[key] = max(32, width + round((target - count(width)) / slope) * 32)
    return _MATCHED_FFN[key]


_MATCHED_FFN: dict[str, int] = {}


def _shared_size_fields(size: str, config_class: type[PretrainedConfig]) -> dict[str, Any]:
    """The fields of ``size`` that ``config_class`` has: a baseline leaves out BST's own (S)."""
    return {k: v for k, v in size_fields(size).items() if k in known_fields(config_class)}


def _attention(kind: str) -> Callable[..., PretrainedConfig]:
    def build(size: str, **overrides: Any) -> BlockTransformerConfig:
        fields = {**_shared_size_fields(size, BlockTransformerConfig), "intermediate_size": ATTENTION_FFN[size]}
        if kind == "gpt":  # one block as long as the sequence: full causal attention, nothing to carry
            fields.update(block_size=FULL_ATTENTION, attend_previous_block=False, carry_state=False)
        elif kind == "slide":  # each token sees the previous W tokens; the last window carries over
            fields.update(attend_previous_block=True, carry_state=True)
        else:  # transformer-xl: a training segment is two XL segments of L/2 (Trsf-XL:2048 at L = 4096)
            length = overrides.get("max_train_length", fields["max_train_length"])
            fields.update(attend_previous_block=True, previous_block="full", carry_state=True)
            if isinstance(length, int):  # else the config's validation names max_train_length
                fields.update(block_size=max(1, length // 2))
        return BlockTransformerConfig(**{**fields, **overrides})

    return build


def _brect(size: str, **overrides: Any) -> BlockRecurrentConfig:
    fields = {**_shared_size_fields(size, BlockRecurrentConfig), "intermediate_size": BRECT_FFN[size]}
    fields["num_state_vectors"] = overrides.get("block_size", fields["block_size"])  # S = W, as in the paper
    return BlockRecurrentConfig(**{**fields, **overrides})


def _gss(size: str, **overrides: Any) -> GatedStateSpaceConfig:
    return GatedStateSpaceConfig(**{**_shared_size_fields(size, GatedStateSpaceConfig), **GSS[size], **overrides})


def _register_defaults() -> None:
    variants = {"sh": "single-head", "mh": "multi-head", "mf": "multi-filter"}
    for variant, words in variants.items():
        for short, kernel in KERNEL_NAMES.items():
            register_model(f"bst-{variant}-{short}", _bst(variant, kernel), BlockStateForCausalLM,
                           f"Block-State Transformer, {words} context states, {kernel} kernel",
                           PAPER_PARAMETERS.get(f"bst-{variant}-{short}"))
    for variant, short in TUNED.items():
        register_model(f"bst-{variant}-{short}-gated", _bst_gated(variant, short), BlockStateForCausalLM,
                       f"Block-State Transformer, {variants[variant]}, the FFN of BST layers gated by the SSM output, "
                       "previous block attended (beyond the paper; chosen by blockstate ablate)")
    register_model("gpt", _attention("gpt"), BlockTransformerForCausalLM, "full causal attention (SDPA)")
    register_model("slide", _attention("slide"), BlockTransformerForCausalLM,
                   "sliding-window attention (W), last window's keys/values carried (Slide:12L)",
                   PAPER_PARAMETERS["slide"])
    register_model("transformer-xl", _attention("transformer-xl"), BlockTransformerForCausalLM,
                   "window = half a training segment, the whole previous segment carried (Trsf-XL:2048)",
                   PAPER_PARAMETERS["transformer-xl"])
    register_model("brect", _brect, BlockRecurrentForCausalLM,
                   "Block-Recurrent Transformer, fixed gate, no state FFN (Rec:fixed:skip)", PAPER_PARAMETERS["brect"])
    register_model("gss-hybrid", _gss, GatedStateSpaceForCausalLM,
                   "gated state space layers, block attention every 4th layer (GSS-Hybrid)")


_register_defaults()

__all__ = [
    "ModelEntry",
    "SegmentCarry",
    "SegmentLMOutput",
    "carries_state",
    "count_model_parameters",
    "create_model",
    "check_overrides",
    "get_model_entry",
    "known_fields",
    "list_models",
    "map_carry",
    "model_config",
    "model_name",
    "parameter_table",
    "register_model",
]
