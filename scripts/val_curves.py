"""Validation bits per byte against training tokens for several runs, side by side: a table, JSON and a PNG.

    python scripts/val_curves.py NAME=RUN_DIR ... --out DIR [--title TEXT]

Reads each run's ``metrics.jsonl`` (the ``eval`` records ``blockstate train --eval-every N`` writes) and its
``run.json`` / ``train_config.json`` for the learning rate, and writes ``DIR/val-curves.{md,json,png}``. Used for
the long-budget comparison on books in the README; every run should share data, validation tokens and schedule.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path


def read_curve(run_dir: Path) -> dict:
    """The run's validation points [(step, tokens, bits/byte)] and its learning rate."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise SystemExit(f"error: {metrics} not found: pass the run directory of a blockstate train run")
    points = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("kind") == "eval":
            points.append({"step": record["step"], "tokens": record["tokens"], "bpb": record["val_bpb"]})
    config = {}  # the finished run's results.json, else the latest checkpoint's train_config.json
    candidates = [run_dir / "results.json", *sorted(run_dir.glob("checkpoints/*/train_config.json"), reverse=True)]
    for path in candidates:
        if path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
            config = config.get("config", config)
            break
    return {"run_dir": str(run_dir), "lr": config.get("lr"), "model": config.get("model"), "points": points}


def markdown(curves: dict[str, dict]) -> str:
    steps = sorted({p["step"] for c in curves.values() for p in c["points"]})
    head = "| step | tokens | " + " | ".join(f"{n} (lr {c['lr']})" for n, c in curves.items()) + " |"
    lines = [head, "|" + "---|" * (len(curves) + 2)]
    for step in steps:
        cells, tokens = [], ""
        for c in curves.values():
            hit = [p for p in c["points"] if p["step"] == step]
            cells.append(f"{hit[0]['bpb']:.4f}" if hit else "-")
            tokens = tokens or (f"{hit[0]['tokens']:,}" if hit else "")
        best = min((float(x) for x in cells if x != "-"), default=None)
        cells = [f"**{x}**" if x != "-" and float(x) == best else x for x in cells]
        lines.append(f"| {step} | {tokens} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in curves.items():
        ax.plot([p["tokens"] / 1e6 for p in c["points"]], [p["bpb"] for p in c["points"]], marker="o",
                linestyle="-" if name.startswith("bst") else "--", label=f"{name} (lr {c['lr']})")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=RUN_DIR")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--title", default="validation bits per byte during training")
    args = parser.parse_args(argv)
    curves = {}
    for spec in args.runs:
        name, sep, run = spec.partition("=")
        if not sep:
            parser.error(f"expected NAME=RUN_DIR, got {spec!r}")
        curves[name] = read_curve(Path(run))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "val-curves.json").write_text(json.dumps({"title": args.title, "curves": curves}, indent=1) + "\n")
    (args.out / "val-curves.md").write_text(markdown(curves), encoding="utf-8")
    plot(curves, args.out / "val-curves.png", args.title)
    print(markdown(curves))
    return 0


if __name__ == "__main__":
    sys.exit(main())
