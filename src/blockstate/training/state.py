"""What a training run is at a step: ``TrainState`` (saved as a checkpoint's ``trainer_state.json``) and the
``TrainResult`` a finished run returns.

The JSON keys and their order are the checkpoint format read by ``--resume`` (and by older runs' checkpoints):
``state_dict`` writes exactly the keys the trainer always wrote, ``load_state_dict`` reads those a resumed run
continues from.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from blockstate.evaluation.evaluate import EvalResult


@dataclasses.dataclass
class TrainState:
    """The loop's mutable state. ``loader`` (the data position) is saved with it; ``carry`` (a stateful model's
    state per rank) and the RNG states are saved per rank beside it (``blockstate.training.checkpointing``);
    ``skipped_in_a_row`` starts again at 0 on resume."""

    run_id: str | None = None
    step: int = 0  # optimiser steps done
    total_steps: int | None = None  # None: a time budget alone ends the run
    tokens: int = 0  # target tokens trained on, all ranks
    train_seconds: float = 0.0  # training time (validation and checkpoints included, start-up not)
    warmup_end_seconds: float | None = None  # train_seconds at the end of warmup (the time-driven cosine starts there)
    world_size: int = 1
    global_batch: int = 0  # segments per optimiser step, all ranks
    seq_len: int = 0
    schedule: str = "cosine"
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient
    data_fingerprint: str | None = None
    loader: Any = dataclasses.field(default=None, repr=False)  # has state_dict() / load_state_dict()
    skipped_in_a_row: int = 0
    carry: Any = dataclasses.field(default=None, repr=False)

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "step": self.step, "total_steps": self.total_steps, "tokens": self.tokens,
                "train_seconds": self.train_seconds, "warmup_end_seconds": self.warmup_end_seconds,
                "world_size": self.world_size, "global_batch": self.global_batch, "seq_len": self.seq_len,
                "loader": self.loader.state_dict(), "schedule": {"kind": self.schedule, "step": self.step},
                "skipped_steps": self.skipped_steps, "data_fingerprint": self.data_fingerprint}

    def load_state_dict(self, saved: dict[str, Any], *, total_steps: bool = True) -> None:
        """Continue from ``saved``; ``total_steps=False`` keeps this launch's step count (it gave a budget)."""
        if saved.get("global_batch") != self.global_batch:
            raise ValueError(f"--resume: the run used a global batch of {saved.get('global_batch')} segments "
                             f"(batch x grad-accum x processes), this launch has {self.global_batch}: keep the "
                             "product the same")
        self.step, self.tokens = int(saved["step"]), int(saved["tokens"])
        self.train_seconds = float(saved["train_seconds"])
        self.skipped_steps = int(saved.get("skipped_steps", 0))
        self.warmup_end_seconds = saved.get("warmup_end_seconds")
        if total_steps:
            self.total_steps = saved.get("total_steps")
        self.loader.load_state_dict(saved["loader"])


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path | None
    step: int
    train_loss: float | None
    tokens: int
    train_seconds: float
    interrupted: str | None = None  # the signal name when stopped by SIGINT / SIGTERM
    skipped_steps: int = 0  # optimiser steps skipped for a non-finite loss or gradient (whole run)
    validation: EvalResult | None = None
    test: EvalResult | None = None
    plots: list[Path] = dataclasses.field(default_factory=list)
    sample: str | None = None
