"""``blockstate lm-eval ARGS...``: lm-eval-harness's own command line with blockstate models registered.

Everything after ``lm-eval`` goes to lm-eval unchanged (``run`` is implied, as with ``lm-eval`` itself), e.g.::

    blockstate lm-eval --model blockstate --model_args pretrained=runs/RUN --tasks hellaswag --batch_size 8
    blockstate lm-eval run --help          # lm-eval's own options
    blockstate lm-eval ls tasks

Needs the ``eval`` extra (``pip install -e '.[eval]'``). See ``blockstate.evaluation.lm_eval``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

HELP = ("run lm-eval-harness with blockstate models registered (--model blockstate --model_args "
        "pretrained=RUN_DIR); every argument after lm-eval is lm-eval's")


class PassThroughParser(argparse.ArgumentParser):
    """Takes every word after the subcommand as lm-eval's, flags included (argparse would try to read
    ``--model`` itself). Only a leading ``-h``/``--help`` is this parser's, and ``--debug`` stays blockstate's."""

    def parse_known_args(self, args: list[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        args = list(sys.argv[1:] if args is None else args)
        if not args or args[0] in ("-h", "--help"):
            return super().parse_known_args(args, namespace)
        namespace, _ = super().parse_known_args([], namespace)
        if "--debug" in args:
            namespace.debug = True
        namespace.lm_eval_args = [a for a in args if a != "--debug"]
        return namespace, []


def register(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help=HELP, description=HELP + ". lm-eval's options: blockstate lm-eval run --help. "
                       "Example: blockstate lm-eval --model blockstate --model_args pretrained=runs/RUN "
                       "--tasks TASK --batch_size 8 (needs pip install -e '.[eval]').")
    p.__class__ = type("PassThrough" + type(p).__name__, (PassThroughParser, type(p)), {})
    p.add_argument("lm_eval_args", nargs="*", metavar="ARGS", help="lm-eval's arguments")
    p.set_defaults(run=run, lm_eval_args=[])


def run(args: argparse.Namespace) -> int:
    try:
        from lm_eval._cli import HarnessCLI
        from lm_eval.utils import setup_logging
    except ImportError as exc:
        raise ValueError(f"lm-eval is not installed ({exc}): pip install -e '.[eval]' (or 'lm-eval>=0.4,<0.5')") \
            from None
    import blockstate  # noqa: F401 - registers the Auto classes, so --model hf loads blockstate models too
    from blockstate.evaluation.lm_eval import register as register_model

    register_model()
    setup_logging()
    cli = HarnessCLI()  # what lm-eval's own entry point (lm_eval.__main__.cli_evaluate) runs
    for parser in _parsers(cli._parser):
        parser.error = _one_line_error  # a usage error is one line with code 2, as for every blockstate command
    argv = sys.argv
    sys.argv = ["lm-eval", *args.lm_eval_args]  # lm-eval's parser reads sys.argv
    try:
        cli.execute(cli.parse_args())
    except SystemExit as exc:  # lm-eval's --help
        return _code(exc.code)
    finally:
        sys.argv = argv
    return 0


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                out += _parsers(child)
    return out


def _one_line_error(message: str) -> NoReturn:
    raise ValueError(f"{message} (see blockstate lm-eval run --help)")


def _code(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
