"""Like-for-like quality comparison (the layout of the paper's Table 1): every chosen model trained at the same size
preset (so the same parameter budget: the registry matches every model to BST:SH:S4 within 5%), on the same
corpus, tokenizer, seed, recipe and number of training TOKENS, then scored on the test split at the training
length and at 4x and 16x of it, with the loss by position inside the training-length segments.

Training and evaluation are the project's own (``blockstate.training.Trainer``, ``blockstate.evaluation``), run
in-process. Each model trains in its own run directory, ``<runs>/<corpus>-<size>[-L<seq_len>]/<row>``, which also
records the comparison settings (``compare.json``) and the evaluation (``compare-eval.json``, plus the usual
``eval/`` report). Rerunning the same command skips finished models, evaluates trained ones, and resumes
interrupted ones from their last checkpoint (saved every ``save_every`` steps): an interrupted comparison costs
at most the steps since that checkpoint. A run directory trained with other settings is refused (pass
``--overwrite`` to retrain, or another ``--runs``).

Rows.  A row is a registered model, or ``<model>:nocarry``: the same architecture with nothing carried across
segments (``carry_state=false``), the control that separates the architecture from its data order.  The default
rows end with ``slide:nocarry`` and ``transformer-xl:nocarry`` (BRecT cannot drop its state).

Same data for every model: the same tokenised corpus and the same seeded segment order. Models that carry state
across segments (Slide, Transformer-XL, BRecT) must read consecutive segments (their state must follow the text):
by default (``lane_span`` = 8) each batch row walks a run of 8 consecutive segments from a random document and
offset, then jumps to a new random start with its state reset, so they draw documents in proportion to length
like shuffled training, once per 8 segments per row, where whole-document lanes (``lane_span`` = 0, before this
option) walked through a few dozen documents per run.  8 segments are the paper's 4096-token training length at
L = 512, so the carried state is exercised over 7 hand-overs per run.  Evaluation follows
``blockstate.evaluation.evaluate``'s protocol on the first documents of the split holding at most
``eval_tokens`` tokens (0: the whole split), the same documents for every model; stateful models carry their
state across segments of a document there too.

Learning rates (``lr_sweep`` = N > 1): every row trains at N learning rates, a geometric grid of ratio 2 around
the base (``--lr``, else the trainer's 2e-3) that always holds the base: factors 2^(k - (N-1)//2), k = 0..N-1
(N=2: x1, x2; N=3: x0.5, x1, x2; N=4: x0.5 to x4).  Each run is scored at its training length on the validation
split (its first ``eval_tokens`` tokens); the run with the lowest validation loss is the row's, and only it is
scored on the test split, so the test split plays no part in the choice.  A run that diverges (too many
non-finite steps) is recorded as such and left out of the choice.  The base-lr run lives in the row's plain run
directory (shared with a comparison without the sweep); the others in ``<row>-lr<lr>``.

Quality numbers depend only on the token budget, never on timing; training wall time is reported beside them
and is only as good as the machine was quiet.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

from blockstate.benchmarks.common import machine, write_json
from blockstate.benchmarks.compare_eval import (  # noqa: F401 (evaluate_one, eval_identity: this module's API too)
    EVAL_FILE,
    POSITION_BUCKETS,
    VALID_FILE,
    _read,
    eval_identity,
    evaluate_one,
    validate_one,
)
from blockstate.benchmarks.compare_report import markdown, plot, plot_position
from blockstate.benchmarks.compare_settings import (  # noqa: F401 (this module's API too)
    DEFAULT_EVAL_TOKENS,
    DEFAULT_LANE_SPAN,
    DEFAULT_LENGTHS,
    DEFAULT_MODELS,
    DEFAULT_TOKENS,
    DIVERGED_FILE,
    NOCARRY,
    SETTINGS_FILE,
    CompareSettings,
    lr_factors,
)


def split_row(row: str) -> tuple[str, dict[str, Any]]:
    """``slide:nocarry`` -> (``slide``, {carry_state: False}); a plain model name -> (name, {})."""
    if row.endswith(NOCARRY):
        return row[:-len(NOCARRY)], {"carry_state": False}
    return row, {}


_STATEFUL: dict[tuple[str, str, str], bool] = {}


def row_carries_state(row: str, s: CompareSettings) -> bool:
    """Whether the row's model (with ``s.model_args``) carries state across training segments (built on the meta
    device; cached, as every run of a comparison asks)."""
    key = (row, s.size, json.dumps(s.model_args, sort_keys=True, default=str))
    if key not in _STATEFUL:
        import torch

        from blockstate import registry

        model, extra = split_row(row)
        with torch.device("meta"):
            _STATEFUL[key] = registry.carries_state(registry.create_model(model, s.size, **{**s.model_args, **extra}))
    return _STATEFUL[key]


# -- one run -----------------------------------------------------------------------------------------------------
def train_config(s: CompareSettings, corpus: str, row: str, lr: float | None = None):
    from blockstate.training import TrainConfig

    model, extra = split_row(row)
    values: dict[str, Any] = dict(model=model, size=s.size, data=corpus, tokenizer=s.tokenizer, seq_len=s.seq_len,
                                  batch_size=s.batch_size, tokens=s.tokens, seed=s.seed, precision=s.precision,
                                  device=s.device, output=str(s.run_dir(corpus, row, lr)), eval_every=0,
                                  eval_tokens=32768, save_every=s.save_every, keep_checkpoints=1, final_eval=False,
                                  sample_tokens=0, threads=s.threads, cache_dir=s.cache_dir, progress=s.progress)
    if lr is not None or s.lr is not None:
        values["lr"] = lr if lr is not None else s.lr
    if s.model_args or extra:
        values["model_args"] = {**s.model_args, **extra}
    if s.lane_span and row_carries_state(row, s):
        values["lane_span"] = s.lane_span
    values.update(s.train_args)
    return TrainConfig(**values).validate()


def identity(s: CompareSettings, corpus: str, row: str, lr: float | None = None) -> dict[str, Any]:
    """What makes two trainings the same experiment (the recipe's other fields are the trainer's defaults)."""
    cfg = train_config(s, corpus, row, lr)
    ident = {k: getattr(cfg, k) for k in ("model", "size", "data", "tokenizer", "seq_len", "batch_size", "tokens",
                                          "seed", "precision", "lr")}
    # only when given, so runs made before these options existed still match
    if cfg.model_args:
        ident["model_args"] = dict(cfg.model_args)
    if cfg.lane_span:
        ident["lane_span"] = cfg.lane_span
    if s.train_args:
        ident["train_args"] = dict(s.train_args)
    return ident


def train_one(s: CompareSettings, corpus: str, row: str, log: Any = print, *, lr: float | None = None
              ) -> dict[str, Any]:
    """Train (or resume, or skip) one run; returns its ``results.json`` plus ``status`` (and ``diverged``)."""
    from blockstate.runtime.checkpoint import latest_checkpoint
    from blockstate.training import Trainer
    from blockstate.training.rundir import holds_run
    from blockstate.training.trainer import TrainingDiverged

    run_dir = s.run_dir(corpus, row, lr)
    ident = identity(s, corpus, row, lr)
    marker = run_dir / SETTINGS_FILE
    saved = _read(marker)
    fresh = s.overwrite or not holds_run(run_dir)
    if not fresh and (saved or {}).get("train") != ident:
        what = ("was trained with other settings: " + ", ".join(
            f"{k} {saved['train'].get(k)!r} (now {v!r})" for k, v in ident.items() if saved["train"].get(k) != v)
            if saved and "train" in saved else "holds a run that blockstate compare did not start")
        raise ValueError(f"{run_dir} {what}: pass --overwrite to retrain, or another --runs directory")
    diverged = _read(run_dir / DIVERGED_FILE)
    if not s.overwrite and diverged and diverged.get("train") == ident:  # retrying would diverge again
        return {"status": "diverged earlier", "diverged": diverged.get("error", "")}
    results = _read(run_dir / "results.json")
    if not fresh and results is not None and (results.get("config") or {}).get("tokens") == s.tokens:
        return {**results, "status": "trained earlier"}  # results.json is written when a run completes
    run_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        for name in (EVAL_FILE, VALID_FILE, DIVERGED_FILE):
            (run_dir / name).unlink(missing_ok=True)
    write_json(marker, {"train": ident, "machine_at_training_start": machine()})  # wall time is only as good
    cfg = train_config(s, corpus, row, lr)
    resume = None if fresh else latest_checkpoint(run_dir)
    log(f"== {row} on {corpus}" + (f" at lr {cfg.lr:.3g}" if s.lr_sweep > 1 else "") + ": "
        + (f"resuming {resume}" if resume else f"training {s.tokens:,} tokens") + f" into {run_dir}")
    t0 = time.perf_counter()
    try:
        result = Trainer(cfg, resume=resume, overwrite=resume is None).run()
    except TrainingDiverged as exc:
        if s.lr_sweep <= 1:  # a comparison at one learning rate has nothing to fall back on
            raise
        write_json(run_dir / DIVERGED_FILE, {"train": ident, "error": str(exc)})
        log(f"   {row} diverged at lr {cfg.lr:.3g}: left out of the learning-rate choice")
        return {"status": "diverged", "diverged": str(exc)}
    if result.interrupted:
        return {"status": "interrupted", "signal": result.interrupted}
    results = _read(run_dir / "results.json") or {}
    return {**results, "status": f"trained in {time.perf_counter() - t0:.0f} s of wall time"}


TRAIN_KEYS = ("step", "tokens", "train_seconds", "wall_seconds", "train_loss", "val_bpb", "val_loss")


def _choose(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The run with the lowest finite validation loss (None when every run diverged)."""
    ok = [r for r in runs if not r.get("diverged") and math.isfinite((r.get("valid") or {}).get("loss", math.nan))]
    return min(ok, key=lambda r: r["valid"]["loss"]) if ok else None


# -- the comparison ----------------------------------------------------------------------------------------------
def run(s: CompareSettings, log: Any = print) -> dict[str, Any] | None:
    """Train and evaluate every row on every corpus; write the tables, JSON and plots. None when interrupted."""
    from blockstate.data import load_corpus

    for corpus in s.corpora:  # a bad corpus fails now, not after an hour of training on the first one
        load_corpus(corpus)
    if s.threads:
        import torch

        torch.set_num_threads(s.threads)
    info = machine()
    sweep = s.lr_sweep > 1
    log(f"compare on {info['device']}, torch {info['torch']}, {info['threads']} threads: {len(s.models)} models x "
        f"{len(s.corpora)} corpora" + (f" x {s.lr_sweep} learning rates" if sweep else "") + f", size {s.size}, "
        f"{s.tokens:,} training tokens each; runs in {s.runs}")
    entries: dict[str, dict[str, Any]] = {}
    for m in s.models:
        stateful = row_carries_state(m, s)
        entries[m] = {"name": m, "model": split_row(m)[0], "carries_state": stateful,
                      "lane_span": s.lane_span if stateful else 0, "corpora": {}}
    started = time.perf_counter()
    for corpus in s.corpora:
        for row in s.models:
            runs = []
            for lr in s.lrs() if sweep else [None]:
                train = train_one(s, corpus, row, log, lr=lr)
                if train["status"] == "interrupted":
                    log(f"interrupted ({train['signal']}) while training {row} on {corpus}; its last checkpoint is "
                        "kept: rerun the same command to continue (finished models are skipped)")
                    return None
                status = train["status"]  # logged, not saved: a rerun must write the same JSON
                one = {"lr": train_config(s, corpus, row, lr).lr, "run_dir": str(s.run_dir(corpus, row, lr)),
                       "train": {k: train.get(k) for k in TRAIN_KEYS}}
                if sweep:
                    log(f"   {row} at lr {one['lr']:.3g}: {status}")
                if train.get("diverged") is not None:
                    one["diverged"] = train["diverged"]
                elif sweep:
                    valid = validate_one(s, corpus, row, log, lr=lr)
                    one["valid"] = {k: v for k, v in valid.items() if k != "settings"}
                runs.append(one)
            chosen = _choose(runs) if sweep else runs[0]
            if chosen is None:
                log(f"   {row} on {corpus}: every learning rate diverged; no test evaluation")
                entries[row]["corpora"][corpus] = {"sweep": runs, "lr": None}
                continue
            chosen["chosen"] = sweep
            lr = chosen["lr"] if sweep else None
            ev = evaluate_one(s, corpus, row, log, lr=lr)
            log(f"   {row} on {corpus}: {status if not sweep else 'trained'}, {ev['status']}"
                + (f" (lr {chosen['lr']:.3g}, chosen on validation)" if sweep else ""))
            entries[row]["parameters"] = ev.get("parameters")
            trained_on = (_read(s.run_dir(corpus, row, lr) / SETTINGS_FILE) or {}).get("machine_at_training_start")
            entry = {"train": chosen["train"], "eval": {k: ev[k] for k in ("train_length", "documents", "eval_seconds",
                                                                            "results")},
                     "position": ev.get("position"), "lr": chosen["lr"], "run_dir": chosen["run_dir"],
                     "machine_at_training_start": trained_on}
            if sweep:
                entry.update(valid=chosen["valid"], lr_selected_on="validation", sweep=runs)
            entries[row]["corpora"][corpus] = entry
    payload = {"benchmark": "compare", "command": s.command, "machine": info,
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(s).items()
                            if k not in ("command", "overwrite", "progress")},
               "lrs": s.lrs(), "wall_seconds_this_invocation": round(time.perf_counter() - started, 1),
               "models": list(entries.values())}
    out = s.output_dir()
    write_json(out / "compare.json", payload)
    (out / "compare.md").write_text(markdown(payload), encoding="utf-8")
    plot(payload, out / "compare.png")
    wrote = ["compare.md", "compare.png"] + (["compare-position.png"] if plot_position(
        payload, out / "compare-position.png") else [])
    log(markdown(payload))
    log(f"wrote {out / 'compare.json'}, {', '.join(wrote)}")
    return payload
