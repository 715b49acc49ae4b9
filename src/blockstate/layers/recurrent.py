"""The Block-Recurrent Transformer's recurrent layer (Hutchins et al. 2022), as the BST paper's Rec:fixed:skip.

One layer of a sliding-window stack also holds S state vectors. The segment is walked block by block (that is the
point: BRecT is sequential across blocks, BST is not). For each block of W tokens, with c the state before it:

    s = norm(c) + ids     the states' pre-attention norm, then their learned IDs (as meliad adds them)
    tokens ("vertical"):  x = x + Proj(concat(SlidingSelfAttn(norm x), CrossAttn(norm x -> s)))
                          x = x + FFN(norm x)
    states ("horizontal"): z = Proj_s(concat(SelfAttn(s -> s), CrossAttn(s -> block tokens)))
                          c' = c * g + z * (1 - g),  g = sigmoid(b)          ("fixed" gate; "lstm" is an option)

"skip": no FFN on the state path. Following meliad (the authors' code, ``transformer_layer.py`` and the KVQ layer
of ``transformer_base.py``), the state IDs are added *after* the states' pre-attention norm and are initialised
N(0, 1), as strong as the normed states they tell apart; the initial state is N(0, 1) too. Both are exempt from
weight decay (``blockstate.training.optim``). The gate keeps this project's documented initialisation, b =
``state_gate_bias`` (default 2: g = 0.88, the state mostly kept at first), not a value taken from meliad (its
gate initialisation could not be checked here).

The vertical half is exactly a ``BlockTransformerLayer`` whose ``BlockAttention`` cross-attends to ``"states"``
(a W x 2W sliding tile plus S unmasked states), so this layer subclasses it and calls it on one block at a time.
As in BRecT, keys/values are shared between the two directions: the states' keys and values come from the
attention's context projection (its context norm is replaced by ``StateNorm``, which adds the IDs), the tokens'
from its self-attention projection (``return_kv``); only the states' queries, their output projection and the
gate are new parameters.
"""

from __future__ import annotations

import torch
import transformers.initialization as init
from torch import nn

from blockstate.layers.bst import BlockTransformerLayer
from blockstate.layers.cache import LayerCache
from blockstate.layers.common import RMSNorm

KV = tuple[torch.Tensor, torch.Tensor]


def last_window(past: torch.Tensor | None, new: torch.Tensor, window: int) -> torch.Tensor:
    """The last ``window`` positions (dim 2) of the stream ``past`` then ``new``: the keys/values to carry on."""
    if new.shape[2] >= window or past is None:
        return new[:, :, -window:]
    return torch.cat([past.to(new.dtype), new], dim=2)[:, :, -window:]


def carry_block_layer(layer: BlockTransformerLayer, x: torch.Tensor, past_kv: KV | None,
                      context: torch.Tensor | None = None) -> tuple[torch.Tensor, KV]:
    """``layer(x)`` with carried keys/values: block 0 sees ``past_kv`` (the previous W positions) as its previous
    block; returns the new residual stream and the last W keys/values of the stream so far, for what follows.
    (``BlockTransformerLayer.forward`` takes a past only from an inference cache, hence these three lines.)"""
    out, (k, v) = layer.attention(layer.norm(x), context, past_kv=past_kv, return_kv=True)
    x = x + out
    x = x + layer.ffn(layer.ffn_norm(x))
    w = layer.attention.block_size
    past_k, past_v = (None, None) if past_kv is None else past_kv
    return x, (last_window(past_k, k, w), last_window(past_v, v, w))


class StateNorm(RMSNorm):
    """The states' pre-attention norm followed by their learned IDs: norm(c) + ids, for states (..., S, D)."""

    def __init__(self, dim: int, num_states: int, eps: float = 1e-6):
        super().__init__(dim, eps)
        self.state_ids = nn.Parameter(torch.empty(num_states, dim))  # the states have no order otherwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.state_ids.to(x.dtype)


class BlockRecurrentLayer(BlockTransformerLayer):
    """A sliding-window Block Transformer layer with S recurrent state vectors, walked block by block."""

    def __init__(self, config):
        if not config.attend_previous_block:
            raise ValueError("BlockRecurrentLayer needs attend_previous_block=True (a sliding-window stack)")
        super().__init__(config, context="states")
        dim, self.num_states, self.gate_kind = config.hidden_size, config.num_state_vectors, config.state_gate
        self.gate_bias_init = config.state_gate_bias
        self.initial_state = nn.Parameter(torch.empty(self.num_states, dim))
        # every use of the states (their queries, the keys/values both directions read) goes through the
        # attention's context norm: IDs added there sit after the norm, where meliad adds them
        self.attention.context_norm = StateNorm(dim, self.num_states, config.rms_norm_eps)
        self.state_queries = nn.Linear(dim, 2 * dim, bias=False)  # self- and cross-attention queries of the states
        self.state_out = nn.Linear(2 * dim, dim, bias=False)
        if self.gate_kind == "fixed":
            self.gate_bias = nn.Parameter(torch.empty(dim))
        else:  # "lstm": input and forget gates from z; biases apart so the init reads them as gate biases
            self.gate = nn.Linear(dim, 2 * dim, bias=False)
            self.gate_bias = nn.Parameter(torch.empty(2, dim))
        self.init_parameters(config.initializer_range)  # usable standalone; a PreTrainedModel re-initialises

    @property
    def state_ids(self) -> nn.Parameter:
        """(S, D) learned state IDs, added after the states' norm (they live in ``attention.context_norm``)."""
        return self.attention.context_norm.state_ids

    @torch.no_grad()
    def init_parameters(self, std: float) -> None:
        init.normal_(self.initial_state, 0.0, 1.0)  # normed before use, like the MF initial context
        init.normal_(self.state_ids, 0.0, 1.0)  # meliad: N(0, 1), added after the norm
        if self.gate_kind == "fixed":
            init.constant_(self.gate_bias, self.gate_bias_init)  # g = sigmoid(b) near 1: keep the state at first
        else:
            b = self.gate_bias_init  # input gate starts mostly shut, forget gate mostly open
            init.copy_(self.gate_bias, torch.tensor([-b, b])[:, None].expand_as(self.gate_bias))

    def initial(self, batch: int) -> torch.Tensor:
        return self.initial_state.expand(batch, -1, -1)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None,
                past_kv: KV | None = None) -> tuple[torch.Tensor, torch.Tensor, KV | None]:
        """x (B, L, D), state (B, S, D) before the segment (None: the learned initial state), past_kv the previous W
        positions' keys/values (None: none). Returns x, the state after the last block and the last W keys/values."""
        if state is None:
            state = self.initial(x.shape[0])
        w = self.attention.block_size
        blocks, kv = [], past_kv
        for start in range(0, x.shape[1], w):
            block, kv_next = carry_block_layer(self, x[:, start : start + w], kv, state[:, None].to(x.dtype))
            blocks.append(block)
            n = block.shape[1]  # the block's own keys/values: the last n of the window (a last block may be short)
            state = self.update_state(state, kv_next[0][:, :, -n:], kv_next[1][:, :, -n:])
            kv = kv_next
        return torch.cat(blocks, dim=1), state, kv

    def update_state(self, state: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """c (B, S, D) -> c' after a block whose tokens have ``keys``/``values`` (B, H, n, d)."""
        attn = self.attention
        heads, d = attn.num_heads, attn.head_dim
        q_self, q_cross = self.state_queries(attn.context_norm(state)).unflatten(-1, (2, heads, d)).unbind(2)
        k_states, v_states = attn.context_keys_values(state)  # (B, S, H, d) each, from norm(c) + ids
        q_self, q_cross, k_states, v_states = (t.transpose(1, 2) for t in (q_self, q_cross, k_states, v_states))
        a_self = attn._sdpa(q_self, k_states, v_states)  # no mask: the states see each other and the whole block
        a_cross = attn._sdpa(q_cross.to(keys.dtype), keys, values)
        z = self.state_out(torch.cat([a_self, a_cross.to(a_self.dtype)], dim=1).transpose(1, 2).flatten(2))
        if self.gate_kind == "fixed":
            g = torch.sigmoid(self.gate_bias)
            return state * g + z * (1 - g)
        i, f = (self.gate(z) + self.gate_bias.flatten()).chunk(2, dim=-1)
        return state * torch.sigmoid(f) + torch.tanh(z) * torch.sigmoid(i)

    # -- streaming: the recurrence, one token at a time -------------------------------------------------------
    @torch.no_grad()
    def step(self, x: torch.Tensor, cache: LayerCache, position: torch.Tensor) -> torch.Tensor:
        """One token per row. Tokens cross-attend to the current state (its keys/values are taken up at each
        block start, when the state has just changed); when a row completes a block, its state is updated from
        that block's keys/values exactly as in the parallel pass."""
        if cache.recurrent_state is None:
            cache.recurrent_state = self.initial(x.shape[0]).float().clone()
        state = cache.recurrent_state
        u = self.norm(x)
        x = x + self.attention.step(u, cache, position, state.to(x.dtype))
        x = x + self.ffn(self.ffn_norm(x))
        ends = (position + 1) % self.attention.block_size == 0
        if bool(((cache.positions_on_host(position) + 1) % self.attention.block_size == 0).any()):  # no sync
            keys, values = self.attention.block_past(cache)  # the finished block, keys un-rotated
            new = self.update_state(state, keys, values)
            cache.recurrent_state = torch.where(ends.view(-1, 1, 1), new.float(), cache.recurrent_state)
        return x
