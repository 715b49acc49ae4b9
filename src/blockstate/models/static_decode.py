"""Static-cache decoding: the decode step over buffers allocated once, written only in place, and on CUDA captured
in a CUDA graph and replayed per token (issue 16).

``model(prompt, use_cache=True, static_cache=True)`` (or ``model.generate(..., static_cache=True)``, or
``SamplingConfig(static_cache=True)`` in ``blockstate.generation``) prefills as usual and then hands the cache to a
:class:`StaticDecoder`: every layer's keys/values get their full W slots, the S4D state exists, and every later
token is one call of the same step on the same tensors. Nothing in that step reads the host (block starts, buffer
growth), so on CUDA the second token captures it (``torch.cuda.CUDAGraph``) and every later one replays it: one
launch per token instead of a few hundred. On CPU the same static step runs eagerly, equal to the dynamic one.

Beam search and ``index_select`` replace the cache's tensors; before each step the decoder copies whatever replaced
them back into its own (the graph keeps reading the same memory). A different batch size starts a new decoder.

Supported: BST SH / MH with S4D kernels and plain block-attention layers, the layers whose step is the fused one
(``BlockAttention.fused_step``). Everything else (MF context states and attention to the previous block decide per
token on the host; unstructured kernels and full attention grow their buffers with the context) is refused in one
line by :func:`static_decode_unsupported`.
"""

from __future__ import annotations

import torch

from blockstate.layers.bst import BlockTransformerLayer

STATIC_BLOCK_LIMIT = 4096  # a "block" longer than this is full attention: its buffer grows with the context


def static_decode_unsupported(model) -> str | None:
    """Why ``model`` cannot decode from a static cache, or None."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "step"):
        return f"{type(model).__name__} has no BST decode step"
    for i, layer in enumerate(layers):
        if type(layer).__name__ == "BlockRecurrentLayer" or not isinstance(layer, BlockTransformerLayer):
            return f"layer {i} ({type(layer).__name__}) walks its blocks in sequence"
        attention = layer.attention
        if not attention.fused_step:
            what = "attends to the previous block" if attention.attend_previous_block else "has MF context states"
            return f"layer {i} {what}, which the step decides per token on the host"
        if attention.block_size > STATIC_BLOCK_LIMIT:
            return f"layer {i} has full attention (block_size {attention.block_size}): its cache grows with the context"
        if layer.context is not None and not layer.context.ssm.recurrent:
            return f"layer {i} has an unstructured kernel: its input history grows with the context"
    return None


def check_static_decode(model) -> None:
    reason = static_decode_unsupported(model)
    if reason is not None:
        raise ValueError(f"static_cache=True needs a decode step with fixed-size, in-place buffers: {reason}; "
                         f"decode without it")


class StaticDecoder:
    """The decode step of ``model`` over ``cache`` (after its prefill), with fixed tensors; on CUDA a CUDA graph.

    ``graph=None`` captures on CUDA and runs eagerly elsewhere; ``graph=False`` always runs eagerly."""

    def __init__(self, model, cache, graph: bool | None = None):
        check_static_decode(model)
        self.model, self.cache = model, cache
        device = cache.position.device
        self.use_graph = device.type == "cuda" if graph is None else bool(graph and device.type == "cuda")
        self.graph: torch.cuda.CUDAGraph | None = None
        self._prepare()

    @torch.no_grad()
    def _prepare(self) -> None:
        """Full-size buffers for every layer; the tensors the step reads and writes, kept as ``self.fixed``."""
        inner, cache = self.model.model, self.cache
        bsz = cache.position.shape[0]
        like = torch.zeros(bsz, inner.config.hidden_size, dtype=inner.embed_tokens.weight.dtype,
                           device=cache.position.device)
        self.batch = bsz
        if not cache.position.is_contiguous():
            cache.set_position(cache.position.contiguous(), cache.host_position, cache._length)
        self.fixed: list[tuple[object, str, torch.Tensor]] = [(cache, "position", cache.position)]
        for layer, layer_cache in zip(inner.layers, cache.layers):
            layer.attention.step_buffer(layer_cache, like, cache.position, needed=layer.attention.block_size)
            names = ["keys", "values"] + (["context_keys", "context_values"] if layer.attention.context else [])
            if layer.context is not None:
                ssm = layer.context.ssm
                if layer_cache.ssm_state is None or not layer_cache.ssm_state.is_contiguous():
                    abar = ssm._step_coefficients()[0]
                    state = torch.zeros(bsz, ssm.channels * ssm.filters, abar.shape[-1], dtype=abar.dtype,
                                        device=like.device)
                    if layer_cache.ssm_state is not None:
                        state.copy_(layer_cache.ssm_state)
                    layer_cache.ssm_state = state
                names.append("ssm_state")
            self.fixed += [(layer_cache, name, getattr(layer_cache, name)) for name in names]
        self.tokens = torch.zeros(bsz, dtype=torch.long, device=like.device)
        self.logits: torch.Tensor | None = None
        self.graph, self.steps = None, 0  # a new capture warms up first (its lazily built tables too)

    def _bind(self) -> bool:
        """Point the cache at the fixed tensors again, copying in what replaced them (beam search); False when a
        shape changed (a new decoder is needed)."""
        for owner, name, fixed in self.fixed:
            current = getattr(owner, name)
            if current is fixed:
                continue
            if current is None or current.shape != fixed.shape:
                return False
            fixed.copy_(current)
            if owner is self.cache:  # the host mirror belongs to the replaced tensor: read again, lazily
                self.cache.position = fixed
            else:
                setattr(owner, name, fixed)
        return True

    def _body(self) -> torch.Tensor:
        """One token per row from ``self.tokens``: the model's step, advancing the position in place."""
        inner, cache = self.model.model, self.cache
        x = inner.embed_tokens(self.tokens)
        for layer, layer_cache in zip(inner.layers, cache.layers):
            x = layer.step(x, layer_cache, cache.position)
        cache.position.add_(1)
        return self.model.lm_head(inner.norm.step(x)).float()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) -> logits (B, V) fp32 for the next position; advances the cache."""
        cache = self.cache
        if tokens.shape[0] != self.batch or not self._bind():
            self._prepare()
        host, length = cache.positions_on_host(), cache.get_seq_length()
        self.tokens.copy_(tokens)
        if not self.use_graph:
            logits = self._body()
        elif self.graph is None and self.steps == 0:  # warm-up on a side stream (lazy state, cuBLAS workspaces)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                logits = self._body()
            torch.cuda.current_stream().wait_stream(stream)
        else:
            if self.graph is None:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.logits = self._body()
            self.graph.replay()
            logits = self.logits.clone()
        self.steps += 1
        cache.set_position(cache.position, host + 1, length + 1)
        return logits
