"""``blockstate synthetic``: train every chosen model on synthetic recall tasks and tabulate what it recalls.

Tasks (generated offline from the seed; ``blockstate.data.synthetic``):
  mqar       multi-query associative recall (Zoology): key-value pairs, then queries at power-law gaps;
             accuracy over the queried values, also by the distance back to the value in blocks
  passkey    a passkey in repeated filler text, asked for at the end (Landmark Attention); accuracy by how many
             blocks back it sits, at the training length and at a longer one
  copy       selective copying (Mamba);  induction  induction-head copying;  listops  LRA ListOps (500-2000 tokens)

Every model of a task gets the same vocabulary, width, depth, heads, W and training length, each baseline's
FFN / GSS width solved to BST:SH:S4's parameter count (the table shows the counts), the same batches, steps and
recipe. Rerunning the same command skips finished (task, model) pairs (``<out>/pairs/``).

Default: bst-sh-s4, bst-mf-s4, bst-sh-unstructured, slide, gpt, brect and gss-hybrid on mqar (L = 256, 16 pairs,
200 steps) and passkey (one digit, training length 320 = 20 blocks of W = 16, so 16 blocks back is inside
training and 64 blocks is tested at 1040 tokens; 400 steps); D = 64, 2 layers; about 20 minutes on 2 CPU cores
shared with other jobs. Start it with OMP_WAIT_POLICY=PASSIVE on a shared machine. That budget is enough for
full attention to learn the passkey, not for any model to learn MQAR (Zoology trains 64 epochs of 100k rows): on
a GPU, e.g. --device cuda --steps 20000 --batch-size 64, and --size small for the registry's small widths.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path
from typing import Any

from blockstate.cli.train import _model_arg


def _task_arg(text: str) -> tuple[str | None, str, Any]:
    """``[TASK.]KEY=VALUE`` -> (task or None, key, value); the value is JSON where it parses."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--task-arg {text!r}: use [TASK.]KEY=VALUE, e.g. --task-arg passkey.digits=3")
    key, value = text.split("=", 1)
    task, _, key = key.strip().rpartition(".")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return task or None, key, parsed


def register(sub: argparse._SubParsersAction, name: str) -> None:
    from blockstate.benchmarks.synthetic import DEFAULT_BLOCK_SIZE, DEFAULT_LR, DEFAULT_MODELS, DEFAULT_TASKS

    p = sub.add_parser(name, help="synthetic recall tasks (MQAR, passkey, ...): accuracy by model x distance",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default=",".join(DEFAULT_TASKS),
                   help="comma-separated tasks: mqar, passkey, copy, induction, listops, or all (default %(default)s)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="comma-separated registered names (blockstate models), or all (default %(default)s)")
    p.add_argument("--size", default="tiny", help="widths: tiny (D=64, 2 layers), small, paper (default tiny)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per pair (default: per task, mqar 200, passkey 400)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per step (default: per task)")
    p.add_argument("--test-examples", type=int, default=None, help="held-out rows per test set (default: per task)")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak learning rate (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the initialisation (default 0)")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help="W for every model (and the unit of passkey distances) (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=None, help="training length of every chosen task but listops")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary of mqar / copy / induction")
    p.add_argument("--kv-pairs", type=int, default=None, help="mqar key-value pairs per row (default 16)")
    p.add_argument("--distances", default=None, help="passkey distances in blocks, e.g. 1,2,4,8,16,64")
    p.add_argument("--task-arg", dest="task_args", action="append", type=_task_arg, default=[],
                   metavar="[TASK.]KEY=VALUE", help="any task option (repeatable), e.g. passkey.digits=3, "
                                                    "mqar.power_a=0.1, listops.max_length=1000")
    p.add_argument("--model-arg", dest="model_args", action="append", type=_model_arg, default=[], metavar="K=V",
                   help="a model-config field for every model (repeatable), e.g. hidden_size=128")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                   help="fp32 (default: the fastest at these widths on CPU), bf16 autocast, or auto")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: models this small run no faster on 2, measured)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/synthetic"),
                   help="directory for synthetic.{md,json,png} and pairs/ (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="retrain pairs saved with other settings")
    p.add_argument("--report", type=Path, default=None, metavar="FILE.json",
                   help="re-render a saved synthetic.json (markdown and PNG beside it); trains nothing")
    p.set_defaults(run=run)


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def task_options(args: argparse.Namespace, tasks: list[str]) -> dict[str, dict[str, Any]]:
    """Per-task options from the flags; a flag no chosen task takes is an error (it would silently do nothing)."""
    import dataclasses

    from blockstate.data.synthetic import TASKS

    fields = {t: {f.name for f in dataclasses.fields(TASKS[t])} for t in tasks}
    options: dict[str, dict[str, Any]] = {t: {} for t in tasks}

    def put(flag: str, key: str, value: Any, only: str | None = None) -> None:
        if only is not None and only in tasks and key not in fields[only]:
            raise ValueError(f"{flag}: {only} has no option {key!r}; its options are {', '.join(sorted(fields[only]))}")
        takers = [t for t in tasks if key in fields[t] and (only is None or t == only)]
        if not takers:
            who = [t for t in TASKS if key in {f.name for f in dataclasses.fields(TASKS[t])}]
            if not who:
                raise ValueError(f"{flag}: {key!r} is no task's option (blockstate synthetic --help lists the tasks)")
            raise ValueError(f"{flag} applies to {', '.join(who)}, none of which is in --task {','.join(tasks)}")
        for t in takers:
            options[t][key] = value

    if args.seq_len is not None:
        put("--seq-len", "seq_len", args.seq_len)
    if args.vocab_size is not None:
        put("--vocab-size", "vocab_size", args.vocab_size)
    if args.kv_pairs is not None:
        put("--kv-pairs", "num_kv_pairs", args.kv_pairs, "mqar")
    if args.distances is not None:
        try:
            distances = [int(x) for x in args.distances.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--distances must be comma-separated block counts, e.g. 1,2,4,16, got "
                             f"{args.distances!r}") from None
        put("--distances", "distances", distances, "passkey")
    for task, key, value in args.task_args:
        if task is not None and task not in TASKS:
            raise ValueError(f"--task-arg {task}.{key}: unknown task {task!r}, use one of {', '.join(TASKS)}")
        if task is not None and task not in tasks:
            raise ValueError(f"--task-arg {task}.{key}: {task} is not in --task {','.join(tasks)}")
        put(f"--task-arg {key}", key, value, task)
    return {t: o for t, o in options.items() if o}


def settings(args: argparse.Namespace):
    from blockstate.benchmarks.synthetic import SyntheticSettings
    from blockstate.benchmarks.synthetic_models import WIDTHS
    from blockstate.benchmarks.train import parse_models
    from blockstate.data.synthetic import task_names

    names = [t.strip().lower() for t in args.task.split(",") if t.strip()]
    if names == ["all"]:
        names = task_names()
    if not names:
        raise ValueError(f"--task is empty: name one or more of {', '.join(task_names())}")
    unknown = [t for t in names if t not in task_names()]
    if unknown:
        raise ValueError(f"--task: unknown task {unknown[0]!r}, use one of {', '.join(task_names())} or all")
    names = list(dict.fromkeys(names))
    models = parse_models(args.models)  # ValueError naming the known models
    if args.size not in WIDTHS:
        raise ValueError(f"--size must be one of {', '.join(WIDTHS)}, got {args.size!r}")
    _positive(args, "steps", "batch_size", "test_examples", "block_size", "threads")
    if not args.lr > 0:
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    return SyntheticSettings(tasks=names, task_options=task_options(args, names), models=models, size=args.size,
                             block_size=args.block_size, model_args=dict(args.model_args), steps=args.steps,
                             batch_size=args.batch_size, test_examples=args.test_examples, lr=args.lr,
                             seed=args.seed, precision=args.precision, device=args.device, threads=args.threads,
                             out=args.out, overwrite=args.overwrite, command=command_line(args))


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run: the flags that differ from the defaults, and the OpenMP wait policy
    (it changes CPU wall times several-fold on a shared machine)."""
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(), "synthetic")
    defaults = vars(parser.parse_args(["synthetic"]))
    words: list[str] = []
    for key, value in vars(args).items():
        if key not in defaults or key in ("run", "overwrite", "report") or value == defaults[key]:
            continue
        if key == "model_args":
            words += [w for k, v in value for w in ("--model-arg", f"{k}={json.dumps(v)}")]
        elif key == "task_args":
            words += [w for t, k, v in value for w in ("--task-arg", f"{t + '.' if t else ''}{k}={json.dumps(v)}")]
        else:
            words += [f"--{key.replace('_', '-')}", str(value)]
    env = f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} " if "OMP_WAIT_POLICY" in os.environ else ""
    return env + "blockstate synthetic" + "".join(f" {shlex.quote(w)}" for w in words)


def run(args: argparse.Namespace) -> int:
    from blockstate.benchmarks import synthetic, synthetic_report

    if args.report is not None:
        print(synthetic_report.render(args.report))
        return 0
    synthetic.run(settings(args))
    return 0
