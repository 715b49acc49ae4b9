"""The training loop: data, model, optimiser, schedule, checkpoints, validation, the final report.

One optimiser step = ``grad_accum`` micro-batches of ``batch_size`` segments on each of ``world_size`` ranks.
The loss of a step is the mean next-token NLL over *all* its target tokens (summed NLL / global target count),
so N ranks with batch b compute exactly the step of one process with batch N*b (up to float summation order),
and padded segments weigh by their real tokens.

Numerics: gradients are clipped to ``grad_clip`` (global norm), and a step whose loss or gradient norm is not
finite (on any rank) is skipped: no optimiser update, a warning, a ``skip`` line in ``metrics.jsonl`` and a
count in the trainer state and the final summary. ``max_skipped_steps`` in a row stop the run with an error
(the weights are still those of the last good step, and earlier checkpoints are intact).

Resumability: the schedule is a function of the step, the data loader position is a few integers, and the
optimiser / RNG states are saved exactly, so on CPU a resumed run reproduces the uninterrupted run's losses.
With a time budget and no ``--steps`` the cosine follows training *time* instead (progress = time spent /
budget), which always ends the schedule on time but is not bit-reproducible.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from blockstate.data import IGNORE_INDEX, DataError, SegmentLoader, build_tokenizer, load_corpus, tokenize_split
from blockstate.evaluation.evaluate import EvalResult, evaluate, head_documents
from blockstate.generation import can_generate, set_token_ids
from blockstate.models.modeling_blockstate import enable_gradient_checkpointing
from blockstate.registry import create_model
from blockstate.runtime import checkpoint as ckpt_io
from blockstate.runtime.device import autocast_factory, use_bf16
from blockstate.training import distributed as D
from blockstate.training.config import TrainConfig
from blockstate.training.metrics import MetricsLogger, Progress, format_seconds, plot_loss_curve, truncate_metrics
from blockstate.training.optim import build_optimizer, describe_groups, group_of_parameters, lr_factor, set_lr
from blockstate.training.rundir import (
    RUN_FILE,
    check_fresh,
    check_same_tokenizer,
    check_writable,
    default_output,
    find_resume,
    publish_model,
    resume_config,
    set_aside_newer,
    start_run,
)
from blockstate.training.steps import (
    StopSignals,
    carries_state,
    carry_is_finite,
    clip_gradients,
    eta_seconds,
    step_nll,
)

logger = logging.getLogger("blockstate.train")
SPEED_STEPS = 20  # the speed line is printed after this many steps (the first ones include warm-up costs)


def block_label(config: Any) -> str:
    """W as the log prints it: gpt's one block as long as any input (FULL_ATTENTION) reads ``full``."""
    from blockstate.models.configuration_baselines import FULL_ATTENTION

    size = getattr(config, "block_size", None)
    return "full" if isinstance(size, int) and size >= FULL_ATTENTION else str(size)


def remove_empty_dirs(dirs: list[Path]) -> None:
    """Remove ``dirs`` (deepest first) while they are empty; ``os.rmdir`` never removes a directory with files."""
    for path in dirs:
        try:
            path.rmdir()
        except OSError:
            return


class TrainingDiverged(ValueError):
    """Too many consecutive steps with a non-finite loss or gradient (``max_skipped_steps``)."""


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


class Trainer:
    """``Trainer(cfg).run()``; ``resume`` = a run or checkpoint directory; ``explicit`` = the settings the user
    gave (file or flags), checked against the saved run on resume."""

    def __init__(self, cfg: TrainConfig, *, resume: str | Path | None = None, overwrite: bool = False,
                 explicit: dict[str, Any] | None = None, log: Any = print):
        self.cfg = cfg.validate()
        self.resume, self.overwrite = resume, overwrite
        self.explicit = explicit if explicit is not None else {}
        self.say = log

    # -- setup -----------------------------------------------------------------------------------------------
    def _prepare_dir(self, info: D.DistInfo) -> tuple[Path, Path | None, dict[str, Any]]:
        resume_ckpt, saved_state = None, {}
        if self.resume is not None:
            run_dir, resume_ckpt = find_resume(self.resume)
            self.cfg, saved_state = resume_config(run_dir, resume_ckpt, self.explicit)
        elif self.cfg.output is None:
            run_dir = D.broadcast_object(default_output(self.cfg) if info.is_main else None, info)
        else:
            run_dir = Path(self.cfg.output).expanduser()
        run_dir = Path(run_dir)
        # the directories this start creates: removed again (when still empty) if it fails before _open_run
        self._new_dirs = [] if not info.is_main else [d for d in (run_dir, *run_dir.parents) if not d.exists()]
        if info.is_main:
            check_writable(run_dir)
            if resume_ckpt is None:
                check_fresh(run_dir, self.overwrite)
        return run_dir, resume_ckpt, saved_state

    def _open_run(self, info: D.DistInfo, run_dir: Path, resume_ckpt: Path | None, saved: dict[str, Any]) -> None:
        """Mark the directory as this run's, once data and model are known to be good: a start that fails on bad
        input leaves nothing that would block the corrected command."""
        run_id = None
        self._new_dirs = []  # from here on the directory is the run's, and kept
        if info.is_main:
            if resume_ckpt is None:
                run_id = start_run(run_dir, self.cfg, self.overwrite)["run_id"]
            else:
                set_aside_newer(run_dir, resume_ckpt)
                if (run_dir / RUN_FILE).is_file():
                    run_id = ckpt_io.read_json(run_dir / RUN_FILE).get("run_id")
            run_id = run_id or saved.get("run_id")
        self.run_id = D.broadcast_object(run_id, info)

    def _data(self, info: D.DistInfo):
        cfg = self.cfg
        corpus = load_corpus(cfg.data, **cfg.corpus_options())
        # rank 0 tokenises (and trains a BPE) first; the others then read its cache
        if not info.is_main:
            D.barrier(info)
        tokenizer = build_tokenizer(cfg.tokenizer, corpus, cache_dir=cfg.cache_dir)
        train = tokenize_split(corpus, tokenizer, "train", cache_dir=cfg.cache_dir)
        if info.is_main:
            D.barrier(info)
        return corpus, tokenizer, train

    def _held_out(self, info: D.DistInfo, corpus, tokenizer) -> dict[str, Any]:
        held = {}
        if not info.is_main:
            D.barrier(info)
        for split in ("validation", "test"):
            try:
                held[split] = tokenize_split(corpus, tokenizer, split, cache_dir=self.cfg.cache_dir)
            except DataError as exc:  # e.g. a one-document corpus: train anyway, say what is skipped
                if info.is_main:
                    logger.warning("no %s evaluation: %s", split, exc)
                held[split] = None
        if info.is_main:
            D.barrier(info)
        return held

    # -- main ------------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        t_wall = time.perf_counter()
        info = D.init_distributed(self.cfg.parallel, self.cfg.device)
        self._new_dirs: list[Path] = []
        try:
            result = self._run(info, t_wall)
            D.barrier(info)  # no rank tears the group down while another still talks to it
            return result
        except BaseException:
            remove_empty_dirs(self._new_dirs)  # a failed start leaves no empty run directory behind
            raise
        finally:
            D.shutdown()

    def _run(self, info: D.DistInfo, t_wall: float) -> TrainResult:
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        run_dir, resume_ckpt, saved = self._prepare_dir(info)
        self.cfg.parallel = info.parallel
        cfg, main = self.cfg, info.is_main
        say = self.say if main else (lambda *a, **k: None)
        corpus, tokenizer, train_data = self._data(info)
        if resume_ckpt is not None:
            check_same_tokenizer(resume_ckpt, tokenizer)
            if saved.get("data_fingerprint") not in (None, corpus.fingerprint) and main:
                logger.warning("the corpus %s changed since checkpoint %s (files added, removed or modified): the "
                               "resumed run reads the new data from the saved position", corpus.name, resume_ckpt.name)

        # model (seeded identically on every rank; DDP / FSDP start from the same weights anyway)
        torch.manual_seed(cfg.seed)
        overrides = dict(cfg.model_args)
        overrides["vocab_size"] = tokenizer.vocab_size
        for key, value in (("max_train_length", cfg.seq_len), ("block_size", cfg.block_size),
                           ("hidden_dropout", cfg.dropout)):
            if value is not None:
                overrides[key] = value
        model = create_model(cfg.model, cfg.size, **overrides)
        set_token_ids(model, tokenizer.eos_id)  # saved in config.json / generation_config.json: generate() stops at EOS
        seq_len = cfg.seq_len or int(getattr(model.config, "max_train_length", 0) or 512)
        if train_data.num_tokens < seq_len:
            raise ValueError(f"the train split of {corpus.name} has {train_data.num_tokens:,} tokens, fewer than one "
                             f"segment of --seq-len {seq_len}: use a smaller --seq-len or a larger corpus")
        held = self._held_out(info, corpus, tokenizer)
        valid_data, test_data = held["validation"], held["test"]
        if resume_ckpt is not None:
            ckpt_io.load_model_weights(model, resume_ckpt)
        n_params = sum(p.numel() for p in model.parameters())
        if cfg.lane_span and not carries_state(model):  # before _open_run: the corrected command must not clash
            raise ValueError(f"--lane-span applies to models that carry state across segments (slide, transformer-xl, "
                             f"brect); {cfg.model} reads shuffled segments: drop --lane-span")
        if carries_state(model) and cfg.packing:  # before _open_run, like --lane-span
            raise ValueError(f"{cfg.model} carries state across segments and trains on documents in order "
                             "(contiguous lanes with reset flags): drop --packing")
        if main:  # weights + two optimiser moments per kept checkpoint, plus the one being written
            check_writable(run_dir, need_bytes=n_params * 4 * 3 * (cfg.keep_checkpoints + 1))
        self._open_run(info, run_dir, resume_ckpt, saved)
        model.to(info.device)
        if cfg.gradient_checkpointing:  # before the wrapper: each layer is recomputed in the backward
            enable_gradient_checkpointing(model)
        groups = group_of_parameters(model)
        wrapped = D.wrap_model(model, info)
        optimizer = build_optimizer(model, groups, cfg)
        autocast = autocast_factory(cfg.precision, info.device)

        global_batch = cfg.batch_size * cfg.grad_accum * info.world_size
        tokens_per_step = global_batch * seq_len
        stateful = carries_state(model)
        loader = SegmentLoader(train_data, seq_len, cfg.batch_size, seed=cfg.seed, rank=info.rank,
                               world_size=info.world_size, packing=cfg.packing, contiguous=stateful,
                               lane_span=cfg.lane_span)
        carry = None
        torch.manual_seed(cfg.seed + 1_000_003 * info.rank)  # dropout stream: distinct per rank
        total_steps = cfg.steps_for_tokens(tokens_per_step)
        budget_s = None if cfg.effective_time_budget() is None else cfg.effective_time_budget() * 60
        step, tokens, elapsed = 0, 0, 0.0
        skipped = skipped_in_a_row = 0  # steps skipped for a non-finite loss / gradient: total, consecutive
        t_warm = 0.0 if cfg.warmup_steps == 0 else None  # training seconds at the end of warmup
        if resume_ckpt is not None:
            if saved.get("global_batch") != global_batch:
                raise ValueError(f"--resume: the run used a global batch of {saved.get('global_batch')} segments "
                                 f"(batch x grad-accum x processes), this launch has {global_batch}: keep the "
                                 "product the same")
            step, tokens, elapsed = int(saved["step"]), int(saved["tokens"]), float(saved["train_seconds"])
            skipped = int(saved.get("skipped_steps", 0))
            t_warm = saved.get("warmup_end_seconds")
            if total_steps is None and "steps" not in self.explicit and "tokens" not in self.explicit:
                total_steps = saved.get("total_steps")
            loader.load_state_dict(saved["loader"])
            opt_state = ckpt_io.load_optimizer_state(resume_ckpt, optimizer.param_groups)
            if opt_state is not None:
                D.load_optimizer_full_state(wrapped, optimizer, opt_state, info)
            carry = ckpt_io.load_carry(resume_ckpt, info.rank, info.device) if stateful else None
            if not ckpt_io.load_rng_state(resume_ckpt, info.rank):
                logger.warning("checkpoint has no RNG state for rank %d (other world size): dropout reseeded",
                               info.rank)
        if total_steps is not None and step >= total_steps:
            say(f"{run_dir}: already at step {step} of {total_steps}; pass a larger --steps to train further")

        if main:
            if resume_ckpt is not None:
                truncate_metrics(run_dir / "metrics.jsonl", step)
            say(f"data: {corpus.name} ({cfg.tokenizer}, vocab {tokenizer.vocab_size}): train "
                f"{train_data.num_tokens:,} tokens in {train_data.num_documents} documents; "
                f"read: {corpus.stats.summary()}")
            say(f"model: {cfg.model} size={cfg.size}, {n_params:,} parameters, L={seq_len}, "
                f"W={block_label(model.config)}; {cfg.optimizer} groups "
                + ", ".join(f"{g['name']}={g['params']:,}@{g['lr']:.0e}" for g in describe_groups(optimizer)))
            budget = (f"{total_steps} steps" if total_steps else "") + (
                f"{' or ' if total_steps else ''}{format_seconds(budget_s)} of training" if budget_s else "")
            say(f"run: {run_dir} | global batch {global_batch} x {seq_len} tokens | {budget} | "
                f"{info.world_size} process(es) on {info.device}"
                + (" with bf16 autocast" if use_bf16(cfg.precision, info.device) else " in fp32")
                + (f" | resumed at step {step}" if step else ""))
        metrics = MetricsLogger(run_dir, enabled=main)

        def make_state() -> dict[str, Any]:
            return {"run_id": self.run_id, "step": step, "total_steps": total_steps, "tokens": tokens,
                    "train_seconds": elapsed, "warmup_end_seconds": t_warm, "world_size": info.world_size,
                    "global_batch": global_batch, "seq_len": seq_len, "loader": loader.state_dict(),
                    "schedule": {"kind": cfg.schedule, "step": step}, "skipped_steps": skipped,
                    "data_fingerprint": corpus.fingerprint}

        last_saved = step if resume_ckpt is not None else -1
        ckpt_dir = resume_ckpt

        def save() -> Path:
            nonlocal last_saved, ckpt_dir
            if last_saved == step and ckpt_dir is not None:
                return ckpt_dir
            model_state, opt_state = D.full_state_dicts(wrapped, optimizer, info)
            local = {"rng": ckpt_io.rng_state(), "carry": None if carry is None else ckpt_io.flatten_carry(carry)}
            rank_states = D.gather_object(local, info)
            ckpt_dir = run_dir / ckpt_io.CHECKPOINTS / ckpt_io.checkpoint_name(step)
            if main:
                ckpt_io.save_checkpoint(run_dir, step, model=model, model_state=model_state, optimizer_state=opt_state,
                                        trainer_state=make_state(), train_config=cfg.to_dict(), tokenizer=tokenizer,
                                        keep=cfg.keep_checkpoints, rank_states=rank_states)
            D.barrier(info)
            last_saved = step
            return ckpt_dir

        eval_model = wrapped if info.parallel == "fsdp" else D.unwrap(wrapped)
        reduce = (lambda t: D.all_reduce_tensor(t, info)) if info.enabled else None
        valid_head = head_documents(valid_data, cfg.eval_tokens) if valid_data is not None else None

        def validate(data) -> EvalResult:
            return evaluate(eval_model, data, seq_len, device=info.device, autocast=autocast, rank=info.rank,
                            world_size=info.world_size, reduce=reduce, positions=False)

        # -- loop ------------------------------------------------------------------------------------------
        progress = Progress(total_steps, step, enabled=main and cfg.progress)
        window_nll = window_count = 0.0
        last_loss: float | None = None
        interrupted = None
        t_rate, tokens_rate = time.perf_counter(), tokens
        t_speed, tokens_speed, speed_said = time.perf_counter(), tokens, not main  # the one-time speed line
        precision = "bf16 autocast" if use_bf16(cfg.precision, info.device) else "fp32"
        wrapped.train()
        with StopSignals() as stop:
            while total_steps is None or step < total_steps:
                t0 = time.perf_counter()
                progress_frac = None
                if total_steps is None and budget_s:  # time-driven cosine
                    start = t_warm if t_warm is not None else elapsed
                    progress_frac = (elapsed - start) / max(1e-9, budget_s - start)
                factor = lr_factor(step, cfg, total_steps, progress_frac)
                lr = set_lr(optimizer, factor)
                batches = [next(loader) for _ in range(cfg.grad_accum)]
                local_count = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
                count = D.all_reduce([local_count], info)[0]
                scale = info.world_size / max(1.0, count)  # DDP / FSDP average gradients over ranks
                nll_sum = torch.zeros((), device=info.device)
                for i, batch in enumerate(batches):
                    with D.no_sync(wrapped, info, last=i == len(batches) - 1):
                        nll, carry = step_nll(wrapped, batch, info.device, autocast, carry, stateful)
                        (nll * scale).backward()
                    nll_sum += nll.detach()
                grad_norm = clip_gradients(model, cfg.grad_clip)
                loss_sum, bad = D.all_reduce([float(nll_sum), 0.0 if math.isfinite(grad_norm) else 1.0], info)
                step += 1
                tokens += int(count)
                if bad or not math.isfinite(loss_sum):
                    # a NaN / inf update would poison the weights and the optimiser moments for good: drop it
                    optimizer.zero_grad(set_to_none=True)
                    skipped, skipped_in_a_row = skipped + 1, skipped_in_a_row + 1
                    carry = None if carry is not None and not carry_is_finite(carry) else carry
                    logger.warning("step %d: %s; optimiser step skipped (%d skipped so far, %d in a row)", step,
                                   f"the loss is {loss_sum}" if not math.isfinite(loss_sum)
                                   else f"the gradient norm is {grad_norm}", skipped, skipped_in_a_row)
                    metrics.log("skip", step, loss=loss_sum, grad_norm=grad_norm, skipped_steps=skipped, lr=lr)
                    if cfg.max_skipped_steps and skipped_in_a_row >= cfg.max_skipped_steps:
                        raise TrainingDiverged(
                            f"the loss or gradient was not finite for {skipped_in_a_row} steps in a row (steps "
                            f"{step - skipped_in_a_row + 1}-{step}; weights kept from step "
                            f"{step - skipped_in_a_row}): lower --lr (now {cfg.lr}), raise --warmup-steps or check "
                            f"the data, then start again or resume from the last checkpoint "
                            f"({ckpt_dir.name if ckpt_dir else 'none yet'}); --max-skipped-steps sets this limit")
                else:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    skipped_in_a_row = 0
                    window_nll += loss_sum
                    window_count += count
                if cfg.warmup_steps and step == cfg.warmup_steps and t_warm is None:
                    t_warm = elapsed
                elapsed += time.perf_counter() - t0
                stop_now = D.all_reduce([1.0 if stop.signal else 0.0, elapsed], info, op="max")
                elapsed = stop_now[1]
                if stop_now[0] and interrupted is None:
                    interrupted = stop.signal or "SIGTERM"
                budget_done = budget_s is not None and elapsed >= budget_s
                done = (total_steps is not None and step >= total_steps) or budget_done or interrupted
                if step % cfg.log_every == 0 or done:
                    now = time.perf_counter()
                    tok_s = (tokens - tokens_rate) / max(1e-9, now - t_rate)
                    t_rate, tokens_rate = now, tokens
                    window_loss = window_nll / window_count if window_count else None  # None: all skipped
                    last_loss = window_loss if window_loss is not None else last_loss
                    metrics.log("train", step, loss=window_loss, lr=lr, tokens=tokens, tok_s=tok_s,
                                seconds=round(elapsed, 2), grad_norm=grad_norm, skipped_steps=skipped)
                    window_nll = window_count = 0.0
                    eta = eta_seconds(step, total_steps, elapsed, budget_s)
                    if total_steps is None and budget_s and step > 0:
                        progress.set_total(max(step, int(step * budget_s / max(elapsed, 1e-9))))
                    progress.update(step, total_steps, last_loss if last_loss is not None else math.nan, tok_s, lr,
                                    eta)
                    if not speed_said and (step >= SPEED_STEPS or done):  # once, early: what this machine does
                        speed_said = True
                        rate = (tokens - tokens_speed) / max(1e-9, now - t_speed)
                        need = total_steps * tokens_per_step / rate if total_steps and rate > 0 else None
                        left = f"; {total_steps:,} steps take about {format_seconds(need)} at this rate" if need else ""
                        (progress.write if progress.enabled else say)(
                            f"speed: {rate:,.0f} tokens/s in {precision} over the first {step} steps{left}")
                if valid_head is not None and cfg.eval_every and step % cfg.eval_every == 0 and not done:
                    t_eval = time.perf_counter()
                    res = validate(valid_head)
                    elapsed += time.perf_counter() - t_eval
                    metrics.log("eval", step, val_loss=res.loss, val_bpb=res.bpb, val_ppl=res.ppl, tokens=tokens)
                    progress.write(f"step {step}: validation loss {res.loss:.4f}, {res.bpb:.3f} bits/byte")
                if cfg.save_every and step % cfg.save_every == 0 and not done:
                    t_save = time.perf_counter()
                    save()
                    elapsed += time.perf_counter() - t_save
                if done:
                    break
        progress.close()

        # -- end ---------------------------------------------------------------------------------------------
        val = None
        if valid_head is not None and not interrupted and step > 0:
            val = validate(valid_head)
            metrics.log("eval", step, val_loss=val.loss, val_bpb=val.bpb, val_ppl=val.ppl, tokens=tokens)
        ckpt_dir = save() if step > 0 else ckpt_dir
        if main and ckpt_dir is not None:  # the run directory itself becomes the model (from_pretrained(run_dir))
            publish_model(run_dir, ckpt_dir, tokenizer)
        result = TrainResult(run_dir, ckpt_dir, step, last_loss, tokens, elapsed, interrupted, skipped,
                             validation=val)
        if interrupted:
            say(f"stopped by {interrupted} at step {step}; checkpoint {ckpt_dir}; continue with: "
                f"blockstate train --resume {run_dir}")
            metrics.close()
            return result
        if main:
            plot = plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png",
                                   f"{cfg.model} {cfg.size} on {cfg.data} ({cfg.tokenizer})")
            result.plots += [plot] if plot else []
        if cfg.final_eval and test_data is not None and step > 0:
            result.test = evaluate(eval_model, test_data, seq_len, device=info.device, autocast=autocast,
                                   rank=info.rank, world_size=info.world_size, reduce=reduce, positions=False)
        if main and cfg.sample_tokens and step > 0:
            result.sample = self._sample(wrapped, info, ckpt_dir, tokenizer, seq_len)
            (run_dir / "sample.txt").write_text(result.sample + "\n", encoding="utf-8")
        if main:
            final = {"tokens": tokens, "train_seconds": round(elapsed, 1),
                     "wall_seconds": round(time.perf_counter() - t_wall, 1), "train_loss": last_loss,
                     "parameters": n_params, "checkpoint": str(ckpt_dir), "skipped_steps": skipped}
            if val is not None:
                final.update(val_loss=val.loss, val_bpb=val.bpb, val_tokens=val.tokens)
            if result.test is not None:
                final.update(test_loss=result.test.loss, test_bpb=result.test.bpb, test_ppl=result.test.ppl,
                             test_tokens=result.test.tokens)
            metrics.log("final", step, **final)
            ckpt_io.write_json(run_dir / "results.json", {"step": step, **final, "config": cfg.to_dict()})
        metrics.close()
        return result

    def _sample(self, wrapped, info: D.DistInfo, ckpt_dir: Path | None, tokenizer, seq_len: int) -> str:
        from blockstate.generation import SamplingConfig, generate_text

        model = D.unwrap(wrapped)
        if info.parallel == "fsdp" and info.enabled:  # sharded weights: read the full model back on this rank
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(ckpt_dir, use_safetensors=True).to(info.device)
        prompt = self.cfg.sample_prompt
        if prompt is None:  # something that suits the built-in corpora; elsewhere start a fresh document
            prompt = {"python-stdlib": "def ", "shakespeare": "ROMEO:"}.get(self.cfg.data, "")
        cfg = SamplingConfig(max_new_tokens=self.cfg.sample_tokens, temperature=max(0.0, self.cfg.temperature),
                             seed=self.cfg.seed)
        if not can_generate(model):
            logger.warning("no sample: %s has no generate() yet", type(model).__name__)
            return ""
        return prompt + generate_text(model, tokenizer, prompt, cfg)  # HF generate(), the one generation path

