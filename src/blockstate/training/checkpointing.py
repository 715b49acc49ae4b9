"""Checkpoints of one run: written every ``--save-every`` steps and at the end, restored on ``--resume``.

The format is ``blockstate.runtime.checkpoint``'s; this is the trainer's side of it: which states go in (the
unsharded model and optimiser, the ``TrainState``, every rank's RNG state and carry) and which come back.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from blockstate.runtime import checkpoint as ckpt_io
from blockstate.training import distributed as D
from blockstate.training.config import TrainConfig
from blockstate.training.state import TrainState

logger = logging.getLogger("blockstate.train")


class CheckpointManager:
    """``save()`` the current step (once: a second call at the same step returns the same directory);
    ``restore(ckpt)`` the optimiser, carry and RNG states (the weights are loaded before the model is wrapped)."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, info: D.DistInfo, *, model: torch.nn.Module,
                 wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, tokenizer: Any, state: TrainState,
                 resumed: Path | None = None):
        self.run_dir, self.cfg, self.info = run_dir, cfg, info
        self.model, self.wrapped, self.optimizer = model, wrapped, optimizer
        self.tokenizer, self.state = tokenizer, state
        self.last = resumed  # the newest checkpoint of this run, if any
        self._saved_step = state.step if resumed is not None else -1

    def restore(self, ckpt: Path, stateful: bool) -> None:
        info = self.info
        opt_state = ckpt_io.load_optimizer_state(ckpt, self.optimizer.param_groups)
        if opt_state is not None:
            D.load_optimizer_full_state(self.wrapped, self.optimizer, opt_state, info)
        self.state.carry = ckpt_io.load_carry(ckpt, info.rank, info.device) if stateful else None
        if not ckpt_io.load_rng_state(ckpt, info.rank):
            logger.warning("checkpoint has no RNG state for rank %d (other world size): dropout reseeded", info.rank)

    def save(self) -> Path:
        state, info = self.state, self.info
        if self._saved_step == state.step and self.last is not None:
            return self.last
        model_state, opt_state = D.full_state_dicts(self.wrapped, self.optimizer, info)
        carry = None if state.carry is None else ckpt_io.flatten_carry(state.carry)
        rank_states = D.gather_object({"rng": ckpt_io.rng_state(), "carry": carry}, info)
        self.last = self.run_dir / ckpt_io.CHECKPOINTS / ckpt_io.checkpoint_name(state.step)
        if info.is_main:
            ckpt_io.save_checkpoint(self.run_dir, state.step, model=self.model, model_state=model_state,
                                    optimizer_state=opt_state, trainer_state=state.state_dict(),
                                    train_config=self.cfg.to_dict(), tokenizer=self.tokenizer,
                                    keep=self.cfg.keep_checkpoints, rank_states=rank_states)
        D.barrier(info)
        self._saved_step = state.step
        return self.last
