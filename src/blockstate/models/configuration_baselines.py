"""Configs of the paper's baselines (spec section 8). Each extends the fields BST shares (``BlockLMConfig``: width,
heads, FFN, block size, RoPE, dropouts, training length; GSS also ``SSMKernelConfig``'s kernel settings), so those
mean exactly what they mean for BST and the same layers read them; only what a baseline adds is new here. No
baseline has BST's own fields (variant, kernel, S, ``ssm_residual``); a ``config.json`` saved when they did still
loads (Hugging Face keeps unknown keys as attributes, which nothing reads).

- ``BlockTransformerConfig``: a plain attention LM. Full causal attention (GPT: ``block_size`` >= any length),
  sliding window (Slide: ``attend_previous_block``) or Transformer-XL (window = half a training segment), with the
  last window's keys/values carried across segments when ``carry_state``.
- ``BlockRecurrentConfig``: the sliding stack plus Block-Recurrent layers (BRecT, Rec:fixed:skip).
- ``GatedStateSpaceConfig``: GSS layers with a block-attention Transformer layer every few layers (GSS-Hybrid).
"""

from __future__ import annotations

import math

from blockstate.layers.gss import gss_widths
from blockstate.models.configuration_blockstate import LAYER_COLLECTIONS, BlockLMConfig, SSMKernelConfig

# A block size no sequence reaches: BlockAttention then runs one block of the sequence's own length, which is
# plain full causal attention with no padding (and its streaming cache grows with the context).
FULL_ATTENTION = 2**30
STATE_GATES = ("fixed", "lstm")


def _no_bst_layers(bst_layers: list[int] | None) -> list[int]:
    if bst_layers:
        raise ValueError(f"bst_layers must be empty for a baseline (got {bst_layers}); use "
                         "BlockStateConfig for a model with BST layers")
    return []


def _layer_indices(name: str, value: list, num_layers: int) -> list[int]:
    if not isinstance(value, list):
        raise ValueError(f"{name} must be a list of layer indices, got {value!r}")
    bad = [i for i in value if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers]
    if bad or len(set(value)) != len(value):
        raise ValueError(f"{name} must be distinct layer indices in [0, {num_layers - 1}] "
                         f"(num_hidden_layers={num_layers}), got {value}")
    return sorted(value)


def _as_list(value):
    """Any collection of layer indices as a list; anything else is left for validation to report."""
    return list(value) if isinstance(value, LAYER_COLLECTIONS) else value


class BlockTransformerConfig(BlockLMConfig):
    """A Block Transformer language model with no SSM anywhere (GPT, Slide, Transformer-XL).

    Args (beyond ``BlockLMConfig``):
        carry_state: carry each layer's last W keys/values (no gradient) into the next segment's first block;
            needs ``attend_previous_block``. The model then follows the segment-carry interface of
            ``blockstate.registry``.
        bst_layers: always empty: the model is the BST stack (``build_layer`` reads the layout) with no BST layer.
    """

    model_type = "block_transformer"

    def __init__(self, carry_state: bool = False, bst_layers: list[int] | None = None, **kwargs):
        self.bst_layers = _no_bst_layers(bst_layers)
        self.carry_state = carry_state
        super().__init__(**kwargs)

    def validate_fields(self) -> None:
        super().validate_fields()
        if not isinstance(self.carry_state, bool):
            raise ValueError(f"carry_state must be True or False, got {self.carry_state!r}")
        if self.carry_state and not self.attend_previous_block:
            raise ValueError("carry_state=True needs attend_previous_block=True: the carried keys/values are the "
                             "previous block of the next segment's first block")


class BlockRecurrentConfig(BlockTransformerConfig):
    """Block-Recurrent Transformer (Hutchins et al. 2022) as the BST paper ran it: Rec:fixed:skip.

    Args (beyond ``BlockTransformerConfig``; ``attend_previous_block`` and ``carry_state`` default to True):
        recurrent_layers: indices of the recurrent layers; default the third from the top (index -3).
        num_state_vectors: S, recurrent state vectors (the paper: 512, = W).
        state_gate: ``"fixed"`` (c' = c*g + z*(1-g), g = sigmoid(b), b learned per channel) or ``"lstm"``
            (input and forget gates computed from z).
        state_gate_bias: initial b of the fixed gate (the forget bias of the LSTM gate); positive = remember.
    """

    model_type = "block_recurrent"

    def __init__(self, recurrent_layers: list[int] | None = None, num_state_vectors: int = 64,
                 state_gate: str = "fixed", state_gate_bias: float = 2.0, **kwargs):
        kwargs.setdefault("attend_previous_block", True)
        kwargs.setdefault("carry_state", True)
        layers = kwargs.get("num_hidden_layers", 4)
        if recurrent_layers is None:  # a bad num_hidden_layers is reported by validate_fields
            recurrent_layers = [max(0, layers - 3)] if isinstance(layers, int) else []
        self.recurrent_layers = _as_list(recurrent_layers)
        self.num_state_vectors = num_state_vectors
        self.state_gate = state_gate
        self.state_gate_bias = state_gate_bias
        super().__init__(**kwargs)

    def validate_fields(self) -> None:
        super().validate_fields()
        if not self.attend_previous_block:
            raise ValueError("a Block-Recurrent Transformer needs attend_previous_block=True (sliding window)")
        if isinstance(self.num_state_vectors, bool) or not isinstance(self.num_state_vectors, int) \
                or self.num_state_vectors < 1:
            raise ValueError(f"num_state_vectors must be a positive integer, got {self.num_state_vectors!r}")
        if self.state_gate not in STATE_GATES:
            raise ValueError(f"state_gate must be one of {list(STATE_GATES)}, got {self.state_gate!r}")
        bias = self.state_gate_bias
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
            raise ValueError(f"state_gate_bias must be a finite number, got {bias!r}")
        self.recurrent_layers = _layer_indices("recurrent_layers", self.recurrent_layers, self.num_hidden_layers)
        if not self.recurrent_layers:
            raise ValueError("recurrent_layers must name at least one layer (use BlockTransformerConfig for none)")


class GatedStateSpaceConfig(SSMKernelConfig):
    """GSS-Hybrid (Mehta et al. 2022): gated state space layers, a block-attention layer every few layers.

    Args (beyond ``SSMKernelConfig``, which declares the GSS layer's ``gss_*`` widths and kernel and whose
    ``s4d_init`` and ``ssm_dt_*`` also initialise the DSS kernel; ``intermediate_size`` is the FFN of the attention
    layers; the registry's presets tune ``gss_hidden_size`` and the depth to the parameter budget):
        attention_layers: indices of the block-attention Transformer layers; default every fourth layer (3, 7, ...).
    """

    model_type = "gss_hybrid"

    def __init__(self, attention_layers: list[int] | None = None, **kwargs):
        _no_bst_layers(kwargs.pop("bst_layers", None))  # not a field here: refused, or dropped from an old config.json
        layers = kwargs.get("num_hidden_layers", 4)
        if not isinstance(layers, int):  # validate_fields names num_hidden_layers
            layers = 0
        self.attention_layers = ([i for i in range(layers) if i % 4 == 3] if attention_layers is None
                                 else _as_list(attention_layers))
        hidden = kwargs.get("hidden_size", 256)
        hidden = hidden if isinstance(hidden, int) and not isinstance(hidden, bool) else 1  # validate_fields names it
        kwargs["gss_hidden_size"], kwargs["gss_narrow_size"] = gss_widths(
            hidden, kwargs.get("gss_hidden_size"), kwargs.get("gss_narrow_size"))
        super().__init__(**kwargs)

    def validate_fields(self) -> None:
        super().validate_fields()
        self.attention_layers = _layer_indices("attention_layers", self.attention_layers, self.num_hidden_layers)
