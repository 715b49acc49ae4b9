"""Hugging Face ``datasets`` corpora (optional: ``pip install datasets``, imported only when used)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .common import SPLIT_ALIASES, SPLITS, DataError, ReadStats, stable_hash
from .corpus import Corpus, hash_split
from .reading import DocRef


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("reading a Hugging Face dataset needs the datasets package: "
                        "pip install datasets") from None
    return datasets


def _sizes(ds: Any, field: str) -> list[int]:
    try:
        import pyarrow.compute as pc

        if getattr(ds, "_indices", None) is None:
            return pc.fill_null(pc.binary_length(ds.data.column(field)), 0).to_pylist()
    except Exception:  # pragma: no cover - older pyarrow / datasets internals: fall back to reading
        pass
    return [len(t.encode("utf-8")) if isinstance(t, str) else 0 for t in ds[field]]


def _reader(tables: dict[str, Any], field: str):
    def read(refs: list[DocRef], stats: ReadStats) -> Iterator[tuple[DocRef, bytes]]:
        by_table: dict[str, list[DocRef]] = {}
        for r in refs:
            by_table.setdefault(r.path, []).append(r)
        for name, rs in by_table.items():
            ds = tables[name].select_columns([field])
            rows = [r.index for r in rs]
            if rows != list(range(len(ds))):
                ds = ds.select(rows)
            i = 0
            for batch in ds.iter(batch_size=256):
                for text in batch[field]:
                    ref, i = rs[i], i + 1
                    if not isinstance(text, str):
                        stats.bad_records += 1
                    elif not text:
                        stats.empty += 1
                    else:
                        stats.documents += 1
                        yield ref, text.encode("utf-8", errors="replace")
    return read


def _build(name: str, obj: Any, field: str, holdout: tuple[float, float], source: str) -> Corpus:
    datasets = _datasets()
    tables = dict(obj) if isinstance(obj, datasets.DatasetDict) else {"all": obj}
    for tname, ds in tables.items():
        if field not in ds.column_names:
            raise DataError(f"dataset {name} ({tname}) has no {field!r} column (columns: "
                            f"{', '.join(ds.column_names)}): pass text_field=<column>")
    named = {SPLIT_ALIASES.get(t.lower()): t for t in tables if t.lower() in SPLIT_ALIASES}
    splits: dict[str, list[DocRef]] = {s: [] for s in SPLITS}
    if named:
        for split, tname in named.items():
            splits[split] = [DocRef(f"{tname}/{i}", size, tname, index=i)
                             for i, size in enumerate(_sizes(tables[tname], field))]
    else:  # one table (or unnamed ones): hash split by row key
        refs = [DocRef(f"{tname}/{i}", size, tname, index=i)
                for tname in sorted(tables) for i, size in enumerate(_sizes(tables[tname], field))]
        splits = hash_split(refs, holdout)
    tables_fp = sorted((t, getattr(d, "_fingerprint", ""), len(d)) for t, d in tables.items())
    fp = stable_hash("hf-v1", name, field, tables_fp, holdout if not named else "named")
    if not any(splits.values()):
        raise DataError(f"dataset {name} has no rows: check the dataset")
    return Corpus(name, fp, splits, ReadStats(), _reader(tables, field), source)


def disk_corpus(root: Path, field: str, holdout: tuple[float, float]) -> Corpus:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    obj = _datasets().load_from_disk(str(root))
    return _build(str(root), obj, field, holdout, "datasets-disk")


def hf_corpus(spec: str, field: str, holdout: tuple[float, float]) -> Corpus:
    """``name`` or ``name:config`` loaded with ``datasets.load_dataset`` (the user's HF cache/network)."""
    if not spec:
        raise DataError("empty dataset name after 'hf:': use hf:<name> or hf:<name>:<config>")
    name, _, config = spec.partition(":")
    try:
        obj = _datasets().load_dataset(name, config or None)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"could not load dataset {spec!r} with datasets.load_dataset: {e}") from e
    return _build(f"hf:{spec}", obj, field, holdout, "datasets-hub")
