"""Host-device synchronisations counted at the dispatcher (issue 16): the tests of the model's training and decode
steps (tests/models/test_host_syncs.py) and of the trainer's step (tests/training/test_step_syncs.py).

``SyncCounter`` is a TorchDispatchMode that records every aten op that needs a tensor's value on the host:
``_local_scalar_dense`` (what ``.item()``, ``int()``, ``bool()``, ``float()`` and ``is_nonzero`` decompose to;
``tolist()``, which reads memory without an aten op, is seen at the Python level), ``equal``, the ops whose output
shape depends on values (``nonzero`` and what decomposes to it, ``masked_select``, ``unique*``, ``bincount``,
boolean-mask indexing, ``repeat_interleave`` without ``output_size``) and, on a real accelerator, copies to the
host or blocking copies from it.

On an accelerator (``BLOCKSTATE_TEST_DEVICE=cuda``, as scripts/gpu-check.sh runs it) residency is read from each
tensor, and ``torch.cuda.set_sync_debug_mode`` is asked as a second opinion. On CPU, where every tensor is a host
tensor, the counter simulates an accelerator: every tensor counts as a device tensor except those declared to live
on the host (the step counters of a foreach AdamW, which torch keeps on the CPU, where fused AdamW keeps them on the
parameters' device; the data pipeline's batches and reset flags) and
what is computed from host tensors alone; the model's value checks are pointed at the same notion of residency.
"""

from __future__ import annotations

import os
import traceback
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

import blockstate.models.modeling_blockstate as modeling

DEVICE = torch.device(os.environ.get("BLOCKSTATE_TEST_DEVICE", "cpu"))

VALUE_OPS = {"_local_scalar_dense", "equal", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
             "unique_consecutive", "unique_dim_consecutive", "bincount", "histc"}
INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}
COPY_OPS = {"_to_copy", "copy_"}
FACTORIES = {"tensor", "as_tensor", "full", "zeros", "ones", "empty", "arange", "linspace", "logspace", "eye",
             "rand", "randn", "randint", "randperm"}


def _where() -> str:
    frames = [f for f in traceback.extract_stack()[:-2]
              if "blockstate" in f.filename or "torch/optim" in f.filename or "torch/nn" in f.filename]
    return f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"


class _Residency(TorchFunctionMode):
    """The simulated accelerator's notion of where a tensor lives, from the Python-level calls (which the
    dispatcher no longer distinguishes on CPU): a factory called without ``device=`` makes a host tensor, as do
    ``.cpu()`` and ``.to("cpu")`` (a device-to-host copy: counted as a sync when the input is on the device);
    ``.to(some_device)`` makes a device tensor (a blocking host-to-device copy, also a sync on CUDA, is counted;
    ``non_blocking=True`` is not)."""

    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        host = self.counter.host
        if name == "tolist" and args and self.counter.on_device(args[0]):  # reads memory: no aten op on CPU
            self.counter.hits[("tolist", _where())] += 1
        elif name in FACTORIES and "device" not in kwargs and isinstance(out, torch.Tensor):
            host[out] = True
        elif name in ("cpu", "to") and isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
            target = kwargs.get("device", args[1] if name == "to" and len(args) > 1 else None)
            if name == "cpu" or target == "cpu":  # meant for the host
                if self.counter.on_device(args[0]):
                    self.counter.hits[("device-to-host copy", _where())] += 1
                if out is args[0]:
                    out = out.clone()
                host[out] = True
            elif isinstance(target, torch.device) and not self.counter.on_device(args[0]):  # host -> device
                if not kwargs.get("non_blocking", False):
                    self.counter.hits[("blocking host-to-device copy", _where())] += 1
                if out is args[0]:
                    out = out.clone()
                host.pop(out, None)
        return out


class SyncCounter(TorchDispatchMode):
    """Counts host syncs by (op, where in blockstate / torch.optim it was called)."""

    def __init__(self, host: list[torch.Tensor] = ()):
        super().__init__()
        self.hits: Counter = Counter()
        self.simulated = DEVICE.type == "cpu"
        self.host = WeakIdKeyDictionary()
        for t in host:
            self.host[t] = True
        self.residency = _Residency(self) if self.simulated else None

    def __enter__(self):
        out = super().__enter__()
        if self.residency is not None:
            self.residency.__enter__()
        return out

    def __exit__(self, *exc):
        if self.residency is not None:
            self.residency.__exit__(*exc)
        return super().__exit__(*exc)

    def on_device(self, t: torch.Tensor) -> bool:
        if self.simulated:
            return t not in self.host
        return t.device.type != "cpu"

    def _is_sync(self, name: str, tensors: list[torch.Tensor], args, kwargs) -> bool:
        on_device = [self.on_device(t) for t in tensors]
        if name in VALUE_OPS:
            return any(on_device)
        if name in INDEX_OPS:
            index = args[1] if len(args) > 1 else ()
            return any(t is not None and t.dtype in (torch.bool, torch.uint8) and self.on_device(t) for t in index)
        if name == "repeat_interleave":  # repeat_interleave.Tensor(repeats): the output size is sum(repeats)
            repeats = args[0] if len(args) == 1 else args[1]
            return (isinstance(repeats, torch.Tensor) and self.on_device(repeats)
                    and kwargs.get("output_size") is None)
        if name in COPY_OPS and not self.simulated:
            if name == "_to_copy":
                target = kwargs.get("device") or args[0].device
                source = args[0].device
            else:
                target, source = args[0].device, args[1].device
            blocking = not kwargs.get("non_blocking", args[2] if name == "copy_" and len(args) > 2 else False)
            return target.type != source.type and (target.type == "cpu" or blocking)
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if self._is_sync(name, tensors, args, kwargs):
            self.hits[(name, _where())] += 1
        out = func(*args, **kwargs)
        if self.simulated and tensors and not any(self.on_device(t) for t in tensors):
            for t in tree_flatten(out)[0]:  # computed from host tensors alone: a host tensor too
                if isinstance(t, torch.Tensor):
                    self.host[t] = True
        return out

    @property
    def total(self) -> int:
        return sum(self.hits.values())


def counting(monkeypatch, host: list[torch.Tensor] = ()) -> SyncCounter:
    """A counter whose notion of residency the model's value checks share (a simulated accelerator on CPU)."""
    counter = SyncCounter(host)
    monkeypatch.setattr(modeling, "reads_values", lambda t: not counter.on_device(t))
    return counter
