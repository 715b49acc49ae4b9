"""``blockstate presets``: an alias of ``blockstate models`` (the same flags, the same table).

It once listed the BST variants x kernels only; the registry's table covers those and the baselines. A module of
its own (not an argparse alias) so that its name shows in ``blockstate --help`` and errors name ``presets``."""

from __future__ import annotations

import argparse

from blockstate.cli.models import DESCRIPTION, add_table_parser, run


def register(sub: argparse._SubParsersAction, name: str) -> None:
    p = add_table_parser(sub, name, "alias of blockstate models (the same table)",
                         f"An alias of blockstate models, with the same output. {DESCRIPTION}")
    p.set_defaults(run=run)
