"""Model configs for the synthetic tasks: the same vocabulary, width, depth, heads, block size and training length
for every model, and each baseline's budget knob solved so its parameter count matches BST:SH:S4's.

The registry's sizes tune the baselines' knobs (FFN width, GSS widths and depth) for their own vocabularies and
widths; the synthetic tasks have tiny vocabularies (17-256 tokens) and, at ``tiny``, narrower models than the
registry's, so the same ratios would not hold. Instead every knob is solved here on the meta device (the
parameter count is affine in the knob): FFN width for gpt / slide / transformer-xl / brect, the gated branch
width for gss-hybrid (4/3 the depth and a D/4 narrow branch, as the registry's sizes). BST variants keep the
shared fields as they are; their count differs from SH's by what the variant adds (the table shows it).
"""

from __future__ import annotations

from typing import Any

from blockstate.models import SIZES

REFERENCE = "bst-sh-s4"
# ``tiny`` here is narrower than the registry's tiny (D = 256, 4 layers, 3.8M parameters): recall tasks at these
# lengths are learnt by D = 64 models in a few hundred steps, and 14 (task, model) pairs must fit ~25 min on 2
# CPU cores. ``small`` and ``paper`` keep the registry's widths (for a GPU).
WIDTHS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                 num_context_states=8),
    **{size: {k: SIZES[size][k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                           "intermediate_size", "num_context_states")}
       for size in ("small", "paper")},
}
FFN_KNOB = {"gpt", "slide", "transformer-xl", "brect"}
OWN_WINDOW = {"gpt", "transformer-xl"}  # their window is what they are (the whole input; half a training segment)
KNOB_STEP = 8  # knobs are rounded to multiples of 8


def shared_fields(size: str, vocab_size: int, train_length: int, block_size: int,
                  model_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config fields every model of one task gets."""
    if size not in WIDTHS:
        raise ValueError(f"--size must be one of {', '.join(WIDTHS)}, got {size!r}")
    return {**WIDTHS[size], "vocab_size": vocab_size, "max_train_length": train_length, "block_size": block_size,
            **(model_args or {})}


def _gss_layout(fields: dict[str, Any]) -> dict[str, Any]:
    layers = max(1, round(fields["num_hidden_layers"] * 4 / 3))
    attention = [i for i in range(layers) if i % 4 == 3] or [layers - 1]  # GSS-Hybrid needs one attention layer
    return {"num_hidden_layers": layers, "attention_layers": attention,
            "gss_narrow_size": max(1, fields["hidden_size"] // 4)}


def knob_of(name: str) -> str | None:
    if name in FFN_KNOB:
        return "intermediate_size"
    if name == "gss-hybrid":
        return "gss_hidden_size"
    return None


def model_overrides(name: str, size: str, fields: dict[str, Any], fixed: set[str] | None = None) -> dict[str, Any]:
    """The keyword overrides of ``create_model(name, size, **overrides)`` for one task: ``fields`` (from
    :func:`shared_fields`) plus the model's budget knob matched to BST:SH:S4, unless the user fixed it
    (``fixed``: the keys given with ``--model-arg``)."""
    from blockstate.registry import count_model_parameters, get_model_entry, known_fields

    entry = get_model_entry(name)
    name = entry.name
    fixed = fixed or set()
    # the shared widths include BST's S, which a baseline's config does not have; what the user gave stays (and is
    # refused by a model without that field)
    known = known_fields(type(entry.config(size)))
    overrides = {k: v for k, v in fields.items() if k in known or k in fixed}
    if name in OWN_WINDOW and "block_size" not in fixed:
        del overrides["block_size"]
    if name == "gss-hybrid":  # its depth always follows the shared depth; its other layout fields unless given
        layout = _gss_layout(fields)
        overrides.update({k: v for k, v in layout.items() if k == "num_hidden_layers" or k not in fixed})
    knob = knob_of(name)
    if knob is None or knob in fixed:
        return overrides
    target = count_model_parameters(REFERENCE, size, **fields)
    low, high = KNOB_STEP, 2 * KNOB_STEP
    p_low = count_model_parameters(name, size, **{**overrides, knob: low})
    p_high = count_model_parameters(name, size, **{**overrides, knob: high})
    per_unit = (p_high - p_low) / (high - low)  # parameters are affine in the knob
    best = round((low + (target - p_low) / per_unit) / KNOB_STEP) * KNOB_STEP
    overrides[knob] = max(KNOB_STEP, int(best))
    return overrides


def parameters(name: str, size: str, overrides: dict[str, Any]) -> int:
    from blockstate.registry import count_model_parameters

    return count_model_parameters(name, size, **overrides)
