"""``blockstate train``: train a model (defaults: the tiny BST on python-stdlib, bytes, 3M tokens, ~10 min on 2 CPUs).

Settings come from the defaults, then ``--config FILE`` (YAML or JSON, keys = the long flag names), then the
flags. Distributed: ``torchrun --nproc_per_node=N -m blockstate train ... --parallel ddp|fsdp``.

Exit codes: 0 done; 2 bad settings or input, a damaged checkpoint, a full disk, or too many non-finite steps
in a row (one line on stderr; the last checkpoint is intact); 130 / 143 stopped by SIGINT / SIGTERM after
saving a checkpoint of the current step (continue with ``blockstate train --resume RUN``). See
docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

S = argparse.SUPPRESS  # flags left out stay out of the namespace: only what the user gave overrides the file


def _count(text: str) -> int:
    """``10M``, ``2.5e6``, ``500k`` -> int."""
    t = text.strip().lower().replace("_", "")
    scale = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (e.g. 5000000, 5M, 500k)") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive whole number")
    return int(value)


def _model_arg(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--model-arg {text!r}: use KEY=VALUE, e.g. --model-arg num_hidden_layers=6")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def register(sub: argparse._SubParsersAction, name: str) -> None:
    from blockstate.registry import list_models
    from blockstate.training.config import DEFAULT_TOKENS, OPTIMIZERS, PRECISIONS, SCHEDULES

    p = sub.add_parser(name, help="train a language model (default: tiny BST on python-stdlib, 3M tokens)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML/JSON file of settings (flags override it)")
    p.add_argument("--resume", nargs="?", const=True, metavar="DIR",
                   help="continue a run: its run directory or a checkpoint (default: --output)")
    p.add_argument("--overwrite", action="store_true", help="start again in an --output that holds a run")
    p.add_argument("-v", "--verbose", action="store_true", help="log data loading details")

    g = p.add_argument_group("model")
    g.add_argument("--model", default=S, help=f"model name: {', '.join(list_models())} (default bst-sh-s4; "
                                              "blockstate models lists them with their sizes)")
    g.add_argument("--size", default=S, help="preset size: tiny, small, paper (default tiny)")
    g.add_argument("--model-arg", dest="model_args", action="append", type=_model_arg, default=S, metavar="K=V",
                   help="override a model-config field (repeatable), e.g. num_hidden_layers=6")
    g.add_argument("--block-size", type=int, default=S, help="block length W (default: the preset's)")
    g.add_argument("--dropout", type=float, default=S, help="residual dropout (default: the preset's)")

    g = p.add_argument_group("data")
    g.add_argument("--data", default=S, help="python-stdlib, shakespeare, books, a directory, a .txt/.jsonl file, "
                                             "hf:<name> (default python-stdlib)")
    g.add_argument("--tokenizer", default=S, help="bytes, bpe, bpe:<vocab>, a SentencePiece .model, a saved "
                                                  "tokenizer directory (default bytes)")
    g.add_argument("--suffixes", default=S, metavar=".EXT,...",
                   help="file suffixes read from a corpus folder, e.g. .py,.md (default .txt,.jsonl)")
    g.add_argument("--text-field", default=S, metavar="NAME",
                   help="the field of each .jsonl record that holds the text (default text)")
    g.add_argument("--seq-len", type=int, default=S, help="training segment length L (default: the preset's)")
    g.add_argument("--packing", action=argparse.BooleanOptionalAction, default=S,
                   help="pack documents into one stream (default: no, segments never mix documents)")
    g.add_argument("--lane-span", type=int, default=S, metavar="K",
                   help="models that carry state (slide, transformer-xl, brect): each batch row walks K consecutive "
                        "segments from a random document and offset, then jumps (state reset); 0 = whole "
                        "documents in order (default 0)")
    g.add_argument("--cache-dir", default=S, help="token / tokenizer cache (default ~/.cache/blockstate)")

    g = p.add_argument_group("budget and batch")
    g.add_argument("--batch-size", type=int, default=S, help="segments per process per micro-step (default 4)")
    g.add_argument("--grad-accum", type=int, default=S, help="micro-steps per optimiser step (default 1)")
    g.add_argument("--steps", type=int, default=S, help="optimiser steps")
    g.add_argument("--tokens", type=_count, default=S,
                   help=f"token budget instead of --steps (e.g. 20M); the default when no budget is given is "
                        f"{DEFAULT_TOKENS / 1e6:g}M, the same result on every machine")
    g.add_argument("--time-budget", type=float, default=S, metavar="MIN",
                   help="minutes of training (with --steps or --tokens: a hard stop; alone: the cosine follows "
                        "time, so the result depends on the machine's speed)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=S, help="default adamw")
    g.add_argument("--lr", type=float, default=S, help="peak learning rate (default 2e-3)")
    g.add_argument("--ssm-lr", type=float, default=S, help="SSM parameters' learning rate (default min(lr, 1e-3))")
    g.add_argument("--weight-decay", type=float, default=S, help="default 0.1 (not on norms, embeddings, SSM)")
    g.add_argument("--beta1", type=float, default=S)
    g.add_argument("--beta2", type=float, default=S)
    g.add_argument("--schedule", choices=SCHEDULES, default=S, help="after warmup (default cosine)")
    g.add_argument("--warmup-steps", type=int, default=S, help="default 50")
    g.add_argument("--min-lr-ratio", type=float, default=S, help="cosine floor as a fraction of --lr (default 0.1)")
    g.add_argument("--grad-clip", type=float, default=S, help="global gradient-norm clip, 0 = off (default 1)")
    g.add_argument("--max-skipped-steps", type=int, default=S, metavar="N",
                   help="a step with a non-finite loss or gradient is skipped; stop after N in a row, 0 = never "
                        "(default 20)")
    g.add_argument("--seed", type=int, default=S)
    g.add_argument("--precision", choices=PRECISIONS, default=S,
                   help="auto = bf16 autocast where bf16 is native (GPU, AVX512-BF16/AMX CPUs), else fp32")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=S,
                   help="recompute each layer's activations in the backward: less memory, same gradients")

    g = p.add_argument_group("run")
    g.add_argument("--output", default=S, help="run directory (default runs/<model>-<size>-<data>, numbered)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=S)
    g.add_argument("--parallel", choices=("none", "ddp", "fsdp"), default=S, help="under torchrun: ddp or fsdp")
    g.add_argument("--threads", type=int, default=S, help="torch CPU threads")
    g.add_argument("--eval-every", type=int, default=S, help="validation every N steps, 0 = at the end (250)")
    g.add_argument("--eval-tokens", type=_count, default=S, metavar="N",
                   help="validate on the first whole documents of the validation split up to N tokens; documents "
                        "are never cut, so at least one is used and the first may exceed N (default 65536)")
    g.add_argument("--save-every", type=int, default=S, help="checkpoint every N steps, 0 = at the end (500)")
    g.add_argument("--keep-checkpoints", type=int, default=S, help="newest checkpoints kept (2)")
    g.add_argument("--log-every", type=int, default=S, help="metrics.jsonl line every N steps (10)")
    g.add_argument("--final-eval", action=argparse.BooleanOptionalAction, default=S,
                   help="test-split bits per byte at the end (default yes)")
    g.add_argument("--sample-tokens", type=int, default=S, help="tokens sampled at the end, 0 = none (256)")
    g.add_argument("--sample-prompt", default=S, help="prompt of the sample (default: 'def ' on python-stdlib)")
    g.add_argument("--temperature", type=float, default=S)
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=S, help="progress bar")
    p.set_defaults(run=run)


NOT_CONFIG = {"config", "resume", "overwrite", "verbose", "debug", "command", "run"}


def explicit_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(settings from --config, settings from flags), field names as keys."""
    from blockstate.training.config import load_config_file

    file_values = load_config_file(args.config) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if k not in NOT_CONFIG}
    if "model_args" in flags:
        flags["model_args"] = {**file_values.get("model_args", {}), **dict(flags["model_args"])}
    return file_values, flags


def _setup_logging(verbose: bool) -> None:
    """One-line warnings (skipped files, replaced characters...) on the current stderr."""
    log = logging.getLogger("blockstate")
    handler = next((h for h in log.handlers if getattr(h, "_blockstate_cli", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._blockstate_cli = True
        handler.setFormatter(logging.Formatter("blockstate: %(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    handler.stream = sys.stderr  # not setStream: it flushes the old stream, which a test may have closed
    quiet = int(os.environ.get("RANK", "0")) != 0  # torchrun: one rank speaks
    log.setLevel(logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING)


def run(args: argparse.Namespace) -> int:
    from blockstate.training.config import merge
    from blockstate.training.trainer import Trainer

    _setup_logging(args.verbose)
    file_values, flags = explicit_settings(args)
    explicit = {**file_values, **flags}
    cfg = merge(file_values, flags)
    if args.resume is None:  # fail in a second, before the data is read and the run directory is made
        check_model_settings(cfg, file_values, flags, args.config)
    resume = args.resume
    if resume is True:
        if cfg.output is None:
            raise ValueError("--resume without a directory needs --output: pass --resume runs/<run>")
        resume = cfg.output
    result = Trainer(cfg, resume=resume, overwrite=args.overwrite, explicit=explicit).run()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.interrupted:
        return 130 if result.interrupted == "SIGINT" else 143
    print(summary(result))
    return 0


def check_model_settings(cfg: Any, file_values: dict[str, Any], flags: dict[str, Any], config: str | None) -> None:
    """--model, --size and every model-config override, checked against the registry: a misspelt
    ``--model-arg hiden_size=64`` would otherwise be stored in config.json and train the default width."""
    from blockstate.registry import check_overrides, get_model_entry, model_config

    try:
        entry = get_model_entry(cfg.model)
    except ValueError as exc:
        raise ValueError(f"--model: {exc}") from None
    config_class = type(model_config(entry.name, cfg.size))  # ValueError naming the sizes for a bad --size
    from_file = file_values.get("model_args") or {}
    if not isinstance(from_file, dict):
        raise ValueError(f"{config}: model_args must be a mapping of model-config fields, got {from_file!r}")
    check_overrides(entry.name, config_class, from_file, f"model_args key in {config}")
    check_overrides(entry.name, config_class, dict(flags.get("model_args") or {}), "--model-arg")


def summary(result: Any) -> str:
    from blockstate.training.metrics import format_seconds

    lines = [f"done: {result.step} steps, {result.tokens:,} tokens in {format_seconds(result.train_seconds)} of "
             "training" + (f", final train loss {result.train_loss:.4f}" if result.train_loss is not None else "")]
    if result.validation is not None:
        v = result.validation
        lines.append(f"validation: {v.bpb:.4f} bits/byte, loss {v.loss:.4f} ({v.tokens:,} tokens)")
    if result.test is not None:
        t = result.test
        lines.append(f"test: {t.bpb:.4f} bits/byte, ppl {t.ppl:.3f} ({t.tokens:,} tokens, L={t.length})")
    if getattr(result, "skipped_steps", 0):
        lines.append(f"skipped: {result.skipped_steps} optimiser step(s) with a non-finite loss or gradient (see "
                     "'skip' lines in metrics.jsonl)")
    lines.append(f"checkpoint: {result.checkpoint}")
    lines += [f"plot: {p}" for p in result.plots]
    lines.append(f"metrics: {result.run_dir / 'metrics.jsonl'}; results: {result.run_dir / 'results.json'}")
    if result.sample is not None:
        lines += ["sample:", "-" * 60, result.sample, "-" * 60]
    return "\n".join(lines)
