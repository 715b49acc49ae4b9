"""Pieces of one training step: precision, the summed loss of a batch, signals, the ETA.

Kept apart from the loop (``trainer.py``) so the evaluator can share the precision policy.
"""

from __future__ import annotations

import signal
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without distributed: no DTensor gradients either
    DTensor = ()

from blockstate.data import IGNORE_INDEX
from blockstate.models.modeling_blockstate import check_input_ids
from blockstate.training import distributed as D


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are native here: CUDA with bf16, or a CPU with AVX512-BF16 / AMX (where bf16
    autocast roughly doubles training throughput; elsewhere CPU bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def use_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and fast_bf16(device))


def autocast_factory(precision: str, device: torch.device):
    """bf16 autocast (``auto``: where the hardware has native bf16); parameters, optimiser state, the loss and
    the model's SSM / FFT work stay in fp32."""
    if not use_bf16(precision, device):
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


class StopSignals:
    """SIGINT / SIGTERM handler: ask the loop to checkpoint and stop after the current step (twice: abort)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test runner thread)
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def carries_state(model: torch.nn.Module) -> bool:
    """Whether the model hands state from one segment to the next (registry convention; BST models do not)."""
    return bool(getattr(D.unwrap(model), "carries_state", False))


def step_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device, autocast,
             carry: Any = None, stateful: bool = False) -> tuple[torch.Tensor, Any]:
    """Summed next-token NLL of a batch (the model's own mean would weigh padded rows wrongly), and the carry.

    A stateful model gets its rows' carry and reset flags; segments overlap by one token (the data default),
    so the carry is the state after L - 1 tokens.
    """
    # the id range check runs here, on the host copy, so the model need not read device values (issue 16); the
    # reset flags stay on the host, where the model decides its row groups
    vocab = getattr(getattr(D.unwrap(model), "config", None), "vocab_size", None)
    if vocab is not None:
        check_input_ids(batch["input_ids"], vocab)
    ids, labels = batch["input_ids"].to(device, non_blocking=True), batch["labels"].to(device, non_blocking=True)
    kwargs = {}
    if stateful:
        kwargs = {"carry": carry, "reset": batch["reset"], "carry_length": ids.shape[1] - 1}
    with autocast():
        out = model(input_ids=ids, **kwargs)
    nll = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, getattr(out, "carry", None) if stateful else None


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to ``max_norm`` (0 = no clipping) and return the norm before clipping
    (inf / nan when a gradient is not finite: the caller skips the step)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(norm, DTensor):
        # FSDP2: the gradients are shards. Depending on the torch release the norm of DTensors comes back replicated
        # (already global) or partial, whose float() is this shard's norm alone; full_tensor() is global in both
        # cases (and free when it is replicated), so every rank clips, logs and skips on the same global norm
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def carry_is_finite(carry: Any) -> bool:
    """Whether a stateful model's carried state is finite (a NaN step must not poison the next segments)."""
    return all(bool(torch.isfinite(t).all()) for field in carry for t in field)


def eta_seconds(step: int, total: int | None, elapsed: float, budget_s: float | None) -> float | None:
    candidates = []
    if total is not None and step > 0:
        candidates.append((total - step) * elapsed / step)
    if budget_s is not None:
        candidates.append(max(0.0, budget_s - elapsed))
    return min(candidates) if candidates else None
