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
    from blockstate.training.config import DEFAULT_TOKENS

    p = sub.add_parser(name, help=f"train a language model (default: tiny BST on python-stdlib, "
                                  f"{DEFAULT_TOKENS / 1e6:g}M tokens)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML/JSON file of settings (flags override it)")
    p.add_argument("--resume", nargs="?", const=True, metavar="DIR",
                   help="continue a run: its run directory or a checkpoint (default: --output)")
    p.add_argument("--overwrite", action="store_true", help="start again in an --output that holds a run")
    p.add_argument("-v", "--verbose", action="store_true", help="log data loading details")
    add_setting_flags(p)
    p.set_defaults(run=run)


# the command-line parser of each TrainConfig kind (blockstate.training.config.KINDS); None: the text as given
KIND_TYPES = {"int": int, "int0": int, "seed": int, "float": float, "float0": float, "fraction": float}
PARSERS = {"count": _count, "model_arg": _model_arg}


def add_setting_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, from its declaration (``blockstate.training.config.setting``), in argument
    groups by the field's group. ``default=S``: only the flags given override a --config file."""
    import dataclasses

    from blockstate.registry import list_models
    from blockstate.training.config import GROUPS, TrainConfig

    groups = {title: p.add_argument_group(title) for title in GROUPS}
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        kwargs: dict[str, Any] = {"default": S}
        if meta["help"] is not None:  # the model names come from the registry
            kwargs["help"] = meta["help"].replace("{models}", ", ".join(list_models()))
        if meta["metavar"] is not None:
            kwargs["metavar"] = meta["metavar"]
        if meta["kind"] == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif meta["kind"] == "choice":
            kwargs["choices"] = meta["choices"]
        elif meta["parse"] is not None or meta["kind"] in KIND_TYPES:
            kwargs["type"] = PARSERS[meta["parse"]] if meta["parse"] else KIND_TYPES[meta["kind"]]
        if meta["parse"] == "model_arg":  # --model-arg K=V, repeatable, into model_args
            flag, kwargs["dest"], kwargs["action"] = "--model-arg", f.name, "append"
        else:
            flag = "--" + f.name.replace("_", "-")
        groups[meta["group"]].add_argument(flag, **kwargs)


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
