"""Robust discovery and reading of corpus files.

Every file that is looked at ends up either as a document or in a :class:`ReadStats` counter (binary, empty,
unreadable, symlink loop, bad JSONL record, ignored): nothing is dropped silently.  Binary = a NUL byte (the
heuristic of git and grep); UTF-16 text therefore counts as binary.  Text that is not UTF-8 is kept as raw
bytes (the bytes tokenizer models it as is; text tokenizers decode it with replacement, see ``tokenized.py``).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .common import ReadStats, logger

SNIFF_BYTES = 8192


@dataclasses.dataclass(frozen=True, slots=True)
class DocRef:
    """Where one document lives. ``key`` is what the hash split and error messages use."""

    key: str  # posix relative path; "path#line" for a JSONL record; "split/row" for a datasets row
    size: int  # bytes on disk (file, or JSONL line): used to balance the hash split
    path: str = ""  # absolute path of the file ("" for a datasets row)
    offset: int = -1  # byte offset of a JSONL line; -1 = the whole file is the document
    length: int = 0  # byte length of the JSONL line
    index: int = -1  # datasets row index


@dataclasses.dataclass(frozen=True, slots=True)
class FileEntry:
    rel: str
    path: str
    size: int
    mtime_ns: int


def _read_bytes(path: str, limit: int = -1) -> bytes:
    """The one place files are opened (tests patch it to simulate unreadable files when running as root)."""
    with open(path, "rb") as f:
        return f.read(limit)


def _classify_os_error(e: OSError) -> str:
    return "symlink_loop" if e.errno == errno.ELOOP else "unreadable"


def probe_file(path: str) -> tuple[str, os.stat_result | None]:
    """Cheap check of one candidate file: ("ok", stat) or (reason, None) with reason a ReadStats field."""
    try:
        st = os.stat(path)
    except OSError as e:
        return _classify_os_error(e), None
    if not stat.S_ISREG(st.st_mode):
        return "unreadable", None  # fifo, socket, device: never open those (a fifo would block)
    if st.st_size == 0:
        return "empty", None
    try:
        head = _read_bytes(path, SNIFF_BYTES)
    except OSError as e:
        return _classify_os_error(e), None
    if not head:
        return "empty", None
    if b"\0" in head:
        return "binary", None
    return "ok", st


def walk_files(root: Path, stats: ReadStats,
               prune: Callable[[str], bool] = lambda name: False) -> Iterator[Path]:
    """All files under ``root`` in a deterministic (sorted) order, following directory symlinks once.

    A directory reached twice (a symlink loop, or two links to one directory) is counted as ``symlink_loop``
    and not descended again. ``prune(dirname)`` drops whole directories (e.g. site-packages).
    """
    visited: set[tuple[int, int]] = set()

    def onerror(e: OSError) -> None:
        setattr(stats, _classify_os_error(e), getattr(stats, _classify_os_error(e)) + 1)

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=onerror):
        try:
            st = os.stat(dirpath)
        except OSError as e:
            onerror(e)
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in visited:
            stats.symlink_loop += 1
            dirnames[:] = []
            continue
        visited.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not prune(d))
        for name in sorted(filenames):
            yield Path(dirpath) / name


def probe_files(candidates: Iterable[tuple[str, Path]], stats: ReadStats) -> list[FileEntry]:
    """Probe ``(relative posix path, path)`` pairs; keep the usable ones, count the others."""
    out = []
    for rel, path in candidates:
        reason, st = probe_file(str(path))
        if st is None:
            setattr(stats, reason, getattr(stats, reason) + 1)
            logger.debug("skipping %s: %s", path, reason)
            continue
        out.append(FileEntry(rel, str(path), st.st_size, st.st_mtime_ns))
    return out


@dataclasses.dataclass
class FieldReport:
    """What the JSONL records without a string text field held instead: every key seen (``seen``) and the keys
    with a string value (``text_like``, the candidates for ``--text-field``), counted over whole files."""

    seen: Counter[str] = dataclasses.field(default_factory=Counter)
    text_like: Counter[str] = dataclasses.field(default_factory=Counter)

    def hint(self, field: str) -> str:
        """``records have no string field 'text' (fields found: body, id): pass --text-field body``, or ""."""
        if not self.seen:
            return ""
        names = ", ".join(k for k, _ in self.seen.most_common(12))
        fix = (f"pass --text-field {self.text_like.most_common(1)[0][0]}" if self.text_like else
               "pass --text-field NAME with the field that holds the text")
        return f"records have no string field {field!r} (fields found: {names}): {fix}"


def _record_ok(line: bytes, field: str, report: FieldReport | None) -> bool:
    """Whether a JSONL line is an object with a string ``field`` (invalid UTF-8 is counted later, when read)."""
    try:
        obj = json.loads(line.decode("utf-8", errors="replace"))
    except json.JSONDecodeError:
        return False
    if isinstance(obj, dict) and isinstance(obj.get(field), str):
        return True
    if isinstance(obj, dict) and report is not None:
        report.seen.update(str(k) for k in obj)
        report.text_like.update(str(k) for k, v in obj.items() if isinstance(v, str))
    return False


def index_jsonl(entry: FileEntry, stats: ReadStats, text_field: str = "text",
                report: FieldReport | None = None) -> list[DocRef]:
    """One DocRef per record of a JSONL file with a string ``text_field``. The other non-blank lines are counted
    as ``bad_records`` here, once over the whole file (not per split, as when they were found only when read),
    and what they held instead goes to ``report``."""
    refs = []
    try:
        data = _read_bytes(entry.path)
    except OSError as e:
        setattr(stats, _classify_os_error(e), getattr(stats, _classify_os_error(e)) + 1)
        return refs
    offset = 0
    for lineno, line in enumerate(data.splitlines(keepends=True), start=1):
        if line.strip():
            if _record_ok(line, text_field, report):
                refs.append(DocRef(f"{entry.rel}#{lineno}", len(line), entry.path, offset, len(line)))
            else:
                stats.bad_records += 1
        offset += len(line)
    return refs


def _record_text(line: bytes, field: str, stats: ReadStats, where: str) -> bytes | None:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8 += 1
        stats.replaced += 1
        text = line.decode("utf-8", errors="replace")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        stats.bad_records += 1
        logger.debug("%s: not JSON (%s)", where, e)
        return None
    value = obj.get(field) if isinstance(obj, dict) else None
    if not isinstance(value, str):
        stats.bad_records += 1
        logger.debug("%s: no string field %r", where, field)
        return None
    return value.encode("utf-8", errors="replace")  # lone surrogates from JSON escapes become "?"


def read_documents(refs: list[DocRef], stats: ReadStats,
                   text_field: str = "text") -> Iterator[tuple[DocRef, bytes]]:
    """Yield ``(ref, raw bytes)`` for file / JSONL refs, counting (and skipping) what cannot be used."""
    cache_path, cache_data = "", b""
    for ref in refs:
        if ref.offset < 0:
            try:
                data = _read_bytes(ref.path)
            except OSError as e:
                setattr(stats, _classify_os_error(e), getattr(stats, _classify_os_error(e)) + 1)
                continue
            if b"\0" in data:
                stats.binary += 1
                continue
        else:
            if ref.path != cache_path:  # refs of one JSONL file are consecutive: read it once
                try:
                    cache_path, cache_data = ref.path, _read_bytes(ref.path)
                except OSError as e:
                    cache_path, cache_data = ref.path, b""
                    setattr(stats, _classify_os_error(e), getattr(stats, _classify_os_error(e)) + 1)
            line = cache_data[ref.offset:ref.offset + ref.length]
            if not line:
                continue
            data = _record_text(line, text_field, stats, ref.key)
            if data is None:
                continue
        if not data:
            stats.empty += 1
            continue
        if ref.offset < 0:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                stats.invalid_utf8 += 1
        stats.documents += 1
        yield ref, data
