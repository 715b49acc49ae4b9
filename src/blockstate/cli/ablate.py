"""``blockstate ablate``: BST's knobs one at a time at equal parameters and tokens, scored on the validation split.

Default (CPU, 2 cores): --corpus books --seq-len 1024 --batch-size 8 --tokens 1M, the tiny size, every arm below;
about 3 minutes per arm on 2 quiet cores. Rerun the same command after an interruption: finished arms are skipped.
Results: benchmarks/results/ablation-<corpus>/ablation.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from blockstate.cli.train import _count, _model_arg


def register(sub: argparse._SubParsersAction, name: str) -> None:
    from blockstate.benchmarks.ablation import __doc__ as arms_doc

    p = sub.add_parser(name, help="BST's knobs one at a time at equal parameters (validation bits/byte table)",
                       description=__doc__ + "\nArms (" + arms_doc.split("Arms (", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default="all", help="comma-separated arm names, or all (default all)")
    p.add_argument("--corpus", default="books", help="one corpus (default %(default)s)")
    p.add_argument("--size", default="tiny", help="size preset: tiny, small, paper (default tiny)")
    p.add_argument("--tokens", type=_count, default=1_000_000, help="training tokens per arm (default 1M)")
    p.add_argument("--seq-len", type=int, default=1024, help="training length L (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="segments per step (default %(default)s)")
    p.add_argument("--model-arg", dest="model_args", action="append", type=_model_arg, default=[], metavar="K=V",
                   help="override a config field of the reference and every arm (repeatable)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: blockstate train's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and data order (default 0)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--lengths", default="1x", help="evaluation lengths (default %(default)s)")
    p.add_argument("--eval-tokens", type=int, default=262144,
                   help="score the first documents of the validation split up to this many tokens, 0 = all "
                        "(default %(default)s)")
    p.add_argument("--runs", type=Path, default=Path("runs/ablation"), help="run directories (default %(default)s)")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for ablation.{md,json} (default benchmarks/results/ablation-<corpus>)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--list", action="store_true", help="print every arm's model, overrides and parameters, then exit")
    p.add_argument("--overwrite", action="store_true", help="retrain every chosen arm from scratch")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for log files)")
    p.set_defaults(run=run)


def chosen_arms(text: str, num_layers: int) -> list:
    from blockstate.benchmarks.ablation import default_arms

    arms = default_arms(num_layers)
    if text.strip().lower() == "all":
        return arms
    known = {a.name: a for a in arms}
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"--arms: unknown arm(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}")
    return [known[n] for n in names]


def run(args: argparse.Namespace) -> int:
    from blockstate.benchmarks import ablation
    from blockstate.benchmarks.compare_settings import CompareSettings
    from blockstate.cli.train import _setup_logging
    from blockstate.data.common import slug
    from blockstate.evaluation import parse_lengths
    from blockstate.registry import model_config

    for flag in ("batch_size", "seq_len", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if args.eval_tokens < 0:
        raise ValueError(f"--eval-tokens must be >= 0 (0 = the whole split), got {args.eval_tokens}")
    parse_lengths(args.lengths, args.seq_len)
    arms = chosen_arms(args.arms, model_config("bst-sh-s4", args.size).num_hidden_layers)
    if args.list:
        for row in ablation.plan(args.size, arms, dict(args.model_args)):
            print(f"{row['arm']:<20} {row['model']:<20} {row['parameters']:>11,} ({row['parameter_ratio']:.3f}x) "
                  f"{row['model_args'] or ''} {row['train_args'] or ''}")
        return 0
    _setup_logging(False)
    s = CompareSettings(models=["bst-sh-s4"], corpora=[args.corpus], size=args.size, tokens=args.tokens,
                        seq_len=args.seq_len, model_args=dict(args.model_args), batch_size=args.batch_size,
                        lr=args.lr, seed=args.seed,
                        precision=args.precision, device=args.device, lengths=args.lengths,
                        eval_tokens=args.eval_tokens, split="validation", runs=args.runs,
                        out=args.out or Path("benchmarks/results") / f"ablation-{slug(args.corpus)}",
                        threads=args.threads, progress=not args.no_progress, overwrite=args.overwrite,
                        command="blockstate ablate " + " ".join(_flags(args)))
    s = dataclasses.replace(s, lane_span=0)  # every arm is stateless: shuffled segments
    return 130 if ablation.run(s, arms) is None else 0


def _flags(args: argparse.Namespace) -> list[str]:
    skip = {"run", "command", "overwrite", "list", "no_progress", "debug"}
    words = []
    for key, value in vars(args).items():
        if key == "model_args":
            words += [f"--model-arg {k}={v}" for k, v in value]
        elif key not in skip and value is not None:
            words.append(f"--{key.replace('_', '-')} {value}")
    return words
