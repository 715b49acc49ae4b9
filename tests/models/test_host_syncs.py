"""No host-device synchronisation in a model's training and decode steps (issue 16), counted at the dispatcher by
``helpers.syncs.SyncCounter`` (on CPU a simulated accelerator; ``BLOCKSTATE_TEST_DEVICE=cuda`` on a real one)."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from helpers.syncs import DEVICE, SyncCounter, counting

import blockstate.models.modeling_blockstate as modeling
from blockstate.registry import create_model, list_models


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


def test_counter_sees_tolist(monkeypatch):
    """``tolist()`` of a device tensor is a sync (on CPU it reads memory without an aten op: seen at the Python level);
    of a host tensor it is none."""
    counter = counting(monkeypatch)
    with counter:
        x = torch.arange(4.0, device=DEVICE) + 1
        x.tolist()
        x.cpu().tolist()  # the copy is the sync, reading the host copy is free
    assert counter.total == 2, dict(counter.hits)


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
