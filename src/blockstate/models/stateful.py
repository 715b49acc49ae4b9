"""The one interface for models that carry state from one training segment to the next (documented for users in
``blockstate.registry``).

A stateful model implements ``_segment(input_ids, carry) -> (logits, carry)`` for one segment of every row; the
``SegmentStateMixin.forward`` below adds what every such model needs identically: per-row resets, a carry taken
before the end of the segment (``carry_length``), detaching, and the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers.modeling_outputs import CausalLMOutput

from blockstate.models.common import check_attention_mask
from blockstate.models.modeling_blockstate import causal_lm_loss, check_input_ids


class SegmentCarry(NamedTuple):
    """What a stateful model hands from one segment to the next: tuples of tensors, each with the batch on dim 0.

    - ``keys`` / ``values``: per sliding-window layer, the last W positions' keys/values (B, H, W, d), before RoPE;
    - ``states``: per recurrent layer, the recurrent state (B, S, D).

    A NamedTuple of tuples of tensors, so DDP moves it like any input and ``map_carry`` reaches every tensor.
    """

    keys: tuple[torch.Tensor, ...] = ()
    values: tuple[torch.Tensor, ...] = ()
    states: tuple[torch.Tensor, ...] = ()


@dataclass
class SegmentLMOutput(CausalLMOutput):
    """CausalLMOutput plus ``carry``: the detached state to pass as ``carry=`` with the row's next segment."""

    carry: SegmentCarry | None = None


def map_carry(fn, carry: SegmentCarry) -> SegmentCarry:
    """Apply ``fn`` to every tensor of a carry (detach, move, select rows, ...)."""
    return SegmentCarry(*(tuple(fn(t) for t in group) for group in carry))


def merge_rows(batch: int, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Scatter (rows, values) parts back into one (batch, ...) tensor, keeping autograd."""
    first = parts[0][1]
    out = first.new_zeros((batch, *first.shape[1:]))
    for rows, values in parts:
        out = out.index_put((rows,), values)
    return out


def check_carry_window(carry: SegmentCarry, window: int) -> None:
    """A carried window must be complete: BlockAttention treats all W carried positions as real."""
    for k in carry.keys:
        if k.shape[2] != window:
            raise ValueError(f"the carry holds {k.shape[2]} keys/values but block_size is {window}: a row must see "
                             f"at least block_size tokens before its state can be carried (or be reset)")


def right_padding_only(attention_mask: torch.Tensor | None, input_ids: torch.Tensor | None) -> None:
    """Causal models compute real tokens before right padding exactly; left padding would need per-row shifts.
    The mask must have the shape of input_ids (the BST model's check)."""
    check_attention_mask(attention_mask, input_ids)
    if attention_mask is None:
        return
    mask = attention_mask.bool()
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError("this model supports right padding only (real tokens first, padding after)")


def merge_carries(batch: int, parts: list[tuple[torch.Tensor, SegmentCarry]]) -> SegmentCarry:
    """Scatter the carries of row groups back into one carry of ``batch`` rows."""
    groups = []
    for g in range(len(SegmentCarry._fields)):
        tensors = []
        for i in range(len(parts[0][1][g])):
            pieces = [(rows, carry[g][i]) for rows, carry in parts]
            if len({p.shape[1:] for _, p in pieces}) > 1:
                raise ValueError("rows carry state of different sizes: segments shorter than block_size cannot "
                                 "carry state")
            tensors.append(merge_rows(batch, pieces))
        groups.append(tuple(tensors))
    return SegmentCarry(*groups)


class SegmentStateMixin:
    """``forward(input_ids, labels=None, carry=None, reset=None, carry_length=None)`` for stateful models."""

    carries_state: bool = True

    def _segment(self, input_ids: torch.LongTensor, carry: SegmentCarry | None):
        """One segment of every row from ``carry`` (None: fresh) -> (logits (B, L, V) fp32, carry after it)."""
        raise NotImplementedError

    def segment_forward(self, input_ids: torch.LongTensor, labels: torch.LongTensor | None = None,
                        carry: SegmentCarry | None = None, reset: torch.Tensor | None = None,
                        carry_length: int | None = None) -> SegmentLMOutput:
        check_input_ids(input_ids, self.config.vocab_size)
        bsz = input_ids.shape[0]
        if carry is not None and reset is not None:
            # the row split is decided on the host: the data pipeline's flags are already there (no host-device
            # sync per step, issue 16); flags passed on a device are read once
            reset = reset.to(device="cpu", dtype=torch.bool).view(-1)
            if reset.shape[0] != bsz:
                raise ValueError(f"reset must be a BoolTensor of shape ({bsz},), got {tuple(reset.shape)}")
            if bool(reset.all()):
                carry = None
            elif not bool(reset.any()):
                reset = None
        if carry is not None and reset is not None:
            # BlockAttention takes carried keys/values for all rows or none, so rows that start a document run as
            # a second group without the carry, and both groups are scattered back in place (exact, same compute)
            parts = []
            for rows, group_carry in ((torch.nonzero(~reset).flatten(), carry), (torch.nonzero(reset).flatten(), None)):
                rows = rows.to(input_ids.device, non_blocking=True)  # host -> device, nothing to wait for
                if group_carry is not None:
                    group_carry = map_carry(lambda t, r=rows: t.index_select(0, r.to(t.device)), group_carry)
                parts.append((rows, *self._carry_at(input_ids[rows], group_carry, carry_length)))
            logits = merge_rows(bsz, [(rows, lg) for rows, lg, _ in parts])
            new_carry = merge_carries(bsz, [(rows, c) for rows, _, c in parts])
        else:
            logits, new_carry = self._carry_at(input_ids, carry, carry_length)
        new_carry = map_carry(torch.Tensor.detach, new_carry)  # no gradient flows across segments
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return SegmentLMOutput(loss=loss, logits=logits, carry=new_carry)

    def _carry_at(self, input_ids: torch.LongTensor, carry: SegmentCarry | None, carry_length: int | None):
        """Carry the state after the first ``carry_length`` tokens: run those, then the rest from that state.
        (With the data pipeline's overlap=1 the next segment starts with this one's last token: pass L - 1.)"""
        length = input_ids.shape[1]
        if carry_length is None or carry_length == length:
            return self._checked_segment(input_ids, carry)
        if not 0 < carry_length < length:
            raise ValueError(f"carry_length must be in [1, {length}] (the segment length), got {carry_length}")
        head, carried = self._checked_segment(input_ids[:, :carry_length], carry)
        tail, _ = self._checked_segment(input_ids[:, carry_length:], carried)
        return torch.cat([head, tail], dim=1), carried

    def _checked_segment(self, input_ids: torch.LongTensor, carry: SegmentCarry | None):
        if carry is not None:
            check_carry_window(carry, self.config.block_size)
        return self._segment(input_ids, carry)
