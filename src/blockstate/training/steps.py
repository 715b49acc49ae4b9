"""One training step, ``train_step`` (the loop's, and what ``bench train`` times), and its pieces: what it works on
and returns, the summed loss of a batch, clipping, the finiteness check, the update or its skip, reading the
steps' values on the host, the carry check, the stop signals.

No piece reads a device value on the host (issue 16): the loss, the gradient norm and the skip flag stay device
tensors until :func:`resolve` reads those of several steps at once. Kept apart from the loop (``trainer.py``);
the precision policy is ``blockstate.runtime.device``.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable
from pathlib import Path
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
from blockstate.training.optim import lr_factor, set_lr


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
    """One optimiser step. ``loss_sum``, ``grad_norm`` and ``skipped`` are device tensors until :func:`resolve`
    turns them into Python numbers (``skipped`` is a bool from the start where the host decided it)."""

    loss_sum: torch.Tensor | float  # summed NLL over all ranks' targets
    count: float  # target tokens over all ranks (counted on the host)
    grad_norm: torch.Tensor | float  # before clipping
    lr: float
    skipped: torch.Tensor | bool  # not finite: no update
    step: int = 0  # the step number (TrainState.step after it)


class TrainingDiverged(ValueError):
    """Too many consecutive steps with a non-finite loss or gradient (``max_skipped_steps``)."""


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


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to ``max_norm`` (0 = no clipping) and return the norm before clipping, a 0-d
    tensor on the gradients' device (inf / nan when a gradient is not finite: the step is skipped); no host sync."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros((), device=next(model.parameters(), torch.zeros(())).device)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(norm, DTensor):
        # FSDP2: the gradients are shards. Depending on the torch release the norm of DTensors comes back replicated
        # (already global) or partial, whose local value is this shard's norm alone; full_tensor() is global in
        # both cases (and free when it is replicated), so every rank clips, logs and skips on the same global norm
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def check_finite(nll_sum: torch.Tensor, grad_norm: torch.Tensor, info: D.DistInfo
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed loss over all ranks and whether the step is bad (its loss or gradient norm is not finite on some
    rank), both device tensors: no host sync. With several ranks one all-reduce of ``[nll_sum, bad]`` (float64, as
    the token counts), so every rank takes the same decision."""
    bad = ~torch.isfinite(grad_norm)
    if info.enabled:
        dtype = torch.float32 if nll_sum.device.type == "mps" else torch.float64
        both = D.all_reduce_tensor(torch.stack([nll_sum.to(dtype), bad.to(dtype)]), info)
        nll_sum, bad = both[0], both[1] > 0
    return nll_sum, bad | ~torch.isfinite(nll_sum)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """A fused optimiser (AdamW, ``build_optimizer``) skips its update on the device when ``found_inf`` is set."""
    return bool(optimizer.param_groups) and all(g.get("fused") for g in optimizer.param_groups)


def update(optimizer: torch.optim.Optimizer, bad: torch.Tensor, host: bool) -> torch.Tensor | bool:
    """The optimiser step unless ``bad``, then the gradients cleared; returns the skip flag.

    A fused optimiser reads ``found_inf`` in its kernel (torch's GradScaler mechanism): at 1 it leaves parameters
    and moments as they are and rolls its step counter back, bit for bit what not stepping does, with no host sync.
    ``host`` (or an optimiser without a fused kernel: Adafactor) reads ``bad`` on the host instead: one sync.
    """
    fused = skips_on_device(optimizer)
    skipped = bool(bad) if host or not fused else bad
    if fused:
        optimizer.found_inf = bad.float()
        optimizer.step()
        del optimizer.found_inf
    elif not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return skipped


def clip_and_update(parts: StepParts, state: Any, nll_sum: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | bool]:
    """The end of a step whose gradients are in: clipping, the finiteness check, the update or its skip (a NaN / inf
    update would poison the weights and moments for good), and a non-finite carry of a skipped step dropped.
    Returns the summed loss over ranks, the gradient norm and the skip flag (see :func:`update`)."""
    grad_norm = clip_gradients(parts.model, parts.cfg.grad_clip)
    loss_sum, bad = check_finite(nll_sum, grad_norm, parts.info)
    skipped = update(parts.optimizer, bad, host=parts.stateful)  # the carry is dropped on the host, before it is used
    if skipped is True and state.carry is not None and not carry_is_finite(state.carry):
        state.carry = None
    return loss_sum, grad_norm, skipped


def resolve(pending: list[StepMetrics]) -> None:
    """Read the device values of ``pending`` steps into Python numbers, all in one transfer (one host sync)."""
    slots = [(m, k) for m in pending for k in ("loss_sum", "grad_norm", "skipped")
             if isinstance(getattr(m, k), torch.Tensor)]
    if slots:
        first = getattr(*slots[0])
        dtype = torch.float32 if first.device.type == "mps" else torch.float64
        values = torch.stack([getattr(m, k).to(first.device, dtype).reshape(()) for m, k in slots]).cpu().tolist()
        for (m, k), v in zip(slots, values, strict=True):
            setattr(m, k, v)
    for m in pending:
        m.skipped = bool(m.skipped)


def settle(pending: list[StepMetrics], state: Any, add: Callable[[float, float], None],
           skip: Callable[[StepMetrics], None]) -> None:
    """:func:`resolve` ``pending``, then account for each step in order: a skipped one counts in ``state``
    (``skipped_steps``, ``skipped_in_a_row``) and goes to ``skip`` (which may raise); an updated one ends a run of
    skips and adds its loss to the window (``add``)."""
    resolve(pending)
    for m in pending:
        if m.skipped:
            state.skipped_steps += 1
            state.skipped_in_a_row += 1
            skip(m)
        else:
            state.skipped_in_a_row = 0
            add(m.loss_sum, m.count)


def diverged(step: int, in_a_row: int, now: int, lr: float, last: Path | None) -> TrainingDiverged:
    """The error of ``in_a_row`` skipped steps ending at ``step``, found when the loop read the flags at ``now``."""
    found = f"; found at step {now}, when the steps were read" if now > step else ""
    return TrainingDiverged(
        f"the loss or gradient was not finite for {in_a_row} steps in a row (steps {step - in_a_row + 1}-{step}; "
        f"weights kept from step {step - in_a_row}{found}): lower --lr (now {lr}), raise --warmup-steps or check "
        f"the data, then start again or resume from the last checkpoint ({last.name if last else 'none yet'}); "
        "--max-skipped-steps sets this limit")


def carry_is_finite(carry: Any) -> bool:
    """Whether a stateful model's carried state is finite (a NaN step must not poison the next segments)."""
    return all(bool(torch.isfinite(t).all()) for field in carry for t in field)


# -- one optimiser step ------------------------------------------------------------------------------------------
def train_step(parts: StepParts, state: Any, batches: list[dict[str, torch.Tensor]]) -> StepMetrics:
    """One optimiser step over ``batches`` (this rank's micro-batches, on the host): learning rate, forward and
    backward of each, the carry handed on, then ``steps.clip_and_update`` (skipped if not finite on any rank).

    No host sync with fused AdamW on one process (the values stay on the device until the loop reads them); one for
    a stateful model (a bad step's carry is dropped on the host) or Adafactor; ranks all-reduce the count on it."""
    cfg, info, optimizer = parts.cfg, parts.info, parts.optimizer
    progress = None
    if state.total_steps is None and parts.budget_s:  # time-driven cosine
        start = state.warmup_end_seconds if state.warmup_end_seconds is not None else state.train_seconds
        progress = (state.train_seconds - start) / max(1e-9, parts.budget_s - start)
    lr = set_lr(optimizer, lr_factor(state.step, cfg, state.total_steps, progress))
    local_count = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    count = D.all_reduce([local_count], info)[0]
    scale = info.world_size / max(1.0, count)  # DDP / FSDP average gradients over ranks
    nll_sum = torch.zeros((), device=info.device)
    for i, batch in enumerate(batches):
        with D.no_sync(parts.wrapped, info, last=i == len(batches) - 1):
            nll, state.carry = step_nll(parts.wrapped, batch, info.device, parts.autocast, state.carry, parts.stateful)
            (nll * scale).backward()
        nll_sum += nll.detach()
    loss_sum, grad_norm, skipped = clip_and_update(parts, state, nll_sum)
    state.step += 1
    state.tokens += int(count)
    if cfg.warmup_steps and state.step == cfg.warmup_steps and state.warmup_end_seconds is None:
        state.warmup_end_seconds = state.train_seconds
    return StepMetrics(loss_sum, count, grad_norm, lr, skipped, state.step)
