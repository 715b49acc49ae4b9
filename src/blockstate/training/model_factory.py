"""Build a model from its name: the one place the trainer and the evaluator create models.

Names are ``bst-<variant>-<kernel>`` with variant ``sh`` / ``mh`` / ``mf`` and kernel ``s4`` (= ``s4d``),
``unstructured`` or ``explicit``, e.g. ``bst-sh-s4``, ``bst-mf-unstructured``. When the package grows a model
registry (``blockstate.create_model``, with baselines), this delegates to it, so every registered name works.
"""

from __future__ import annotations

from typing import Any

from torch import nn

import blockstate
from blockstate.layers import KERNELS, VARIANTS

KERNEL_ALIASES = {"s4": "s4d", "s4d": "s4d", "unstructured": "unstructured", "explicit": "explicit"}
MODEL_NAMES = [f"bst-{v}-{k}" for v in VARIANTS for k in ("s4", "unstructured", "explicit")]


def parse_bst_name(name: str) -> tuple[str, str]:
    """``bst-mf-s4`` -> (``mf``, ``s4d``); ValueError naming the known models otherwise."""
    parts = str(name).strip().lower().split("-")
    if len(parts) == 3 and parts[0] == "bst" and parts[1] in VARIANTS and parts[2] in KERNEL_ALIASES:
        kernel = KERNEL_ALIASES[parts[2]]
        assert kernel in KERNELS
        return parts[1], kernel
    raise ValueError(f"unknown model {name!r}: use one of {', '.join(known_models())}")


def known_models() -> list[str]:
    registry = getattr(blockstate, "list_models", None)
    names = list(registry()) if callable(registry) else []
    return names + [n for n in MODEL_NAMES if n not in names]


def build_model(name: str, size: str = "tiny", **overrides: Any) -> nn.Module:
    """A freshly initialised causal LM (an HF ``PreTrainedModel``); ``overrides`` are model-config fields.

    Seed torch before calling for a reproducible initialisation.
    """
    create = getattr(blockstate, "create_model", None)
    if callable(create):
        return create(name, size=size, **overrides)
    from blockstate.models import BlockStateForCausalLM, preset_config

    variant, kernel = parse_bst_name(name)
    return BlockStateForCausalLM(preset_config(size, variant, kernel, **overrides))


def model_name_of(config: Any) -> str | None:
    """Best-effort model name of a loaded config (for reports): ``bst-<variant>-<kernel>``."""
    variant, kernel = getattr(config, "variant", None), getattr(config, "kernel", None)
    if variant is None or kernel is None:
        return getattr(config, "model_type", None)
    return f"bst-{variant}-{'s4' if kernel == 's4d' else kernel}"
