"""Pieces of one training step (``trainer.train_step``): what it works on and returns, the summed loss of a batch,
clipping, the carry check, the stop signals.

Kept apart from the loop (``trainer.py``); the precision policy is ``blockstate.runtime.device``.
"""

from __future__ import annotations

import dataclasses
import signal
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
from blockstate.training.config import TrainConfig


@dataclasses.dataclass
class StepParts:
    """What an optimiser step works on: the model (``wrapped`` by DDP / FSDP, or the model itself), its optimiser,
    the settings (schedule, clipping), the processes and the precision policy."""

    model: torch.nn.Module
    wrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    info: D.DistInfo
    autocast: Any
    stateful: bool  # the model carries state across segments (TrainState.carry)
    budget_s: float | None = None  # a time budget: without a step count the cosine follows time


@dataclasses.dataclass
class StepMetrics:
    loss_sum: float  # summed NLL over all ranks' targets
    count: float  # target tokens over all ranks
    grad_norm: float  # before clipping
    lr: float
    skipped: bool  # not finite: no update


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
