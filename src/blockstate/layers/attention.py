"""Block attention: every block of W tokens at once, as one batch of (batch * blocks) SDPA problems.

``BlockAttention`` is the attention half of a Block Transformer layer (spec section 5): bias-free projections,
causal self-attention inside each block (RoPE positions inside the block), optionally the previous block's
keys/values (BRecT's sliding W x 2W tile: each token sees the previous W tokens), and optionally a second query
cross-attending to *context states*. Self and cross outputs are concatenated over heads and projected once.

Context states come in two layouts (``context=``):
- ``"aligned"`` (BST SH/MH): one state per position, (B, L, D), or one per position and head, (B, L, H, D) with
  ``context_per_head=True`` (MH: head h reads filter h through its own projection, the "lift" to heads). Token i
  sees states at positions <= i of its own block: the same causal W x W mask as self-attention, so without the
  previous-block option both run as one SDPA call over 2H heads.
- ``"states"`` (BST MF): S states per block, (B, nb, S, D), all strictly before the block, so no mask.

SDPA runs on 4-D (B * nb, heads, W, head_dim) tensors: on CPU that is much faster than 5-D views.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers.initialization as init
from torch import nn

from blockstate.layers.attention_step import BlockAttentionStep
from blockstate.layers.cache import LayerCache
from blockstate.layers.common import RMSNorm, apply_rope, from_blocks, num_blocks, rope_cos_sin, to_blocks

CONTEXT_LAYOUTS = (None, "aligned", "states")


def previous_block_mask(nb: int, block_size: int, first_has_past: bool = False, device=None,
                        window: bool = True) -> torch.Tensor:
    """(nb, 1, W, 2W) bool: query i of a block sees key j of [previous block; this block] iff it lies in the
    last W positions up to and including i (i < j <= W + i), or, with ``window=False`` (Transformer-XL), anywhere
    in the previous block or causally in its own (j <= W + i). Block 0 sees a previous block only when
    keys/values of one were carried in from the previous segment (``first_has_past``)."""
    i = torch.arange(block_size, device=device)[:, None]
    j = torch.arange(2 * block_size, device=device)[None, :]
    window = ((j > i) if window else (j >= 0)) & (j <= block_size + i)
    mask = window.expand(nb, block_size, 2 * block_size).clone()
    if not first_has_past:
        mask[0, :, :block_size] = False
    return mask.unsqueeze(1)


class BlockAttention(BlockAttentionStep, nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        block_size: int,
        *,
        context: str | None = None,
        context_per_head: bool = False,
        attend_previous_block: bool = False,
        previous_window: bool = True,
        rope: bool = True,
        rope_theta: float = 10000.0,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        eps: float = 1e-6,
    ):
        super().__init__()
        if context not in CONTEXT_LAYOUTS:
            raise ValueError(f"context must be one of {list(CONTEXT_LAYOUTS)}, got {context!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.block_size = block_size
        self.context, self.context_per_head = context, context_per_head
        self.attend_previous_block = attend_previous_block
        self.previous_window = previous_window  # False: the whole previous block (Transformer-XL memory)
        self.rope, self.rope_theta = rope, rope_theta
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        if context is not None:
            self.q_cross = nn.Linear(dim, dim, bias=False)
            self.context_norm = RMSNorm(dim, eps)
            if context_per_head:  # head h: its own D -> (k, v) projection of its own context vector
                self.kv_cross_heads = nn.Parameter(torch.empty(num_heads, dim, 2 * self.head_dim))
            else:
                self.kv_cross = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim * (2 if context else 1), dim, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.init_parameters(0.02)  # usable standalone; a PreTrainedModel re-initialises with its own std

    @torch.no_grad()
    def init_parameters(self, std: float) -> None:
        if self.context_per_head:
            init.normal_(self.kv_cross_heads, 0.0, std)

    # -- shapes ---------------------------------------------------------------------------------------------
    def effective_block_size(self, length: int, has_past: bool = False) -> int:
        """A sequence shorter than one block is one block of its own length: no padding work (this is also how
        a huge ``block_size`` gives full causal attention). Carried keys/values need the true W."""
        return self.block_size if has_past else min(self.block_size, length)

    def _heads(self, x: torch.Tensor, w: int) -> torch.Tensor:
        """(B, L, H, d) -> (B * nb, H, W, d)."""
        return to_blocks(x, w).flatten(0, 1).transpose(1, 2)

    def _sdpa(self, q, k, v, mask=None, causal=False) -> torch.Tensor:
        p = self.attention_dropout if self.training else 0.0
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled():
            # torch's CPU flash attention takes about twice as long forward+backward in bf16 as in fp32 (measured
            # on AVX512-BF16, torch 2.13, W = 64-128): for training under autocast, attend in fp32 (more exact,
            # too) and hand back bf16. GPUs keep their bf16 kernels; inference, which has no backward, too.
            with torch.autocast(device_type="cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                     is_causal=causal, dropout_p=p)
            return out.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=p)

    def _rope(self, x: torch.Tensor, start: int, step: int = 1) -> torch.Tensor:
        """Rotate x (..., T, d) to positions start, start + step, ... (step 0: all by ``start``)."""
        if not self.rope:
            return x
        positions = start + step * torch.arange(x.shape[-2], device=x.device)
        return apply_rope(x, *rope_cos_sin(positions, self.head_dim, self.rope_theta))

    def block_past(self, cache: LayerCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache's current (finished) block as ``past_kv`` for a parallel continuation: keys un-rotated."""
        w = self.block_size
        return self._rope(cache.keys[:, :, :w], 0, step=-1), cache.values[:, :, :w]

    def context_keys_values(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the context states, laid out like the states: (..., H, d) each."""
        ctx = self.context_norm(ctx)
        if self.context_per_head:  # ctx (B, L, H, D)
            kv = torch.einsum("blhd,hde->blhe", ctx, self.kv_cross_heads.to(ctx.dtype))
        else:
            kv = self.kv_cross(ctx).unflatten(-1, (self.num_heads, 2 * self.head_dim))
        return kv.chunk(2, dim=-1)

    def _context_kv(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``context_keys_values`` for the parallel forward, with the norm folded into the projection:
        RMSNorm(x) W = r * (x (g W)), r = 1 / rms(x) per state. Only r (one number per state) is made, not the
        normed copy of the states: for MH that copy was (B, L, H, D), a pass each way over the largest tensor
        of the layer. The same values up to rounding."""
        norm = self.context_norm
        with torch.autocast(device_type=ctx.device.type, enabled=False):
            x32 = ctx.float()
            r = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square().div_(ctx.shape[-1]).add_(norm.eps)
            r = r.rsqrt_()
        g = norm.weight.float()
        if self.context_per_head:  # ctx (B, L, H, D), possibly a view of a head-major tensor
            w = (self.kv_cross_heads.float() * g[:, None]).to(ctx.dtype)
            kv = torch.einsum("blhd,hde->blhe", ctx, w)
            kv = kv * r.to(kv.dtype)
        else:
            kv = F.linear(ctx, (self.kv_cross.weight.float() * g).to(ctx.dtype))
            kv = (kv * r.to(kv.dtype)).unflatten(-1, (self.num_heads, 2 * self.head_dim))
        return kv.chunk(2, dim=-1)

    # -- forward --------------------------------------------------------------------------------------------
    def forward(
        self,
        h: torch.Tensor,
        context: torch.Tensor | None = None,
        past_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_kv: bool = False,
    ):
        """h: normed input (B, L, D); context: states in this module's layout. Returns (B, L, D).

        With ``attend_previous_block``, ``past_kv`` = (keys, values), each (B, H, W, d) before RoPE, are the last W
        positions of the previous segment: block 0 then sees them as its previous block (carried without gradient
        by the caller). ``return_kv=True`` also returns this segment's last W keys/values in that form.
        """
        bsz, length, _ = h.shape
        has_past = past_kv is not None
        if has_past and not self.attend_previous_block:
            raise ValueError("past_kv needs attend_previous_block=True")
        w = self.effective_block_size(length, has_past)
        nb = num_blocks(length, w)
        if self.context == "aligned" and not self.attend_previous_block and not return_kv:
            return self._aligned_forward(h, context, w, nb)
        q, k, v = self.qkv(h).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(2)
        new_kv = (k[:, -w:].transpose(1, 2), v[:, -w:].transpose(1, 2)) if return_kv else None
        q, k, v = self._heads(q, w), self._heads(k, w), self._heads(v, w)

        out = None
        if self.attend_previous_block:
            # keys of [previous block; this block] sit at positions 0..2W-1, queries at W..2W-1 (RoPE is relative)
            k_prev = torch.roll(k.unflatten(0, (bsz, nb)), 1, dims=1)
            v_prev = torch.roll(v.unflatten(0, (bsz, nb)), 1, dims=1)
            if has_past:
                k_prev[:, 0], v_prev[:, 0] = past_kv[0].to(k.dtype), past_kv[1].to(v.dtype)
            keys = self._rope(torch.cat([k_prev.flatten(0, 1), k], dim=2), 0)
            values = torch.cat([v_prev.flatten(0, 1), v], dim=2)
            mask = previous_block_mask(nb, w, has_past, h.device, self.previous_window).repeat(bsz, 1, 1, 1)
            q = self._rope(q, w)
            out = self._sdpa(q, keys, values, mask=mask)
        else:
            q, k = self._rope(q, 0), self._rope(k, 0)

        if self.context is None:
            if out is None:
                out = self._sdpa(q, k, v, causal=True)
        elif self.context == "aligned":
            q2 = self._heads(self.q_cross(h).unflatten(-1, (self.num_heads, self.head_dim)), w)
            kc, vc = (self._heads(t, w) for t in self._context_kv(context))
            if out is None:  # same causal mask: one call over 2H heads
                out = self._sdpa(torch.cat([q, q2], 1), torch.cat([k, kc], 1), torch.cat([v, vc], 1), causal=True)
            else:
                out = torch.cat([out, self._sdpa(q2, kc, vc, causal=True)], dim=1)
        else:  # "states": (B, nb, S, D), no mask
            q2 = self._heads(self.q_cross(h).unflatten(-1, (self.num_heads, self.head_dim)), w)
            kc, vc = (t.flatten(0, 1).transpose(1, 2) for t in self.context_keys_values(context))
            if out is None:
                out = self._sdpa(q, k, v, causal=True)
            out = torch.cat([out, self._sdpa(q2, kc.to(q2.dtype), vc.to(q2.dtype))], dim=1)

        out = out.transpose(1, 2).flatten(2).unflatten(0, (bsz, nb))  # (B, nb, W, heads * d)
        out = self.dropout(self.out(from_blocks(out, length)))
        return (out, new_kv) if return_kv else out

    def _aligned_forward(self, h: torch.Tensor, context: torch.Tensor, w: int, nb: int) -> torch.Tensor:
        """``forward`` for aligned context states (BST SH / MH) without the previous block: the same result, in
        fewer passes over memory. The second query is one matmul with q, k, v (their weights side by side);
        self- and cross-attention run as two SDPA calls on views rather than one call on 2H heads concatenated
        (three copies of (B * nb, 2H, W, d)), and their outputs, already token-major, meet in one concatenation
        for the output projection."""
        bsz, length, _ = h.shape
        weight = torch.cat([self.qkv.weight, self.q_cross.weight])  # (4D, D): q, k, v, q_cross
        q, k, v, q2 = (self._heads(t, w) for t in
                       F.linear(h, weight).unflatten(-1, (4, self.num_heads, self.head_dim)).unbind(2))
        q, k = self._rope(q, 0), self._rope(k, 0)
        kc, vc = (self._heads(t, w) for t in self._context_kv(context))
        a_self = self._sdpa(q, k, v, causal=True)  # (B * nb, H, W, d)
        a_cross = self._sdpa(q2, kc.to(q2.dtype), vc.to(q2.dtype), causal=True)

        out = torch.cat([a.transpose(1, 2).flatten(2) for a in (a_self, a_cross.to(a_self.dtype))], dim=-1)
        return self.dropout(self.out(from_blocks(out.unflatten(0, (bsz, nb)), length)))
