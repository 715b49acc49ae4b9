"""No host-device synchronisation in a training step (issue 16), counted at the dispatcher.

``SyncCounter`` is a TorchDispatchMode that records every aten op that needs a tensor's value on the host:
``_local_scalar_dense`` (what ``.item()``, ``int()``, ``bool()``, ``float()``, ``tolist()`` and ``is_nonzero``
decompose to), ``equal``, the ops whose output shape depends on values (``nonzero`` and what decomposes to it,
``masked_select``, ``unique*``, ``bincount``, boolean-mask indexing, ``repeat_interleave`` without
``output_size``) and, on a real accelerator, copies to the host or blocking copies from it.

On an accelerator (``BLOCKSTATE_TEST_DEVICE=cuda``, as scripts/gpu-check.sh runs it) residency is read from each
tensor, and ``torch.cuda.set_sync_debug_mode`` is asked as a second opinion. On CPU, where every tensor is a host
tensor, the counter simulates an accelerator: every tensor counts as a device tensor except those declared to live
on the host (the optimiser's step counters, which torch keeps on the CPU; the data pipeline's reset flags) and
what is computed from host tensors alone; the model's value checks are pointed at the same notion of residency.
"""

from __future__ import annotations

import os
import traceback
import warnings
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

import blockstate.models.modeling_blockstate as modeling
from blockstate.registry import create_model, list_models

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
        if name in FACTORIES and "device" not in kwargs and isinstance(out, torch.Tensor):
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


def training_step(model, optimizer, ids, **kwargs):
    out = model(ids, labels=ids, **kwargs)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)  # the trainer's clipping, no float()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


def step_counters(optimizer) -> list[torch.Tensor]:
    """torch keeps AdamW's step counters on the CPU (not capturable, not fused): reading them is no sync."""
    return [s["step"] for s in optimizer.state.values() if isinstance(s.get("step"), torch.Tensor)]


def count_training_step(monkeypatch, name: str, length: int = 64) -> tuple[SyncCounter, list[str]]:
    torch.manual_seed(0)
    model = create_model(name, "tiny", max_train_length=length).to(DEVICE).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    ids = torch.randint(0, model.config.vocab_size, (2, length), device=DEVICE)
    kwargs = {}
    first = training_step(model, optimizer, ids)  # warm-up: optimiser state, lazy buffers
    reset = torch.tensor([False, True])  # host flags, as the data pipeline hands them over
    if model.carries_state:
        kwargs = {"carry": first.carry, "reset": reset}
    counter = counting(monkeypatch, host=[*step_counters(optimizer), reset])
    cuda_warnings = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if DEVICE.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with counter:
                training_step(model, optimizer, ids, **kwargs)
        finally:
            if DEVICE.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        cuda_warnings = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    return counter, cuda_warnings


@pytest.mark.parametrize("name", list_models())
def test_training_step_has_no_host_syncs(monkeypatch, name):
    counter, cuda_warnings = count_training_step(monkeypatch, name)
    assert counter.total == 0, dict(counter.hits)
    assert not cuda_warnings, cuda_warnings


def test_counter_sees_syncs(monkeypatch):
    """The counter is not blind: each kind of sync is caught once, and host tensors are exempt."""
    host = torch.ones(3)
    counter = counting(monkeypatch, host=[host])
    x = torch.arange(6.0, device=DEVICE)
    with counter:
        float(x.sum())
        x[x > 2]
        torch.nonzero(x)
        torch.unique(x)
        torch.equal(x, x)
        x.repeat_interleave(torch.ones(6, dtype=torch.long, device=DEVICE))
        int(host.sum())  # a host value: no sync (on CUDA, a CPU tensor)
    seen = Counter()
    for (name, _), count in counter.hits.items():
        seen[name] += count
    assert seen == Counter({"_local_scalar_dense": 1, "index": 1, "nonzero": 1, "_unique2": 1, "equal": 1,
                            "repeat_interleave": 1}), dict(counter.hits)


def test_counter_sees_copies(monkeypatch):
    """Blocking copies between host and device are syncs; a non-blocking upload is not."""
    counter = counting(monkeypatch)
    with counter:
        on_host = torch.linspace(0, 1, 3)  # no device=: a host tensor
        on_host.to(DEVICE)
        on_host.to(DEVICE, non_blocking=True)
        torch.zeros(3, device=DEVICE).cpu()
    names = sorted(name for name, _ in counter.hits.elements())
    if counter.simulated:
        assert names == ["blocking host-to-device copy", "device-to-host copy"], dict(counter.hits)
    else:
        assert len(names) == 2 and set(names) <= {"_to_copy", "copy_"}, dict(counter.hits)


def test_out_of_range_ids_still_raise_on_the_host():
    model = create_model("bst-sh-s4", "tiny")
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model(torch.tensor([[0, model.config.vocab_size]]))
    with pytest.raises(ValueError, match="labels must lie in"):
        model(torch.tensor([[0, 1]]), labels=torch.tensor([[0, model.config.vocab_size]]))


def test_device_value_checks_flag(monkeypatch):
    """With device checks on, ids on a (simulated) device are checked too, at the cost of the syncs."""
    counter = counting(monkeypatch)
    monkeypatch.setattr(modeling, "_DEVICE_VALUE_CHECKS", False)
    ids = torch.tensor([[0, 10**6]], device=DEVICE)
    with counter:
        modeling.check_input_ids(ids, 100)  # skipped: it would read device values
    assert counter.total == 0
    previous = modeling.set_device_value_checks(True)
    try:
        monkeypatch.setattr(modeling, "reads_values", lambda t: t.device.type == "cpu" or modeling._DEVICE_VALUE_CHECKS)
        with pytest.raises(ValueError, match="input_ids must lie in"):
            modeling.check_input_ids(ids, 100)
    finally:
        modeling.set_device_value_checks(previous)


def count_decode_step(monkeypatch, name: str, prompt: int = 40) -> SyncCounter:
    torch.manual_seed(0)
    model = create_model(name, "tiny").to(DEVICE).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, prompt + 2), device=DEVICE)
    counter = counting(monkeypatch)
    with torch.no_grad(), counter:  # from the prefill on, so the counter knows which tensors the host holds
        out = model(ids[:, :prompt], use_cache=True)
        out = model(ids[:, prompt : prompt + 1], cache=out.cache, use_cache=True)  # warm-up: buffers grown
        counter.hits.clear()  # only the decode step counts
        model(ids[:, prompt + 1 : prompt + 2], cache=out.cache, use_cache=True)
    return counter


@pytest.mark.parametrize("name", list_models())
def test_decode_step_has_no_host_syncs(monkeypatch, name):
    """One decoding step (a token per row, from a cache) decides its buffer growth and block starts from the
    cache's host mirror of the positions: no sync. (A prefill with padding, or a beam reorder, leaves the mirror
    to be read once from the device on the next step.) The counts print with -s for the report."""
    counter = count_decode_step(monkeypatch, name)
    print(f"\ndecode step {name}: {counter.total} syncs {dict(counter.hits)}")
    assert counter.total == 0, dict(counter.hits)
