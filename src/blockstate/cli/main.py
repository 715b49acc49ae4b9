"""The ``blockstate`` command line: one subcommand per module in this package, each with ``register()``.

Errors never show a traceback unless ``--debug`` is given (before or after the subcommand):

* a wrong flag or a bad value (``--steps ten``, ``--size huge``, a missing path, a damaged checkpoint, a full
  disk...): one line ``blockstate <command>: error: ...`` on stderr, exit code 2;
* anything unexpected (a bug): one line naming the exception and asking for ``--debug``, exit code 1;
* ``blockstate train`` stopped by SIGINT / SIGTERM saves a checkpoint first and exits with 130 / 143
  (resume with ``blockstate train --resume RUN``); Ctrl-C elsewhere: exit code 130;
* stdout closed by its reader (``blockstate generate ... | head``): silent, exit code 141.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any, NoReturn

from blockstate.quiet_interrupts import INTERRUPTED

# subcommand name -> module (in blockstate.cli) defining register(subparsers) and run(args)
SUBCOMMANDS = {
    "demo": "blockstate.cli.demo",
    "bench": "blockstate.cli.bench",
    "train": "blockstate.cli.train",
    "eval": "blockstate.cli.eval",
    "generate": "blockstate.cli.generate",
    "models": "blockstate.cli.models",
    "presets": "blockstate.cli.presets",  # an alias of models
    "compare": "blockstate.cli.compare",
    "ablate": "blockstate.cli.ablate",
    "synthetic": "blockstate.cli.synthetic",
    "lm-eval": "blockstate.cli.lm_eval",
}

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, KeyError, OSError)
EXIT_USAGE = 2  # bad flags, values or inputs (argparse's code for usage errors)
EXIT_BUG = 1  # an unexpected exception


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage of ``blockstate train`` is dozens of lines, which would bury
    the one line that matters. Subparsers inherit the class (argparse uses ``type(parent)``).

    Abbreviated flags are refused (``--step`` is not ``--steps``): a flag added later must never change what
    an existing command line means; the error suggests the closest flag instead."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="blockstate", description="Block-State Transformer language models")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in SUBCOMMANDS.items():
        try:
            importlib.import_module(module).register(sub, name)
        except ImportError as exc:  # a broken or optional subcommand must not take the others down
            _unavailable(sub, name, exc)
    for child in iter_parsers(parser)[1:]:  # `blockstate train ... --debug` works too
        if "--debug" not in child._option_string_actions:
            child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                               help="show full tracebacks on errors")
    return parser


def _unavailable(sub: argparse._SubParsersAction, name: str, exc: ImportError) -> None:
    """Keep ``name`` listed; running it reports the import error in one line (``--debug``: the traceback)."""
    parser = sub.choices.get(name) or sub.add_parser(name, help=f"(unavailable: {exc})")

    def run(args: argparse.Namespace) -> int:
        raise exc

    parser.set_defaults(run=run)


def iter_parsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[argparse.ArgumentParser]:
    """``parser`` and every (nested) subcommand parser below it, depth first."""
    out = [parser]
    for path, child in subcommand_paths(parser, prefix):
        if len(path) == len(prefix) + 1:
            out += iter_parsers(child, path)
    return out


def subcommand_paths(parser: argparse.ArgumentParser,
                     prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every subcommand below ``parser`` as (argv words, parser), e.g. ``(("bench", "generate"), p)``; aliases
    are listed once. Tests iterate over it, so a new subcommand is covered without editing them."""
    out: list[tuple[tuple[str, ...], argparse.ArgumentParser]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for name, child in action.choices.items():
                if id(child) in seen:
                    continue
                seen.add(id(child))
                out.append(((*prefix, name), child))
                out += subcommand_paths(child, (*prefix, name))
    return out


def chosen_parser(parser: argparse.ArgumentParser,
                  args: argparse.Namespace) -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser of the (nested) subcommand ``args`` came from, and its words (``["bench", "generate"]``)."""
    path: list[str] = []
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(args, sub.dest, None) if sub is not None else None
        if sub is None or name not in sub.choices:
            return parser, path
        path.append(name)
        parser = sub.choices[name]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())  # a multi-line message from a library still prints as one line
    return text[:1000] + ("..." if len(text) > 1000 else "")


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's final flush does not raise again (Python docs' recipe)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured output)
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (``--help`` returns 0, usage errors 2, Ctrl-C 130)."""
    try:
        parser = build_parser()  # imports every subcommand's module: Ctrl-C here is one line too
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    try:
        args, extra = parser.parse_known_args(argv)
        leaf, path = chosen_parser(parser, args)
        if extra:  # reported by the subcommand that was given, with the closest known flag
            import difflib

            known = [o for o in leaf._option_string_actions if o.startswith("--")]
            close = difflib.get_close_matches(extra[0].split("=")[0], known, n=1)
            leaf.error(f"unrecognized arguments: {' '.join(extra)}" + (f" (did you mean {close[0]}?)" if close
                                                                        else ""))
    except SystemExit as exc:  # --help, or a usage error already printed in one line
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    command = " ".join(path)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except BrokenPipeError:  # `blockstate generate ... | head`: the reader left; not an error worth a line
        _silence_stdout()
        return 141
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"blockstate {command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - a bug: still no traceback unless asked for
        if args.debug:
            raise
        print(f"blockstate {command}: internal error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug "
              "for the traceback, and please report it)", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
