"""What every model class here shares beside its stack: the output with the streaming cache, gradient checkpointing
of the layer loops, and the one contract of ``attention_mask`` (one contiguous run of real tokens per row).

The value checks of ids and labels (``check_input_ids``, ``causal_lm_loss``) stay in ``modeling_blockstate``
with the device-check policy they read."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from blockstate.layers.cache import BlockStateCache


@dataclass
class BlockStateCausalLMOutput(CausalLMOutput):
    """CausalLMOutput plus the streaming cache (``cache``) when one was asked for."""

    cache: BlockStateCache | None = None


def run_layer(owner: nn.Module, fn, *args):
    """``fn(*args)`` (one layer), through the Hugging Face checkpoint function when ``owner`` (the module that
    holds the layer loop) has gradient checkpointing on and trains: the layer's activations are recomputed in the
    backward instead of kept, so memory grows with one layer's activations, not the stack's."""
    if getattr(owner, "gradient_checkpointing", False) and owner.training and torch.is_grad_enabled():
        return owner._gradient_checkpointing_func(fn, *args)
    return fn(*args)


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """``model.gradient_checkpointing_enable()`` (non-reentrant) on any model here, through DDP / FSDP wrappers;
    newer transformers name it ``activation_checkpointing_enable`` and warn on the old name."""
    inner = getattr(model, "module", model)
    enable = getattr(inner, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model



def check_attention_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor | None) -> None:
    """The one shape check of ``attention_mask`` for every model: (B, L) like input_ids, or None."""
    if attention_mask is None or input_ids is None:
        return
    shape = getattr(attention_mask, "shape", None)
    if not isinstance(attention_mask, torch.Tensor) or shape != input_ids.shape:
        got = tuple(shape) if shape is not None else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {got}; "
                         f"pass a (batch, length) tensor with 1 for real tokens and 0 for padding")


def padding_runs(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) mask -> (start, length) of each row's single run of real tokens; one clear error otherwise."""
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    if bool((lengths == 0).any()):
        raise ValueError("attention_mask has a row with no tokens: every row needs at least one real token")
    starts = mask.int().argmax(1)
    t = torch.arange(mask.shape[1], device=mask.device)[None, :]
    if not torch.equal(mask, (t >= starts[:, None]) & (t < (starts + lengths)[:, None])):
        raise ValueError("attention_mask must mark one contiguous run of real tokens per row (left or right padding)")
    return starts, lengths
