"""``blockstate models`` (alias ``blockstate presets``): every registered model with its parameters per size."""

from __future__ import annotations

import argparse
import json

from blockstate.cli.formatting import DefaultsFormatter

DESCRIPTION = ("List every registered model (BST variants and the baselines) with its parameter count at each size, "
               "the ratio to the reference model and the paper's figure; any name here is a valid --model of "
               "blockstate train.")


def add_table_parser(sub: argparse._SubParsersAction, name: str, help: str,
                     description: str) -> argparse.ArgumentParser:
    """The parser of the table command; ``blockstate presets`` adds the same one under its own name."""
    p = sub.add_parser(name, help=help, description=description, formatter_class=DefaultsFormatter)
    p.add_argument("--size", action="append", help="only these sizes (repeatable); default: all")
    p.add_argument("--model", action="append", help="only these models (repeatable); default: all")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def register(sub: argparse._SubParsersAction, name: str) -> None:
    p = add_table_parser(sub, name, "list every registered model with its parameter count per size", DESCRIPTION)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from blockstate.registry import REFERENCE_MODEL, parameter_table

    rows = parameter_table(args.model, args.size)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    sizes = list(rows[0]["parameters"]) if rows else []
    head = "".join(f"{s:>13} {'ratio':>6}" for s in sizes)
    print(f"{'model':20} {'carry':5}{head} {'paper':>7}   (ratio: parameters / {REFERENCE_MODEL} at that size)")
    for r in rows:
        cells = "".join(f"{r['parameters'][s]:>13,} {r['ratio'][s]:>6.3f}" for s in sizes)
        paper = f"{r['paper'] / 1e6:.0f}M" if r["paper"] else ""
        print(f"{r['name']:20} {'yes' if r['carries_state'] else '':5}{cells} {paper:>7}")
    return 0
