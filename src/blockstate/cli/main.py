"""The ``blockstate`` command line: one subcommand per module in this package, each with ``register()``.

Errors the user can fix (ValueError, FileNotFoundError, ...) print one line and exit with code 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module (in blockstate.cli) defining register(subparsers) and run(args)
SUBCOMMANDS = {
    "presets": "blockstate.cli.presets",
    "demo": "blockstate.cli.demo",
    "bench": "blockstate.cli.bench",
    "train": "blockstate.cli.train",
    "eval": "blockstate.cli.eval",
    "generate": "blockstate.cli.generate",
    "models": "blockstate.cli.models",
}

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, KeyError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blockstate", description="Block-State Transformer language models")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in SUBCOMMANDS.items():
        importlib.import_module(module).register(sub, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"blockstate {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
