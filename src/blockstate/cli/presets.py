"""``blockstate presets``: parameter count of every preset size x variant x kernel."""

from __future__ import annotations

import argparse
import json

from blockstate.cli.formatting import DefaultsFormatter


def register(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="list model presets with their parameter counts",
                       description="List the parameter count of every preset size x BST variant x kernel.",
                       formatter_class=DefaultsFormatter)
    p.add_argument("--size", action="append", help="only these sizes (repeatable); default: all")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from blockstate.models import parameter_table

    rows = parameter_table(args.size)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'size':6} {'variant':7} {'kernel':12} {'params':>12} {'paper':>8} {'ratio':>6}")
    for r in rows:
        paper = f"{r['paper'] / 1e6:.0f}M" if r["paper"] else ""
        ratio = f"{r['ratio']:.3f}" if r["ratio"] else ""
        print(f"{r['size']:6} {r['variant']:7} {r['kernel']:12} {r['parameters']:>12,} {paper:>8} {ratio:>6}")
    return 0
