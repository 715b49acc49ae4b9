"""The corpus object and the hash split: what every corpus source (``corpora``, ``books``, ``hf``) builds on.

Kept apart from ``corpora`` (which resolves names and paths to sources) so that no two modules of ``data`` import
each other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

from .common import SPLITS, DataError, ReadStats, canonical_split
from .reading import DocRef


class Corpus:
    """A set of documents with a fixed train / validation / test assignment.

    Documents are read lazily (:meth:`iter_documents`), so a PG19-sized corpus costs only its file list in
    memory.  ``stats`` holds the skip counters of discovery plus those of every split read so far.
    """

    def __init__(self, name: str, fingerprint: str, splits: dict[str, list[DocRef]], scan_stats: ReadStats,
                 reader: Callable[[list[DocRef], ReadStats], Iterator[tuple[DocRef, bytes]]], source: str):
        self.name = name
        self.fingerprint = fingerprint
        self.source = source
        self.scan_stats = scan_stats
        self.split_stats: dict[str, ReadStats] = {}
        self._splits = {s: splits.get(s, []) for s in SPLITS}
        self._reader = reader

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={len(r)}" for s, r in self._splits.items())
        return f"Corpus({self.name!r}, {counts})"

    @property
    def stats(self) -> ReadStats:
        total = ReadStats(**{**self.scan_stats.to_dict(), "documents": 0})
        for s in self.split_stats.values():
            total = total + s
        return total

    def num_documents(self, split: str) -> int:
        return len(self._splits[canonical_split(split)])

    def num_bytes(self, split: str) -> int:
        """Bytes on disk of the split (an upper bound on its text for JSONL)."""
        return sum(r.size for r in self._splits[canonical_split(split)])

    def documents(self, split: str) -> list[DocRef]:
        """The split's documents, or DataError when it has none."""
        split = canonical_split(split)
        refs = self._splits[split]
        if not refs:
            counts = ", ".join(f"{s}: {len(r)}" for s, r in self._splits.items())
            raise DataError(f"split {split!r} of corpus {self.name!r} is empty ({counts} documents): add a "
                            f"{split}/ folder, or more documents so that the hash split can hold some out")
        return refs

    def iter_documents(self, split: str) -> Iterator[tuple[str, bytes]]:
        """Yield ``(key, raw bytes)`` for each usable document of the split, in a fixed order.

        Skips are counted in ``split_stats[split]`` (replacing an earlier read of the same split).
        """
        split = canonical_split(split)
        stats = ReadStats()
        self.split_stats[split] = stats
        for ref, data in self._reader(self.documents(split), stats):
            yield ref.key, data

    def sample_texts(self, split: str = "train", max_bytes: int = 10_000_000) -> Iterator[str]:
        """A deterministic sample of about ``max_bytes`` of text (for tokenizer training).

        Documents are taken in sha1 order of their keys, so the sample is spread over the whole split.
        """
        refs = sorted(self.documents(split), key=lambda r: hashlib.sha1(r.key.encode()).digest())
        total = 0
        for _, data in self._reader(refs, ReadStats()):
            take = data[:max_bytes - total]
            total += len(take)
            yield take.decode("utf-8", errors="replace")
            if total >= max_bytes:
                return


def unit_hash(key: str) -> float:
    """A number in [0, 1) from the sha1 of ``key``: the same on every machine and Python version."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def hash_split(refs: list[DocRef], holdout: tuple[float, float] = (0.01, 0.01)) -> dict[str, list[DocRef]]:
    """Assign documents to train / validation / test by the hash of their key.

    A document with ``unit_hash(key) < holdout[0]`` goes to validation, below ``holdout[0] + holdout[1]`` to
    test, otherwise to train.  So that held-out splits are never starved by chance (few or small files), each
    one is then topped up with the lowest-hash train documents until it holds at least its fraction of the
    bytes and at least one document (while train keeps one).  The result depends only on the set of
    ``(key, size)``, never on the order of ``refs``; the order within a split is that of ``refs``.
    """
    fv, ft = holdout
    if fv < 0 or ft < 0 or fv + ft >= 1:
        raise DataError(f"holdout fractions {holdout} must be >= 0 and sum to < 1")
    h = {r.key: unit_hash(r.key) for r in refs}
    where = {k: "validation" if x < fv else "test" if x < fv + ft else "train" for k, x in h.items()}
    total = sum(r.size for r in refs)
    train = [r for r in refs if where[r.key] == "train"]
    train.sort(key=lambda r: (h[r.key], r.key), reverse=True)  # pop() takes the lowest hash
    for split, frac in (("validation", fv), ("test", ft)):
        if frac <= 0:
            continue
        size = sum(r.size for r in refs if where[r.key] == split)
        count = sum(1 for r in refs if where[r.key] == split)
        while (size < frac * total or count == 0) and len(train) > 1:
            r = train.pop()
            where[r.key] = split
            size, count = size + r.size, count + 1
    return {s: [r for r in refs if where[r.key] == s] for s in SPLITS}
