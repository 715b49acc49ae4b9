"""The ``--help`` layout of the subcommands that show their defaults."""

from __future__ import annotations

import argparse


class DefaultsFormatter(argparse.HelpFormatter):
    """``(default: X)`` after every flag that has a default; flags that are off or empty by default show nothing
    (argparse's ``ArgumentDefaultsHelpFormatter`` would print ``(default: None)``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, "", False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


class RawDefaultsFormatter(argparse.RawDescriptionHelpFormatter, DefaultsFormatter):
    """The same, with the description (a module docstring) kept as written."""
