"""``--cpu-malloc keep`` (``runtime.device.keep_freed_memory``): a large block comes from malloc's heap, not its
own mapping, and stays there once freed, for the next step to reuse without page faults. Read off glibc's own
accounting (``mallinfo2``) in a fresh process for each policy, since the setting is process-wide."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

SCRIPT = r"""
import ctypes, sys
import torch
from blockstate.runtime.device import keep_freed_memory

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
if sys.argv[1] == "keep":
    assert keep_freed_memory() is True
size = 64 << 20
x = torch.ones(size, dtype=torch.uint8)  # a training step's large temporary
mapped = libc.mallinfo2().hblkhd >= size  # in a mapping of its own
del x
kept = libc.mallinfo2().fordblks >= size  # freed, and still held by malloc for reuse
print(mapped, kept)
"""


def _glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL(None), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc(), reason="glibc only")
@pytest.mark.parametrize("policy,expected", [("system", "True False"), ("keep", "False True")])
def test_keep_freed_memory_keeps_large_blocks_for_reuse(policy, expected):
    out = subprocess.run([sys.executable, "-c", SCRIPT, policy], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == expected.split()
