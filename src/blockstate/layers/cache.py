"""Inference caches: what each layer keeps between tokens when it runs as a recurrence.

Constant memory per layer for S4D kernels: the current block's keys/values (and the previous block's with
``attend_previous_block``), the context states' keys/values, and the SSM state. Unstructured kernels keep the
input history instead (exact incremental convolution), which grows with the context.

Each row of a batch has its own position (prompts of different lengths), so a row's place inside its block is
``position % W`` and every operation below is per row.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields

import torch


@dataclass
class LayerCache:
    """One layer's streaming state. Buffers are allocated lazily by the layer that owns them."""

    keys: torch.Tensor | None = None  # (B, H, cap, d) current block, before RoPE; cap grows up to W
    values: torch.Tensor | None = None
    prev_keys: torch.Tensor | None = None  # previous block (attend_previous_block)
    prev_values: torch.Tensor | None = None
    context_keys: torch.Tensor | None = None  # aligned: (B, H, cap, d); states (MF): (B, H, S, d)
    context_values: torch.Tensor | None = None
    ssm_state: torch.Tensor | None = None  # S4D: (B, D*C, N/2) complex
    history: torch.Tensor | None = None  # other kernels: (B, D, cap) inputs so far, row-aligned at 0
    kernel: torch.Tensor | None = None  # other kernels: (D, C, cap), generated once per capacity
    last_output: torch.Tensor | None = None  # MF: (B, D, S) SSM output at the previous position
    recurrent_state: torch.Tensor | None = None  # Block-Recurrent baseline: (B, S, D) state vectors
    # the model cache's positions on the host, set before each step: shape decisions (buffer growth, "does any
    # row start a block") read it instead of the device, so a decode step does not wait for the GPU (issue 16)
    host_position: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def map_batch(self, fn) -> None:
        """Apply ``fn`` to every per-row tensor (all but the kernel, which has no batch dimension, and the host
        positions, which the model cache sets again before every step)."""
        for name, value in self.tensors().items():
            if name not in ("kernel", "host_position"):
                setattr(self, name, fn(value))

    def positions_on_host(self, position: torch.Tensor) -> torch.Tensor:
        """``position`` (B,) as a CPU tensor: the mirror the model set (free), else read from the device."""
        host = self.host_position
        return host if host is not None and host.shape == position.shape else position.cpu()


@dataclass
class BlockStateCache:
    """The model's cache: every layer's state plus each row's position. Works with ``generate()`` (beam search
    reorders it through ``reorder_cache``)."""

    position: torch.Tensor  # (B,) tokens consumed per row
    layers: list[LayerCache] = field(default_factory=list)
    host_position: torch.Tensor | None = None  # the same on the CPU, kept alongside: read without a sync
    # the position tensor the mirror belongs to: assigning ``position`` directly makes the mirror stale, and it is
    # then read again from the device, never used
    _host_of: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _length: int | None = field(default=None, repr=False, compare=False)  # the mirror's max, once read
    # a StaticDecoder (blockstate.models.static_decode) once a prefill asked for static_cache=True
    static: object | None = field(default=None, repr=False, compare=False)

    def positions_on_host(self) -> torch.Tensor:
        """The positions as a CPU tensor (the mirror when it is current, else one read from the device)."""
        if self.host_position is None or self._host_of is not self.position:
            self.host_position, self._host_of, self._length = self.position.cpu(), self.position, None
        return self.host_position

    def set_position(self, position: torch.Tensor, host: torch.Tensor | None = None,
                     length: int | None = None) -> None:
        """New positions, with their host mirror (and its max, ``length``) when the caller knows it (else it is
        read once, lazily)."""
        self.position, self.host_position, self._host_of = position, host, position
        self._length = length if host is not None else None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        host = self.positions_on_host()
        if self._length is None:  # a decoding step knows it (the last one's + 1): no op per token
            self._length = int(host.max()) if host.numel() else 0
        return self._length

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.index_select(beam_idx)

    def index_select(self, index: torch.Tensor) -> None:
        # the mirror goes stale with the new position tensor: read again when needed (beam search's index
        # lives on the device)
        self.position = self.position.index_select(0, index.to(self.position.device))
        for layer in self.layers:
            layer.map_batch(lambda t: t.index_select(0, index.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        current = self.host_position is not None and self._host_of is self.position
        host = self.host_position.repeat_interleave(repeats, 0) if current else None
        self.set_position(self.position.repeat_interleave(repeats, 0), host)
        for layer in self.layers:
            layer.map_batch(lambda t: t.repeat_interleave(repeats, 0))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers
                   for name, t in layer.tensors().items() if name != "host_position")


def grow(buffer: torch.Tensor | None, shape: tuple[int, ...], needed: int, limit: int | None, dim: int,
         dtype: torch.dtype, device) -> torch.Tensor:
    """Return ``buffer`` with at least ``needed`` slots along ``dim`` (doubling, capped at ``limit``)."""
    current = 0 if buffer is None else buffer.shape[dim]
    if current >= needed:
        return buffer
    capacity = max(needed, 2 * current, 16)
    if limit is not None:
        capacity = min(capacity, limit)
    new_shape = list(shape)
    new_shape[dim] = capacity
    out = torch.zeros(new_shape, dtype=dtype, device=device)
    if buffer is not None:
        out.narrow(dim, 0, current).copy_(buffer)
    return out


def gather_positions(x: torch.Tensor, starts: torch.Tensor, count: int) -> torch.Tensor:
    """x (B, T, ...) -> (B, count, ...): row b's positions starts[b] .. starts[b] + count - 1, clamped into
    [0, T - 1] (callers mask the slots that fall outside)."""
    index = (starts[:, None] + torch.arange(count, device=x.device)[None, :]).clamp(0, x.shape[1] - 1)
    index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index)


def step_constant(method):
    """Marks a module's method that returns a decoding constant through ``cached_on`` and takes no arguments, so
    a compiled step's caller can rebuild every such constant eagerly first (``step_constant_methods``)."""
    method._step_constant = True
    return method


def step_constant_methods(module: torch.nn.Module) -> list:
    """The bound ``@step_constant`` methods of ``module`` and its submodules: what to call, eagerly, before a
    compiled decoding step, which cannot trace ``cached_on``'s data-pointer check (``StaticDecoder``)."""
    found = []
    for m in module.modules():
        names = {n for cls in type(m).__mro__ for n, v in vars(cls).items() if getattr(v, "_step_constant", False)}
        found.extend(getattr(m, n) for n in sorted(names))
    return found


def cached_on(owner, name: str, params, build):
    """``build()``, kept on ``owner`` (a module) until one of ``params`` is moved, cast, replaced or updated in
    place: constants a decoding step derives from parameters (fused weights, discretised SSMs) are computed once,
    not per token. Not part of the state dict; a checkpoint loads into the parameters as before."""
    store = owner.__dict__.setdefault("_step_constants", {})
    if torch.compiler.is_compiling() and name in store:
        # a compiled decode step (``StaticDecoder(compile=True)``) reads what the eager refresh before each call
        # keeps current; data pointers cannot be traced
        return store[name][1]
    key = tuple((p.device, p.dtype, p.data_ptr(), p._version) for p in params)
    hit = store.get(name)
    if hit is None or hit[0] != key:
        hit = store[name] = (key, build())
    return hit[1]


def no_grad_step(fn):
    """``torch.no_grad()`` for a decoding step, entered only when gradients are on: the step of a model, each
    layer and sublayer runs without it (a context per call is a measurable share of a dispatch-bound step)."""

    @functools.wraps(fn)
    def step(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        with torch.no_grad():
            return fn(*args, **kwargs)

    return step
