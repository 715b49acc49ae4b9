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

from blockstate.layers.cache import LayerCache, cached_on, gather_positions, grow, no_grad_step
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


class BlockAttention(nn.Module):
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

    # -- streaming: one token at a time ----------------------------------------------------------------------
    def _grow_block(self, cache: LayerCache, batch: int, needed: int, like: torch.Tensor) -> None:
        shape = (batch, self.num_heads, needed, self.head_dim)
        # a huge block_size (full attention) grows its buffers with the context; a real block keeps W slots
        limit = self.block_size
        cache.keys = grow(cache.keys, shape, needed, limit, 2, like.dtype, like.device)
        cache.values = grow(cache.values, shape, needed, limit, 2, like.dtype, like.device)
        if self.context == "aligned":
            cache.context_keys = grow(cache.context_keys, shape, needed, limit, 2, like.dtype, like.device)
            cache.context_values = grow(cache.context_values, shape, needed, limit, 2, like.dtype, like.device)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H*d) -> (B, H, T, d)."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    @torch.no_grad()
    def fill_cache(self, cache: LayerCache, h: torch.Tensor, context: torch.Tensor | None,
                   lengths: torch.Tensor) -> None:
        """After a parallel pass over h (B, T, D) whose row b holds lengths[b] real tokens (then padding), keep
        what decoding from position lengths[b] needs: the current block's keys/values (and the previous block's),
        and the context states' keys/values. Only those positions are projected again."""
        w = self.block_size
        phase = lengths % w
        base = lengths - phase
        slots = max(1, int(phase.max()))
        self._grow_block(cache, h.shape[0], w if self.attend_previous_block else min(w, slots), h)
        cap = cache.keys.shape[2]
        if self.attend_previous_block:
            # a row at a block start keeps its finished block as "current": the next step moves it to "previous"
            own = torch.where((phase == 0) & (lengths > 0), base - w, base)
            k, v = self.qkv(gather_positions(h, own - w, w))[..., self.dim :].chunk(2, dim=-1)
            cache.prev_keys, cache.prev_values = self._rope(self._split_heads(k), -w), self._split_heads(v)
        else:
            own = base
        k, v = self.qkv(gather_positions(h, own, cap))[..., self.dim :].chunk(2, dim=-1)
        cache.keys.copy_(self._rope(self._split_heads(k), 0))
        cache.values.copy_(self._split_heads(v))
        if self.context == "aligned":
            kc, vc = self.context_keys_values(gather_positions(context, base, cap))
            cache.context_keys.copy_(kc.transpose(1, 2))
            cache.context_values.copy_(vc.transpose(1, 2))
        elif self.context == "states":  # the states of the block holding position lengths[b]
            block = (base // w).clamp(max=context.shape[1] - 1)
            states = context[torch.arange(context.shape[0], device=context.device), block]
            kc, vc = self.context_keys_values(states)
            cache.context_keys, cache.context_values = kc.transpose(1, 2), vc.transpose(1, 2)

    @no_grad_step
    def step(self, h: torch.Tensor, cache: LayerCache, position: torch.Tensor,
             context: torch.Tensor | None = None) -> torch.Tensor:
        """One token per row. h: normed input (B, D); position: (B,) index of this token in its row's stream;
        context: aligned: this position's state, (B, D) or (B, H, D); states: (B, S, D), the states of a block
        starting here (used by rows at a block start). Returns (B, D), equal to the parallel forward's output."""
        if self.fused_step:
            return self._fused_step(h, cache, position, context)
        bsz, w = h.shape[0], self.block_size
        rows = torch.arange(bsz, device=h.device)
        phase = position % w
        starts = phase == 0
        host_phase = cache.positions_on_host(position) % w  # shape decisions on the host: no sync
        any_start = bool((host_phase == 0).any())
        q, k, v = self.qkv(h).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(1)  # (B, H, d) each
        if self.attend_previous_block:
            if cache.prev_keys is None:
                shape = (bsz, self.num_heads, w, self.head_dim)
                cache.prev_keys, cache.prev_values = h.new_zeros(shape), h.new_zeros(shape)
            self._grow_block(cache, bsz, w, h)
            moving = starts.view(-1, 1, 1, 1)  # the finished block becomes the previous block, W positions back
            if any_start:
                cache.prev_keys = torch.where(moving, self._rope(cache.keys, -w, step=0), cache.prev_keys)
            cache.prev_values = torch.where(moving, cache.values, cache.prev_values)
        self._grow_block(cache, bsz, int(host_phase.max()) + 1, h)
        cache.keys[rows, :, phase] = self._rope_at(k, phase)  # keys are kept rotated to their slot
        cache.values[rows, :, phase] = v

        cap = cache.keys.shape[2]
        current = torch.arange(cap, device=h.device)[None, :] <= phase[:, None]  # (B, cap)
        q1 = self._rope_at(q, phase)  # relative to slot-rotated keys; previous-block keys sit at slot - W
        if self.attend_previous_block:
            keys = torch.cat([cache.prev_keys, cache.keys], dim=2)
            values = torch.cat([cache.prev_values, cache.values], dim=2)
            previous = (position >= w)[:, None].expand(bsz, w)
            if self.previous_window:
                previous = previous & (torch.arange(w, device=h.device)[None, :] > phase[:, None])
            mask = torch.cat([previous, current], dim=1)
        else:
            keys, values, mask = cache.keys, cache.values, current
        outs = [F.scaled_dot_product_attention(q1.unsqueeze(2), keys, values, attn_mask=mask[:, None, None, :])]

        if self.context is not None:
            q2 = self.q_cross(h).unflatten(-1, (self.num_heads, self.head_dim)).unsqueeze(2)
            if self.context == "aligned":
                kc, vc = self.context_keys_values(context.unsqueeze(1))  # (B, 1, H, d)
                cache.context_keys[rows, :, phase] = kc[:, 0]
                cache.context_values[rows, :, phase] = vc[:, 0]
                cross_mask = current[:, None, None, :]
            else:
                if any_start:
                    kc, vc = (t.transpose(1, 2) for t in self.context_keys_values(context))
                    if cache.context_keys is None:
                        cache.context_keys, cache.context_values = kc, vc
                    moving = starts.view(-1, 1, 1, 1)
                    cache.context_keys = torch.where(moving, kc.to(cache.context_keys.dtype), cache.context_keys)
                    cache.context_values = torch.where(moving, vc.to(cache.context_values.dtype),
                                                       cache.context_values)
                cross_mask = None
            outs.append(F.scaled_dot_product_attention(q2, cache.context_keys.to(q2.dtype),
                                                       cache.context_values.to(q2.dtype), attn_mask=cross_mask))
        return self.out(torch.cat(outs, dim=1).flatten(1))

    def _rope_at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x (B, H, d), row b at positions[b]."""
        if not self.rope:
            return x
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta)
        return apply_rope(x, cos[:, None, :], sin[:, None, :])

    # -- the fused step: no previous block, no context or aligned context (BST SH / MH, plain block layers) -------
    # A decoding step of a small model is dispatch-bound, so this path runs few ops and allocates little: one
    # projection of h ([q; q_cross; k; v], fused from the parameters once), RoPE from tables of the W slots (one
    # lookup, one roll, one multiply-add for all projections: q_cross and v get the identity rotation), one
    # write of the new keys/values (self and context) into one buffer, and one SDPA over self and cross heads with
    # an additive mask looked up per row. Nothing depends on the host once the buffer holds W slots, so the step
    # can be captured in a CUDA graph (``blockstate.models.static_decode``).
    @property
    def fused_step(self) -> bool:
        return not self.attend_previous_block and self.context in (None, "aligned")

    def _step_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[q; q_cross; k; v] transposed, (D, G*D), and the context's [k; v] projection with all keys first,
        (D, 2D) (MH: the per-head parameter itself), from the parameters: ``h @ w`` is one product."""
        aligned = self.context == "aligned"
        cross = ([self.kv_cross_heads if self.context_per_head else self.kv_cross.weight] if aligned else [])
        params = [self.qkv.weight] + ([self.q_cross.weight] if aligned else []) + cross

        def build():
            q, k, v = self.qkv.weight.chunk(3)
            fused = torch.cat([q, self.q_cross.weight, k, v] if aligned else [q, k, v]).t().contiguous()
            if not aligned:
                return fused, None
            heads, d = self.num_heads, self.head_dim
            if self.context_per_head:  # (H, D, 2d) -> (H, D, [k | v]) as is; split after the product
                return fused, self.kv_cross_heads.detach()
            kv = self.kv_cross.weight.view(heads, 2, d, self.dim).transpose(0, 1).reshape(2 * heads * d, self.dim)
            return fused, kv.t().contiguous()

        return cached_on(self, "step_weights", params, build)

    def _step_tables(self, cap: int, device) -> dict:
        """Per capacity: RoPE (cap, 2, G, 1, d) = cos and sign-folded sin per slot and projection group, the
        additive causal mask (cap, 1, 1, cap) for capacities up to 1024 (else built per step from the slots)."""
        tables = self.__dict__.setdefault("_step_tables_cache", {})
        key = (cap, str(device))
        if key not in tables:
            d, half = self.head_dim, self.head_dim // 2
            rotated = [True, False, True, False] if self.context == "aligned" else [True, True, False]
            slots = torch.arange(cap, device=device)
            cos, sin = rope_cos_sin(slots, d, self.rope_theta)
            sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)  # x.roll(half) * sin = rotate_half(x) * sin
            one, zero = torch.ones_like(cos), torch.zeros_like(sin)
            rope = torch.stack([torch.stack([cos, sin] if r else [one, zero], 1) for r in rotated], 2).unsqueeze(3)
            mask = None
            if cap <= 1024:
                mask = torch.zeros(cap, cap, device=device).masked_fill_(
                    torch.ones(cap, cap, dtype=torch.bool, device=device).triu_(1), float("-inf")).view(cap, 1, 1, cap)
            tables.clear()  # one capacity at a time (a full-attention cache doubles its capacity)
            tables[key] = {"rope": rope, "mask": mask, "slots": slots, "rows": {}}
        return tables[key]

    def step_buffer(self, cache: LayerCache, like: torch.Tensor, position: torch.Tensor | None = None,
                    needed: int | None = None) -> torch.Tensor:
        """The fused step's keys/values, (2, B, H or 2H, cap, d): [keys; values] x [self heads; context heads].
        ``cache.keys`` / ``values`` / ``context_keys`` / ``context_values`` are views into it, so prefill, beam
        reordering and the parallel continuation read and write them as before; a cache whose tensors were replaced
        (``map_batch``) or outgrown is rebuilt from them. ``needed``: slots (default: from the host positions)."""
        bsz = like.shape[0]
        aligned = self.context == "aligned"
        held = getattr(cache, "step_kv", None)
        fields = [cache.keys, cache.values] + ([cache.context_keys, cache.context_values] if aligned else [])
        kv = None
        if held is not None and all(a is b for a, b in zip(fields, held[1])):
            kv = held[0]
            if kv.shape[1] != bsz or kv.dtype != like.dtype or kv.device != like.device:
                kv = None
        cap = 0 if kv is None else kv.shape[3]
        if kv is not None and cap >= self.block_size:  # full: no host read
            return kv
        if needed is None:
            needed = int((cache.positions_on_host(position) % self.block_size).max()) + 1  # the mirror: no sync
        if kv is not None and cap >= needed:
            return kv
        old = 0 if cache.keys is None else cache.keys.shape[2]
        capacity = old if old >= needed else min(max(needed, 2 * old, 16), self.block_size)
        if self.block_size <= 4096:  # a real block: all W slots at once, so no later step reads the host
            capacity = self.block_size
        heads = self.num_heads * (2 if aligned else 1)
        kv = like.new_zeros(2, bsz, heads, capacity, self.head_dim)
        views = [kv[0, :, : self.num_heads], kv[1, :, : self.num_heads]]
        if aligned:
            views += [kv[0, :, self.num_heads :], kv[1, :, self.num_heads :]]
        for view, field in zip(views, fields):
            if field is not None:
                view.narrow(2, 0, field.shape[2]).copy_(field)
        cache.keys, cache.values = views[:2]
        if aligned:
            cache.context_keys, cache.context_values = views[2:]
        cache.step_kv = (kv, views, (kv[0], kv[1], kv.permute(1, 3, 0, 2, 4)))
        return kv

    def _fused_step(self, h: torch.Tensor, cache: LayerCache, position: torch.Tensor,
                    context: torch.Tensor | None) -> torch.Tensor:
        bsz, heads, d = h.shape[0], self.num_heads, self.head_dim
        aligned = self.context == "aligned"
        fused, kv_weight = self._step_weights()
        cap = self.step_buffer(cache, h, position).shape[3]
        keys, values, slot_major = cache.step_kv[2]
        tables = self._step_tables(cap, h.device)
        rows = tables["rows"].get(bsz)
        if rows is None:
            rows = tables["rows"][bsz] = torch.arange(bsz, device=h.device)
        phase = position % self.block_size
        proj = torch.mm(h, fused).view(bsz, -1, heads, d)  # (B, G, H, d): q, [q_cross,] k, v
        if self.rope:
            cos, sin = tables["rope"].index_select(0, phase).unbind(1)  # (B, G, 1, d) each
            x = proj.float()
            proj = torch.addcmul(x * cos, x.roll(d // 2, -1), sin).to(h.dtype)
        groups = 2 if aligned else 1  # query groups, then [k, v]
        q, new = proj.split([groups, 2], 1)  # new (B, 2, H, d): keys (rotated to their slot) and values
        if aligned:
            ctx = self.context_norm.step(context)  # (B, D) or (B, H, D)
            if self.context_per_head:
                ckv = torch.einsum("bhd,hde->bhe", ctx, kv_weight.to(ctx.dtype)).view(bsz, heads, 2, d)
                ckv = ckv.transpose(1, 2)
            else:
                ckv = torch.mm(ctx, kv_weight).view(bsz, 2, heads, d)
            new = torch.cat([new, ckv.to(new.dtype)], dim=2)
        slot_major.index_put_((rows, phase), new)  # (B, cap, 2, heads, d) view of the buffer: written in place
        if tables["mask"] is not None:
            mask = tables["mask"].index_select(0, phase)  # (B, 1, 1, cap)
        else:
            mask = torch.zeros((), device=h.device).masked_fill(tables["slots"] > phase[:, None], float("-inf"))
            mask = mask.view(bsz, 1, 1, cap)
        q = q.reshape(bsz, groups * heads, 1, d)
        if q.dtype is torch.float32 and not torch.is_autocast_enabled(q.device.type):
            # one query: scores, softmax, sum as three batched products (SDPA's kernel costs more at this size)
            n = bsz * groups * heads
            mask = mask.expand(bsz, groups * heads, 1, cap).reshape(n, 1, cap) if bsz > 1 else mask.view(1, 1, cap)
            scores = torch.baddbmm(mask, q.reshape(n, 1, d), keys.reshape(n, cap, d).transpose(1, 2), alpha=d**-0.5)
            out = torch.bmm(torch.softmax(scores, -1), values.reshape(n, cap, d))
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.to(q.dtype))
        return F.linear(out.reshape(bsz, groups * heads * d), self.out.weight)
