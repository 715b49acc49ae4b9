"""Ctrl-C while torch and transformers load (seconds, before ``blockstate.cli.main.main`` runs): one line and
exit code 130 instead of a 51-line traceback.

``blockstate/__init__`` imports this module first (it needs nothing but ``os`` and ``sys``). The hook is installed
only when this process is the ``blockstate`` command: its entry point, or ``python -m blockstate``, whose
``sys.argv[0]`` is ``-m`` while the package is imported. The Python of a library user is left alone.
"""

from __future__ import annotations

import os
import sys
from typing import Any

INTERRUPTED = "blockstate: interrupted (Ctrl-C)"


def install() -> bool:
    """Install the hook when running as the ``blockstate`` command; returns whether it did."""
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0 != "-m" and os.path.basename(argv0) not in ("blockstate", "blockstate.exe"):
        return False
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if issubclass(kind, KeyboardInterrupt):
            print(INTERRUPTED, file=sys.stderr, flush=True)
            os._exit(130)  # nothing is open yet that an exit would have to close or save
        previous(kind, value, tb)

    sys.excepthook = hook
    return True


install()
