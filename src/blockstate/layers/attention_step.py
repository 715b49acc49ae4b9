"""The streaming half of ``BlockAttention``: filling the cache from a prefill, and one token at a time.

A mixin, so that ``attention.py`` holds the parallel forward (the test oracle) and this file the decode step,
written for few ops per token (a decode step of a small model is dispatch-bound): projections fused from the
parameters (the state dict is unchanged), RoPE and the causal mask looked up from per-slot tables, one K/V buffer
of W slots per layer written in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blockstate.layers.cache import LayerCache, cached_on, gather_positions, grow, no_grad_step, step_constant
from blockstate.layers.common import apply_rope, rope_cos_sin

_phase_memo: tuple = (None, -1, 0, None)


def phase_of(position: torch.Tensor, block_size: int) -> torch.Tensor:
    """``position % block_size``, computed once per decoding step: every layer of a step gets the same position
    tensor (and a static decoder bumps it in place, hence its version in the key)."""
    global _phase_memo
    if torch.compiler.is_compiling():
        return position % block_size
    memo = _phase_memo
    if memo[0] is position and memo[1] == position._version and memo[2] == block_size:
        return memo[3]
    phase = position % block_size
    _phase_memo = (position, position._version, block_size, phase)
    return phase


class BlockAttentionStep:
    """``fill_cache`` / ``step`` of :class:`blockstate.layers.attention.BlockAttention` (see there)."""

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

    @step_constant
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
        additive causal mask (cap, 1, cap) for capacities up to 1024 (else built per step from the slots)."""
        tables = self.__dict__.setdefault("_step_tables_cache", {})
        key = (cap, device)
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
                    torch.ones(cap, cap, dtype=torch.bool, device=device).triu_(1), float("-inf")).view(cap, 1, cap)
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
        # what the step reads: keys and values (B, heads, cap, d), the (B, cap, 2, heads, d) view it writes, and
        # keys transposed and values as the batched products take them, (B*heads, d, cap) and (B*heads, cap, d)
        n = bsz * heads
        cache.step_kv = (kv, views, (kv[0], kv[1], kv.permute(1, 3, 0, 2, 4),
                                     kv[0].view(n, capacity, self.head_dim).transpose(1, 2),
                                     kv[1].view(n, capacity, self.head_dim)))
        return kv

    def _fused_step(self, h: torch.Tensor, cache: LayerCache, position: torch.Tensor,
                    context: torch.Tensor | None) -> torch.Tensor:
        bsz, heads, d = h.shape[0], self.num_heads, self.head_dim
        aligned = self.context == "aligned"
        fused, kv_weight = self._step_weights()
        cap = self.step_buffer(cache, h, position).shape[3]
        keys, values, slot_major, keys_t, values_n = cache.step_kv[2]
        tables = self._step_tables(cap, h.device)
        rows = tables["rows"].get(bsz)
        if rows is None:
            rows = tables["rows"][bsz] = torch.arange(bsz, device=h.device)
        phase = phase_of(position, self.block_size)
        # one stream on the host: its slot as a Python int (the mirror, no read), so the table lookups and the
        # write are views and a copy (index_select / index_put_ with an index tensor took 20-30 us each in a
        # step on AMD EPYC); batches and accelerators keep the index tensors, which a CUDA graph can capture
        slot = None
        if bsz == 1 and h.device.type == "cpu" and not torch.compiler.is_compiling():
            slot = int(cache.positions_on_host(position)) % self.block_size
        proj = torch.mm(h, fused).view(bsz, -1, heads, d)  # (B, G, H, d): q, [q_cross,] k, v
        fp32 = h.dtype is torch.float32
        if self.rope:
            rope = tables["rope"]  # (cap, 2, G, 1, d)
            cos, sin = rope.index_select(0, phase).unbind(1) if slot is None else rope[slot].unbind(0)
            x = proj if fp32 else proj.float()
            proj = torch.addcmul(x * cos, x.roll(d // 2, -1), sin)
            proj = proj if fp32 else proj.to(h.dtype)
        groups = 2 if aligned else 1  # query groups, then [k, v]
        q, new = proj.split_with_sizes([groups, 2], 1)  # new (B, 2, H, d): keys (rotated to their slot), values
        if aligned:
            ctx = self.context_norm.step(context)  # (B, D) or (B, H, D)
            if self.context_per_head:
                ckv = torch.einsum("bhd,hde->bhe", ctx, kv_weight.to(ctx.dtype)).view(bsz, heads, 2, d)
                ckv = ckv.transpose(1, 2)
            else:
                ckv = torch.mm(ctx, kv_weight).view(bsz, 2, heads, d)
            new = torch.cat([new, ckv if ckv.dtype is new.dtype else ckv.to(new.dtype)], dim=2)
        # (B, cap, 2, heads, d) view of the buffer: written in place
        if slot is None:
            slot_major.index_put_((rows, phase), new)
        else:
            slot_major[:, slot].copy_(new)
        if tables["mask"] is not None:
            mask = tables["mask"].index_select(0, phase) if slot is None else tables["mask"][slot]  # (B or 1, 1, cap)
        else:
            mask = torch.zeros((), device=h.device).masked_fill(tables["slots"] > phase[:, None], float("-inf"))
            mask = mask.view(bsz, 1, cap)
        n = bsz * groups * heads
        if fp32 and not torch.is_autocast_enabled(h.device.type):
            # one query: scores, softmax, sum as three batched products (SDPA's kernel costs more at this size),
            # on views of the buffer made once (``step_buffer``)
            if bsz > 1:
                mask = mask.repeat_interleave(groups * heads, 0)
            scores = torch.baddbmm(mask, q.reshape(n, 1, d), keys_t, alpha=d**-0.5)
            out = torch.bmm(torch.softmax(scores, -1), values_n)
        else:
            out = F.scaled_dot_product_attention(q.reshape(bsz, groups * heads, 1, d), keys, values,
                                                 attn_mask=mask.view(bsz, 1, 1, cap).to(q.dtype))
        return F.linear(out.view(bsz, groups * heads * d), self.out.weight)
