"""The contestants of ``blockstate bench train``: a registered model at a size preset with the trainer's optimiser,
and its step, which is the trainer's own ``train_step`` (``blockstate.training.trainer``) on one process."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from blockstate.training.state import TrainState


@dataclass
class Contestant:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    stateful: bool
    parameters: int
    state: TrainState = field(default_factory=TrainState)  # the step count and the carry, as the trainer keeps them


def build(name: str, size: str, length: int, seed: int = 0) -> Contestant:
    """The model at ``size`` trained on segments of ``length``, with the trainer's optimiser (on the host)."""
    from blockstate.registry import carries_state, create_model
    from blockstate.training import TrainConfig, build_optimizer, group_of_parameters

    torch.manual_seed(seed)
    model = create_model(name, size, max_train_length=length)
    optimizer = build_optimizer(model, group_of_parameters(model), TrainConfig())
    return Contestant(name, model, optimizer, carries_state(model), sum(p.numel() for p in model.parameters()))


def visit(c: Contestant, device: torch.device) -> None:
    """Move a model, its optimiser moments and its carry to ``device`` (the step counters too where the optimiser is
    fused, as the trainer's AdamW is on CPU and CUDA: they live with the parameters; a foreach one keeps them on the
    host)."""
    c.model.to(device)
    fused = all(g.get("fused") for g in c.optimizer.param_groups)
    for state in c.optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and (key != "step" or fused):
                state[key] = value.to(device)
    if c.state.carry is not None:
        from blockstate.registry import map_carry

        c.state.carry = map_carry(lambda t: t.to(device), c.state.carry)


def state_bytes(c: Contestant) -> int:
    params = sum(p.numel() * p.element_size() for p in c.model.parameters())
    moments = sum(v.numel() * v.element_size() for s in c.optimizer.state.values() for k, v in s.items()
                  if torch.is_tensor(v) and k != "step")
    return params + moments


def make_batch(vocab: int, batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "reset": torch.zeros(batch, dtype=torch.bool)}


def make_step(c: Contestant, batch: dict[str, torch.Tensor], device: torch.device, precision: str,
              grad_clip: float = 1.0) -> Callable[[], None]:
    """One training step as ``blockstate train`` runs it: the trainer's ``train_step`` on one process."""
    from blockstate.runtime.device import autocast_factory
    from blockstate.training import TrainConfig
    from blockstate.training.distributed import DistInfo
    from blockstate.training.steps import StepParts, train_step

    cfg = TrainConfig(schedule="constant", warmup_steps=0, grad_clip=grad_clip, precision=precision)
    parts = StepParts(c.model, c.model, c.optimizer, cfg, DistInfo(device=device), autocast_factory(precision, device),
                      c.stateful)

    def step() -> None:
        c.model.train()
        train_step(parts, c.state, [batch])

    return step
