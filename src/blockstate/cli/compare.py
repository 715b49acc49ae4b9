"""``blockstate compare``: train every chosen model on the same corpus with the same token budget, evaluate each at
1x, 4x and 16x its training length, and write the paper's Table 1 layout (perplexity and bits per byte per
corpus, training time) as markdown + JSON, and the length-generalisation plot (bits per byte vs evaluation length).

Rerun the same command after an interruption: finished models are skipped, an interrupted one resumes from its
last checkpoint. Quality depends only on the token budget (never on timing); wall times are as noisy as the
machine.

Budgets:
  CPU (2 cores), the default: --size tiny --tokens 1M on python-stdlib, evaluated on the first 12 of the 26 test
  documents (--eval-tokens 262144; 0 = the whole split, twice the evaluation time): about 35 minutes for the 10
  default models on a quiet machine (training ~25 min, evaluation ~9 min), about an hour when the cores are
  shared. Start it with OMP_WAIT_POLICY=PASSIVE on a shared machine (spinning OpenMP threads slow small models
  down many times).
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
    from blockstate.benchmarks.compare import DEFAULT_EVAL_TOKENS, DEFAULT_LENGTHS, DEFAULT_MODELS, DEFAULT_TOKENS

    p = sub.add_parser(name, help="train and evaluate several models like for like (the paper's Table 1 layout)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="comma-separated registered names (blockstate models), or all (default: %(default)s)")
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
    from blockstate.benchmarks.train import parse_models
    from blockstate.evaluation import parse_lengths
    from blockstate.models import SIZES

    models = parse_models(args.models)  # ValueError naming the known models
    corpora = list(dict.fromkeys(c.strip() for c in args.corpora.split(",") if c.strip()))
    if not corpora:
        raise ValueError("--corpora is empty: e.g. --corpora python-stdlib,shakespeare")
    if args.size not in SIZES:
        raise ValueError(f"--size must be one of {', '.join(SIZES)}, got {args.size!r}")
    for flag in ("batch_size", "save_every", "threads", "seq_len"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if args.seq_len is not None and args.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {args.seq_len}")
    if args.eval_tokens < 0:
        raise ValueError(f"--eval-tokens must be >= 0 (0 = the whole split), got {args.eval_tokens}")
    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    parse_lengths(args.lengths, args.seq_len or 512)  # the syntax; multiples resolve per model later
    if args.split not in ("train", "validation", "test"):
        raise ValueError(f"--split must be train, validation or test, got {args.split!r}")
    return CompareSettings(models=models, corpora=corpora, size=args.size, tokens=args.tokens, seq_len=args.seq_len,
                           model_args=dict(args.model_args),
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed, tokenizer=args.tokenizer,
                           precision=args.precision, device=args.device, lengths=args.lengths,
                           eval_tokens=args.eval_tokens, split=args.split, save_every=args.save_every, runs=args.runs,
                           out=args.out, threads=args.threads, cache_dir=args.cache_dir,
                           progress=not args.no_progress, overwrite=args.overwrite, command=command_line(args))


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
