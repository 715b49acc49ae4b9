"""Static-cache decoding: the decode step over buffers allocated once, written only in place, and on CUDA captured
in a CUDA graph and replayed per token (issue 16).

``model(prompt, use_cache=True, static_cache=True)`` (or ``model.generate(..., static_cache=True)``, or
``SamplingConfig(static_cache=True)`` in ``blockstate.generation``) prefills as usual and then hands the cache to a
:class:`StaticDecoder`: every layer's keys/values get their full W slots, the S4D state exists, and every later
token is one call of the same step on the same tensors. Nothing in that step reads the host (block starts, buffer
growth), so on CUDA the second token captures it (``torch.cuda.CUDAGraph``) and every later one replays it: one
launch per token instead of a few hundred. On CPU the same static step runs eagerly, equal to the dynamic one.

``compile_decode=True`` (with ``static_cache=True``) also compiles that step with ``torch.compile`` (inductor: on
CPU its elementwise ops fused into C++ loops, a few kernels instead of ~150 dispatches per token; on CUDA the
compiled step is what the graph captures). The first token of a decoder runs eagerly (it builds the lazy tables and
fused weights), the second compiles (seconds, once per model configuration, batch size and dtype), the rest replay.
Its guards keep only the tensors' shapes, dtypes and strides (``torch.compiler.keep_tensor_guards_unsafe``): a
dispatch-bound step spends more time on the full guards than on its own ops. Everything else a guard would check is
fixed by the model's configuration, which is why each configuration gets its own compiled step (its own code
object, so its own dynamo cache), and the constants derived from the parameters are refreshed eagerly before every
call (``_refresh``), so a model trained between calls decodes with its new weights.

Beam search and ``index_select`` replace the cache's tensors; before each step the decoder copies whatever replaced
them back into its own (the graph keeps reading the same memory). A different batch size starts a new decoder.

Supported: BST SH / MH with S4D kernels and plain block-attention layers, the layers whose step is the fused one
(``BlockAttention.fused_step``). Everything else (MF context states and attention to the previous block decide per
token on the host; unstructured kernels and full attention grow their buffers with the context) is refused in one
line by :func:`static_decode_unsupported`.
"""

from __future__ import annotations

import types

import torch

from blockstate.layers.bst import BlockTransformerLayer
from blockstate.layers.cache import step_constant_methods

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


_COMPILED: dict[tuple, object] = {}  # (configuration, device, dtype, training, autocast) -> the compiled step


def _compiled_body(model):
    """``StaticDecoder._body`` compiled for ``model``'s configuration: a copy of its code object per configuration,
    because dynamo keeps its cache on the code object and the guards kept here cannot tell configurations apart."""
    weight = next(model.parameters())
    autocast = torch.is_autocast_enabled(weight.device.type)
    key = (model.config.to_json_string(use_diff=False), str(weight.device), weight.dtype, model.training,
           torch.get_autocast_dtype(weight.device.type) if autocast else None)
    if key not in _COMPILED:
        plain = StaticDecoder._body
        body = types.FunctionType(plain.__code__.replace(), plain.__globals__, plain.__name__)
        _COMPILED[key] = torch.compile(body, dynamic=False, fullgraph=True,
                                       options={"guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe})
    return _COMPILED[key]


class StaticDecoder:
    """The decode step of ``model`` over ``cache`` (after its prefill), with fixed tensors; on CUDA a CUDA graph.

    ``graph=None`` captures on CUDA and runs eagerly elsewhere; ``graph=False`` always runs eagerly.
    ``compile=True``: the step compiled with ``torch.compile`` from the second token on (see the module's doc)."""

    def __init__(self, model, cache, graph: bool | None = None, compile: bool = False):
        check_static_decode(model)
        self.model, self.cache = model, cache
        device = cache.position.device
        self.use_graph = device.type == "cuda" if graph is None else bool(graph and device.type == "cuda")
        self.graph: torch.cuda.CUDAGraph | None = None
        self.compiled = _compiled_body(model) if compile else None
        self.constants = step_constant_methods(model) if compile else []  # every layer's, found once
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

    def _refresh(self) -> None:
        """Rebuild, eagerly, the constants the step derives from the parameters where a parameter changed (the
        compiled step reads them as they are: it cannot trace the data-pointer check)."""
        for build in self.constants:
            build()

    def _run(self) -> torch.Tensor:
        if self.compiled is None or self.steps == 0:  # the first token builds the lazy tables eagerly
            return self._body()
        self._refresh()
        try:
            return self.compiled(self)
        except Exception as error:  # inductor needs a C++ compiler on CPU (Triton on CUDA)
            if self.steps > 1:
                raise
            raise RuntimeError(f"compile_decode=True: torch.compile could not compile the decode step "
                               f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); decode without "
                               f"it") from None

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
            logits = self._run()
        elif self.graph is None and self.steps < (1 if self.compiled is None else 2):
            # warm-up on a side stream (lazy state, cuBLAS workspaces; the compilation, which must not be captured)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                logits = self._run()
            torch.cuda.current_stream().wait_stream(stream)
        else:
            if self.graph is None:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.logits = self._run()
            self.graph.replay()
            logits = self.logits.clone()
        self.steps += 1
        cache.set_position(cache.position, host + 1, length + 1)
        return logits
