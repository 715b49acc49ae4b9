"""The Block-State Transformer layer and the plain Block Transformer layer between BST layers.

BST layer (spec section 2), for x (B, L, D):

    u   = norm(x)
    y   = SSM(u)                        (B, D, C, L), C = 1 (SH), H (MH), S (MF) filters per channel
    ctx = ContextStates(y)              variant specific (spec section 3)
    x   = x + Proj(concat(SelfAttn_block(u), CrossAttn_block(u, ctx)))     all blocks at once
    x   = x + FFN(norm(x))

The SSM output only feeds the context states; it is not added to the residual stream. Beyond the paper,
``ssm_residual`` also puts it into the stream, as gated state-space layers (GSS, H3) do, y' = mean_c y:

    "gated":  x   = x + Proj(concat(...)) + W_o(GELU(W_g u) * y')
    "ffn":    the FFN becomes a GLU gated by the SSM, x = x + W_down(GELU(W_up norm(x)) * W_y y')

Why: in the paper's design the SSM reaches the stream only as cross-attention keys/values, so a token at the
start of a block sees its recent past only through attention to a summary; GSS-Hybrid, which puts its SSM into
the stream in every layer, beat every paper-configured BST on long books at equal parameters (issue 15).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers.initialization as init
from torch import nn

from blockstate.layers.attention import BlockAttention
from blockstate.layers.cache import LayerCache, no_grad_step
from blockstate.layers.common import FeedForward, RMSNorm, num_blocks
from blockstate.layers.ssm import LongConvSSM, kernel_from_config

VARIANTS = ("sh", "mh", "mf")


class ContextStates(nn.Module):
    """SSM over the whole segment, then the variant's context states.

    - ``sh``: (B, L, D), the single filter's output at every position (aligned with the tokens);
    - ``mh``: (B, L, H, D), filter h's output feeds head h;
    - ``mf``: (B, nb, S, D), the S filters' outputs at the last position of block k-1 for block k (shifted along the
      block axis), a learned initial context for block 0, plus learned context IDs (the S states have no order).
    """

    def __init__(self, config, variant: str | None = None):
        super().__init__()
        variant = variant or config.variant  # SSMStreamLayer asks for "sh": one filter, no context states
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
        self.variant, self.block_size = variant, config.block_size
        dim = config.hidden_size
        filters = {"sh": 1, "mh": config.num_attention_heads, "mf": config.num_context_states}[variant]
        self.ssm = LongConvSSM(dim, filters, kernel_from_config(config, config.kernel, dim, filters))
        if self.variant == "mf":
            self.initial_context = nn.Parameter(torch.empty(filters, dim))
            self.context_ids = nn.Parameter(torch.empty(filters, dim))
        self.init_parameters(config.initializer_range)

    @torch.no_grad()
    def init_parameters(self, std: float) -> None:
        if self.variant == "mf":
            init.normal_(self.initial_context, 0.0, 1.0)  # comparable to the SSM outputs it stands in for
            init.normal_(self.context_ids, 0.0, std)

    def forward(self, u: torch.Tensor, cache: LayerCache | None = None, lengths: torch.Tensor | None = None,
                start: int = 0, stream: bool = False):
        """u (B, L, D) -> context states. With ``cache``: prefill (start = 0) or, for start > 0, continue a
        stream the cache has read ``start`` tokens of (block-aligned), then keep the state for what follows.
        ``stream=True`` returns (states, y), y (B, L, D) the SSM output averaged over its filters (the
        ``ssm_residual`` input)."""
        if self.variant == "mf" and cache is None:  # only the outputs at block ends are needed
            count = num_blocks(u.shape[1], self.block_size) - 1
            states = self.summaries(self.ssm.block_ends(u, self.block_size, count), None).to(u.dtype)
            return (states, self.ssm.mean_filter(u)) if stream else states
        if cache is None:  # SH / MH: the SSM's output made in the layout the attention reads
            y = self.ssm(u, tokens=True)  # (C, B, L, D) fp32
            # sh: (B, L, D); mh: (B, L, H, D) as a view of the head-major (H, B, L, D) tensor, so the norm over D
            # and the per-head projection (a batched matmul over heads) read it in place
            states = (y[0] if self.variant == "sh" else y.permute(1, 2, 0, 3)).to(u.dtype)
            return (states, y.mean(0)) if stream else states
        y = self.ssm(u, cache, start)  # (B, D, C, L), fp32
        # the SSM runs in fp32; its states meet the attention in the activations' dtype (a model cast to bf16)
        states = self._states(y, u, cache, lengths, start).to(u.dtype)
        return (states, y.mean(2).transpose(1, 2)) if stream else states

    def _states(self, y: torch.Tensor, u: torch.Tensor, cache: LayerCache | None, lengths: torch.Tensor | None,
                start: int) -> torch.Tensor:
        """The variant's layout of the SSM output y (B, D, C, L); with ``cache``, keep the SSM's state too."""
        previous = cache.last_output if (cache is not None and start > 0 and self.variant == "mf") else None
        if cache is not None:  # hand the SSM over to the recurrence at position start + lengths[b]
            self.ssm.fill_cache(cache, u, lengths, start)
            if self.variant == "mf":
                cache.last_output = y[torch.arange(y.shape[0], device=y.device), :, :, lengths - 1]
        if self.variant == "sh":
            return y[:, :, 0].transpose(1, 2)
        if self.variant == "mh":
            return y.permute(0, 3, 2, 1).contiguous()  # (B, L, H, D): the norm over D then reads memory in order
        return self.block_summaries(y, previous)

    @no_grad_step
    def step(self, u: torch.Tensor, cache: LayerCache, position: torch.Tensor, stream: bool = False):
        """u (B, D) at positions (B,) -> this position's context: sh (B, D), mh (B, H, D); mf (B, S, D), the
        states of a block starting at this position (the outputs at the previous position, or the initial
        context at position 0), which the attention takes up at block starts only. ``stream=True`` returns
        (context, y), y (B, D) the output averaged over filters, as in ``forward``."""
        y = self.ssm.step(cache, u, position)  # (B, D, C)
        states = self._step_states(y, u, cache, position).to(u.dtype)  # fp32 SSM -> the activations' dtype
        return (states, y.mean(-1)) if stream else states

    def _step_states(self, y: torch.Tensor, u: torch.Tensor, cache: LayerCache,
                     position: torch.Tensor) -> torch.Tensor:
        if self.variant == "sh":
            return y[..., 0]
        if self.variant == "mh":
            return y.transpose(1, 2)
        initial = self.initial_context.float().expand(u.shape[0], -1, -1)
        if cache.last_output is None:
            states = initial
        else:
            states = torch.where((position == 0).view(-1, 1, 1), initial, cache.last_output.transpose(1, 2))
        cache.last_output = y
        return states + self.context_ids.float()

    def block_summaries(self, y: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """MF: (B, D, S, L) -> (B, nb, S, D). Block k gets the outputs at position k*W - 1; block 0 the learned
        initial context, or ``previous`` (B, D, S), the outputs just before a continued chunk. Only complete
        blocks before the last one are summarised, so padding never leaks in."""
        nb = num_blocks(y.shape[-1], self.block_size)
        return self.summaries(y[..., self.block_size - 1 :: self.block_size][..., : nb - 1], previous)

    def summaries(self, ends: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """MF: the outputs at the ends of blocks 0..nb-2, (B, D, S, nb-1) -> context states (B, nb, S, D)."""
        bsz = ends.shape[0]
        if previous is None:
            first = self.initial_context.float().expand(bsz, 1, -1, -1)
        else:
            first = previous.transpose(1, 2).unsqueeze(1)
        states = torch.cat([first, ends.permute(0, 3, 2, 1)], dim=1)
        return states + self.context_ids.float()


class GatedSSMResidual(nn.Module):
    """Beyond the paper (``ssm_residual="gated"``): W_o(GELU(W_g u) * y), the SSM output y gated by the layer's
    normed input, added to the residual stream beside the attention (GSS's gate, without its narrow branch)."""

    def __init__(self, dim: int, dropout: float = 0.0):
        super().__init__()
        self.gate = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.out._residual_output = True  # depth-scaled init, like every residual branch's output
        self.dropout = nn.Dropout(dropout)

    def forward(self, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.out(F.gelu(self.gate(u)) * y.to(u.dtype)))


class SSMGatedFeedForward(nn.Module):
    """Beyond the paper (``ssm_residual="ffn"``): the BST layer's FFN as a GLU whose second branch is the SSM
    output, W_down(GELU(W_up v) * W_y y), as a GSS layer's wide gate multiplies its expanded SSM branch. The same
    three matrices as a GLU FFN: the SSM reaches the stream with no extra projection."""

    def __init__(self, dim: int, intermediate: int, dropout: float = 0.0):
        super().__init__()
        self.up = nn.Linear(dim, intermediate, bias=False)
        self.expand = nn.Linear(dim, intermediate, bias=False)
        self.down = nn.Linear(intermediate, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(v)) * self.expand(y.to(v.dtype))))


class BlockTransformerLayer(nn.Module):
    """Pre-norm block-local self-attention + FFN: the layers between BST layers (no SSM, no cross-attention)."""

    def __init__(self, config, context: str | None = None, context_per_head: bool = False):
        super().__init__()
        dim = config.hidden_size
        self.norm = RMSNorm(dim, config.rms_norm_eps)
        self.attention = BlockAttention(
            dim, config.num_attention_heads, config.block_size, context=context,
            context_per_head=context_per_head, attend_previous_block=config.attend_previous_block,
            previous_window=config.previous_block == "window",
            rope=config.position_encoding == "rope", rope_theta=config.rope_theta,
            dropout=config.hidden_dropout, attention_dropout=config.attention_dropout, eps=config.rms_norm_eps,
        )
        self.ffn_norm = RMSNorm(dim, config.rms_norm_eps)
        self.ffn = FeedForward(dim, config.intermediate_size, config.hidden_dropout)
        self.context: ContextStates | None = None  # BSTLayer sets it
        self.ssm_residual: GatedSSMResidual | None = None  # BSTLayer sets it with ssm_residual="gated"
        self.ssm_ffn = False  # BSTLayer sets it with ssm_residual="ffn" (self.ffn is an SSMGatedFeedForward)
        self.attention.out._residual_output = True  # depth-scaled init (BlockStatePreTrainedModel)
        self.ffn.down._residual_output = True

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None, lengths: torch.Tensor | None = None,
                start: int = 0) -> torch.Tensor:
        """x (B, L, D). With ``cache``, also keep what decoding needs (row b holds lengths[b] real tokens); with
        start > 0, continue the stream the cache has read ``start`` tokens of (start a multiple of W)."""
        u = self.norm(x)
        context = stream = None
        if self.ssm_residual is not None or self.ssm_ffn:
            context, stream = self.context(u, cache, lengths, start, stream=True)
        elif self.context is not None:
            context = self.context(u, cache, lengths, start)
        if self.attention.context is None:  # an SSMStreamLayer's SSM feeds the stream only
            context = None
        past = None
        if start > 0 and self.attention.attend_previous_block:  # at a block start "current" is the last block
            past = self.attention.block_past(cache)
        x = x + self.attention(u, context, past_kv=past)
        if self.ssm_residual is not None:
            x = x + self.ssm_residual(u, stream)
        if cache is not None:
            self.attention.fill_cache(cache, u, context, lengths)
        return x + (self.ffn(self.ffn_norm(x), stream) if self.ssm_ffn else self.ffn(self.ffn_norm(x)))

    @no_grad_step
    def step(self, x: torch.Tensor, cache: LayerCache, position: torch.Tensor) -> torch.Tensor:
        """One token per row: x (B, D) at positions (B,) -> (B, D), equal to the parallel forward there."""
        u = self.norm.step(x)
        context = stream = None
        if self.ssm_residual is not None or self.ssm_ffn:
            context, stream = self.context.step(u, cache, position, stream=True)
        elif self.context is not None:
            context = self.context.step(u, cache, position)
        if self.attention.context is None:
            context = None
        x = x + self.attention.step(u, cache, position, context)
        if self.ssm_residual is not None:
            x = x + self.ssm_residual(u, stream)
        v = self.ffn_norm.step(x)
        if self.ssm_ffn:
            return x + self.ffn(v, stream)
        if type(self.ffn) is FeedForward:
            return self.ffn.step(v, residual=x)  # without three module calls and an identity dropout
        return x + self.ffn(v)

    def allocate_inference_cache(self) -> LayerCache:
        """An empty cache; buffers are sized on first use (prefill or step)."""
        return LayerCache()


class BSTLayer(BlockTransformerLayer):
    """Block Transformer layer whose blocks also cross-attend to SSM context states (variant sh / mh / mf)."""

    def __init__(self, config):
        layout = "states" if config.variant == "mf" else "aligned"
        super().__init__(config, context=layout, context_per_head=config.variant == "mh")
        self.context = ContextStates(config)
        attach_ssm_residual(self, config)


class SSMStreamLayer(BlockTransformerLayer):
    """Beyond the paper (``ssm_residual_layers="all"``): a layer between BST layers that has an SSM of its own
    (one filter per channel, the config's kernel) whose output reaches the stream as ``ssm_residual`` says, and
    no context states or cross-attention. Why: GSS-Hybrid puts an SSM into the stream in 5 of its 6 layers, the
    tuned BST only in its BST layers; this gives every layer one at the price of a third FFN matrix, not of a
    cross-attention (see "Long context on books" in the README)."""

    def __init__(self, config):
        super().__init__(config)
        self.context = ContextStates(config, variant="sh")
        attach_ssm_residual(self, config)


def attach_ssm_residual(layer: BlockTransformerLayer, config) -> None:
    """Give ``layer`` the branch by which its SSM output reaches the stream (``config.ssm_residual``)."""
    if config.ssm_residual == "gated":
        layer.ssm_residual = GatedSSMResidual(config.hidden_size, config.hidden_dropout)
    elif config.ssm_residual == "ffn":
        layer.ssm_ffn = True
        layer.ffn = SSMGatedFeedForward(config.hidden_size, config.intermediate_size, config.hidden_dropout)
        layer.ffn.down._residual_output = True
