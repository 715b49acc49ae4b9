"""The training loop: data, model, optimiser, schedule, checkpoints, validation, the final report.

One optimiser step = ``grad_accum`` micro-batches of ``batch_size`` segments on each of ``world_size`` ranks.
The loss of a step is the mean next-token NLL over *all* its target tokens (summed NLL / global target count),
so N ranks with batch b compute exactly the step of one process with batch N*b (up to float summation order),
and padded segments weigh by their real tokens.

Numerics: gradients are clipped to ``grad_clip`` (global norm), and a step whose loss or gradient norm is not
finite (on any rank) is skipped: no optimiser update, a warning, a ``skip`` line in ``metrics.jsonl`` and a
count in the trainer state and summary. ``max_skipped_steps`` in a row stop the run with an error (earlier
checkpoints are intact). The skip is decided on the device (``steps.update``); the host reads the steps' values
at log, validation and checkpoint steps and at the end, so warnings and the error come then, naming their steps.

Resumability: the schedule is a function of the step, the data loader position is a few integers, and the
optimiser / RNG states are saved exactly: on CPU a resumed run reproduces the uninterrupted run's losses.
With a time budget and no ``--steps`` the cosine follows training *time* instead (progress = time spent /
budget), which always ends the schedule on time but is not bit-reproducible.

Shape (torchtitan's): ``Trainer.run`` = ``setup`` (``setup.py``) -> ``train`` (``steps.train_step`` per step, then
metrics, validation, checkpoints) -> ``finish``, over a ``TrainState`` (``state.py``) and a
``CheckpointManager`` (``checkpointing.py``). ``blockstate bench train`` times that very ``train_step``.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from blockstate.data import SegmentLoader
from blockstate.evaluation.evaluate import EvalResult, evaluate, head_documents
from blockstate.models.modeling_blockstate import enable_gradient_checkpointing
from blockstate.registry import carries_state
from blockstate.runtime import checkpoint as ckpt_io
from blockstate.runtime.device import autocast_factory, keep_freed_memory, use_bf16
from blockstate.training import distributed as D
from blockstate.training import setup
from blockstate.training.checkpointing import CheckpointManager
from blockstate.training.config import TrainConfig
from blockstate.training.metrics import MetricsLogger, Progress, TrainLog, plot_loss_curve, truncate_metrics
from blockstate.training.optim import build_optimizer, group_of_parameters
from blockstate.training.rundir import check_same_tokenizer, check_writable, publish_model
from blockstate.training.state import TrainResult, TrainState
from blockstate.training.steps import StepMetrics, StepParts, StopSignals, diverged, settle, train_step
from blockstate.training.steps import TrainingDiverged as TrainingDiverged  # the loop's error, imported from here

logger = logging.getLogger("blockstate.train")


# -- the run -----------------------------------------------------------------------------------------------------
class Trainer:
    """``Trainer(cfg).run()``; ``resume`` = a run or checkpoint directory; ``explicit`` = the settings the user
    gave (file or flags), checked against the saved run on resume."""

    def __init__(self, cfg: TrainConfig, *, resume: str | Path | None = None, overwrite: bool = False,
                 explicit: dict[str, Any] | None = None, log: Any = print):
        self.cfg = cfg.validate()
        self.resume, self.overwrite = resume, overwrite
        self.explicit = explicit if explicit is not None else {}
        self.say = log

    def run(self) -> TrainResult:
        t_wall = time.perf_counter()
        info = D.init_distributed(self.cfg.parallel, self.cfg.device)
        self._new_dirs: list[Path] = []
        try:
            self.setup(info)
            self.train()
            result = self.finish(t_wall)
            D.barrier(info)  # no rank tears the group down while another still talks to it
            return result
        except BaseException:
            setup.remove_empty_dirs(self._new_dirs)  # a failed start leaves no empty run directory behind
            raise
        finally:
            if info.enabled:
                self._release_process_group()
            D.shutdown()

    def _release_process_group(self) -> None:
        """Free what holds the process group (DDP's reducer) before it is destroyed: a gloo group whose last holder
        goes after ``destroy_process_group`` can deadlock in its destructor, and the process never exits (torch
        2.13: 2 of 17 spawned 2-rank DDP tests hung in ``~ProcessGroupGloo`` under ``~Reducer``)."""
        for name in ("parts", "checkpoints", "eval_model"):
            self.__dict__.pop(name, None)
        gc.collect()

    # -- setup -----------------------------------------------------------------------------------------------
    def setup(self, info: D.DistInfo) -> None:
        """Directory, data, model, optimiser, loader and state (from the checkpoint when resuming); every check
        of the user's input runs before the directory is marked as the run's (``setup.open_run``)."""
        self.info = info
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        self.cfg, self.run_dir, resume_ckpt, saved, self._new_dirs = setup.prepare_dir(
            self.cfg, info, resume=self.resume, explicit=self.explicit, overwrite=self.overwrite)
        self.cfg.parallel = info.parallel
        cfg, main = self.cfg, info.is_main
        if not main:
            self.say = lambda *a, **k: None
        self.corpus, self.tokenizer, train_data = setup.load_data(cfg, info)
        if resume_ckpt is not None:
            check_same_tokenizer(resume_ckpt, self.tokenizer)
            if saved.get("data_fingerprint") not in (None, self.corpus.fingerprint) and main:
                logger.warning("the corpus %s changed since checkpoint %s (files added, removed or modified): the "
                               "resumed run reads the new data from the saved position", self.corpus.name,
                               resume_ckpt.name)
        model, seq_len = setup.build_model(cfg, self.corpus, self.tokenizer, train_data)
        held = setup.load_held_out(cfg, info, self.corpus, self.tokenizer)
        self.valid_data, self.test_data = held["validation"], held["test"]
        if resume_ckpt is not None:
            ckpt_io.load_model_weights(model, resume_ckpt)
        self.n_params = sum(p.numel() for p in model.parameters())
        stateful = carries_state(model)
        setup.check_segment_order(cfg, stateful)  # before open_run: the corrected command must not clash
        if main:  # weights + two optimiser moments per kept checkpoint, plus the one being written
            check_writable(self.run_dir, need_bytes=self.n_params * 4 * 3 * (cfg.keep_checkpoints + 1))
        self._new_dirs = []  # from here on the directory is the run's, and kept
        run_id = setup.open_run(cfg, info, self.run_dir, resume_ckpt, saved, self.overwrite)
        model.to(info.device)
        if info.device.type == "cpu" and cfg.cpu_malloc == "keep":
            keep_freed_memory()
        if cfg.gradient_checkpointing:  # before the wrapper: each layer is recomputed in the backward
            enable_gradient_checkpointing(model)
        groups = group_of_parameters(model)
        wrapped = D.wrap_model(model, info)
        optimizer = build_optimizer(model, groups, cfg)
        budget = cfg.effective_time_budget()
        self.parts = StepParts(model, wrapped, optimizer, cfg, info, autocast_factory(cfg.precision, info.device),
                               stateful, None if budget is None else budget * 60)
        self.loader = SegmentLoader(train_data, seq_len, cfg.batch_size, seed=cfg.seed, rank=info.rank,
                                    world_size=info.world_size, packing=cfg.packing, contiguous=stateful,
                                    lane_span=cfg.lane_span)
        torch.manual_seed(cfg.seed + 1_000_003 * info.rank)  # dropout stream: distinct per rank
        global_batch = cfg.batch_size * cfg.grad_accum * info.world_size
        self.state = state = TrainState(
            run_id=run_id, total_steps=cfg.steps_for_tokens(global_batch * seq_len),
            warmup_end_seconds=0.0 if cfg.warmup_steps == 0 else None, world_size=info.world_size,
            global_batch=global_batch, seq_len=seq_len, schedule=cfg.schedule,
            data_fingerprint=self.corpus.fingerprint, loader=self.loader)
        self.checkpoints = CheckpointManager(self.run_dir, cfg, info, model=model, wrapped=wrapped,
                                             optimizer=optimizer, tokenizer=self.tokenizer, state=state,
                                             resumed=resume_ckpt)
        if resume_ckpt is not None:  # a launch that gives a budget keeps its own step count
            own_total = state.total_steps is not None or "steps" in self.explicit or "tokens" in self.explicit
            state.load_state_dict(saved, total_steps=not own_total)
            self.checkpoints.restore(resume_ckpt, stateful)
        if state.total_steps is not None and state.step >= state.total_steps:
            self.say(f"{self.run_dir}: already at step {state.step} of {state.total_steps}; pass a larger --steps to "
                     "train further")
        self.eval_model = wrapped if info.parallel == "fsdp" else D.unwrap(wrapped)
        self.valid_head = head_documents(self.valid_data, cfg.eval_tokens) if self.valid_data is not None else None
        self.precision = "bf16 autocast" if use_bf16(cfg.precision, info.device) else "fp32"
        if main:
            if resume_ckpt is not None:
                truncate_metrics(self.run_dir / "metrics.jsonl", state.step)
            setup.describe_run(self.say, cfg, info, corpus=self.corpus, tokenizer=self.tokenizer,
                               train_data=train_data, model=model, n_params=self.n_params, optimizer=optimizer,
                               state=state, budget_s=self.parts.budget_s, run_dir=self.run_dir,
                               precision=self.precision)
        self.metrics = MetricsLogger(self.run_dir, enabled=main)

    # -- the loop --------------------------------------------------------------------------------------------
    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> StepMetrics:
        return train_step(self.parts, self.state, batches)

    def validate(self, data) -> EvalResult:
        info = self.info
        reduce = (lambda t: D.all_reduce_tensor(t, info)) if info.enabled else None
        return evaluate(self.eval_model, data, self.state.seq_len, device=info.device, autocast=self.parts.autocast,
                        rank=info.rank, world_size=info.world_size, reduce=reduce, positions=False)

    def train(self) -> None:
        """Optimiser steps until the step count or the time budget is reached, or a signal stops the run; between
        steps the metrics, validation every ``eval_every`` and a checkpoint every ``save_every`` steps."""
        cfg, info, state = self.cfg, self.info, self.state
        progress = Progress(state.total_steps, state.step, enabled=info.is_main and cfg.progress)
        self.log = log = TrainLog(self.metrics, progress, state.tokens, precision=self.precision,
                                  budget_s=self.parts.budget_s, say=self.say, quiet=not info.is_main)
        self.interrupted = None
        self.parts.wrapped.train()
        self.pending: list[StepMetrics] = []  # steps not read on the host yet
        due = [n for n in (cfg.log_every, cfg.eval_every if self.valid_head is not None else 0, cfg.save_every) if n]
        with StopSignals() as stop:
            while state.total_steps is None or state.step < state.total_steps:
                t0 = time.perf_counter()
                m = self.train_step([next(self.loader) for _ in range(cfg.grad_accum)])
                self.pending.append(m)
                if any(state.step % n == 0 for n in due):  # a log, validation or checkpoint follows
                    self.resolve()
                state.train_seconds += time.perf_counter() - t0
                stop_now = D.all_reduce([1.0 if stop.signal else 0.0, state.train_seconds], info, op="max")
                state.train_seconds = stop_now[1]
                if stop_now[0] and self.interrupted is None:
                    self.interrupted = stop.signal or "SIGTERM"
                budget_done = self.parts.budget_s is not None and state.train_seconds >= self.parts.budget_s
                done = ((state.total_steps is not None and state.step >= state.total_steps) or budget_done
                        or self.interrupted)
                if done:
                    t_end = time.perf_counter()
                    self.resolve()
                    state.train_seconds += time.perf_counter() - t_end
                if state.step % cfg.log_every == 0 or done:
                    log.write(state, m, done)
                if self.valid_head is not None and cfg.eval_every and state.step % cfg.eval_every == 0 and not done:
                    t_eval = time.perf_counter()
                    res = self.validate(self.valid_head)
                    state.train_seconds += time.perf_counter() - t_eval
                    self.metrics.log("eval", state.step, val_loss=res.loss, val_bpb=res.bpb, val_ppl=res.ppl,
                                     tokens=state.tokens)
                    progress.write(f"step {state.step}: validation loss {res.loss:.4f}, {res.bpb:.3f} bits/byte")
                if cfg.save_every and state.step % cfg.save_every == 0 and not done:
                    t_save = time.perf_counter()
                    self.checkpoints.save()
                    state.train_seconds += time.perf_counter() - t_save
                if done:
                    break
        progress.close()

    def resolve(self) -> None:
        """Read the pending steps' values (one host sync) and account for them in order (``steps.settle``)."""
        pending, self.pending = self.pending, []
        settle(pending, self.state, self.log.add, self._skipped)

    def _skipped(self, m: StepMetrics) -> None:
        """Say and record a skipped step (with its own number); too many in a row end the run."""
        state, limit = self.state, self.cfg.max_skipped_steps
        logger.warning("step %d: %s; optimiser step skipped (%d skipped so far, %d in a row)", m.step,
                       f"the loss is {m.loss_sum}" if not math.isfinite(m.loss_sum)
                       else f"the gradient norm is {m.grad_norm}", state.skipped_steps, state.skipped_in_a_row)
        self.metrics.log("skip", m.step, loss=m.loss_sum, grad_norm=m.grad_norm, skipped_steps=state.skipped_steps,
                         lr=m.lr)
        if limit and state.skipped_in_a_row >= limit:
            raise diverged(m.step, state.skipped_in_a_row, state.step, self.cfg.lr, self.checkpoints.last)

    # -- the end ---------------------------------------------------------------------------------------------
    def finish(self, t_wall: float) -> TrainResult:
        """Final validation and checkpoint, the published model; unless interrupted: the loss plot, the test
        evaluation, the sample and ``results.json``."""
        cfg, state, main = self.cfg, self.state, self.info.is_main
        run_dir, step, last_loss = self.run_dir, state.step, self.log.last_loss
        val = None
        if self.valid_head is not None and not self.interrupted and step > 0:
            val = self.validate(self.valid_head)
            self.metrics.log("eval", step, val_loss=val.loss, val_bpb=val.bpb, val_ppl=val.ppl, tokens=state.tokens)
        ckpt_dir = self.checkpoints.save() if step > 0 else self.checkpoints.last
        if main and ckpt_dir is not None:  # the run directory itself becomes the model (from_pretrained(run_dir))
            publish_model(run_dir, ckpt_dir, self.tokenizer)
        result = TrainResult(run_dir, ckpt_dir, step, last_loss, state.tokens, state.train_seconds,
                             self.interrupted, state.skipped_steps, validation=val)
        if self.interrupted:
            self.say(f"stopped by {self.interrupted} at step {step}; checkpoint {ckpt_dir}; continue with: "
                     f"blockstate train --resume {run_dir}")
            self.metrics.close()
            return result
        if main:
            plot = plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png",
                                   f"{cfg.model} {cfg.size} on {cfg.data} ({cfg.tokenizer})")
            result.plots += [plot] if plot else []
        if cfg.final_eval and self.test_data is not None and step > 0:
            result.test = self.validate(self.test_data)
        if main and cfg.sample_tokens and step > 0:
            result.sample = setup.sample_text(cfg, self.parts.wrapped, self.info, ckpt_dir, self.tokenizer)
            (run_dir / "sample.txt").write_text(result.sample + "\n", encoding="utf-8")
        if main:
            final = {"tokens": state.tokens, "train_seconds": round(state.train_seconds, 1),
                     "wall_seconds": round(time.perf_counter() - t_wall, 1), "train_loss": last_loss,
                     "parameters": self.n_params, "checkpoint": str(ckpt_dir), "skipped_steps": state.skipped_steps}
            if val is not None:
                final.update(val_loss=val.loss, val_bpb=val.bpb, val_tokens=val.tokens)
            if result.test is not None:
                final.update(test_loss=result.test.loss, test_bpb=result.test.bpb, test_ppl=result.test.ppl,
                             test_tokens=result.test.tokens)
            self.metrics.log("final", step, **final)
            ckpt_io.write_json(run_dir / "results.json", {"step": step, **final, "config": cfg.to_dict()})
        self.metrics.close()
        return result
