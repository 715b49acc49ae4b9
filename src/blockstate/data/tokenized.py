"""Token caches: a split tokenised once into ``.npy`` files, memory-mapped afterwards.

Layout of one split: ``tokens.npy`` holds every document preceded by ``eos_id``
(``EOS d0 EOS d1 ...``); document ``i`` is ``tokens[offsets[i]:offsets[i+1]]`` (its leading EOS
included).  The leading EOS is the context from which the first real token is predicted, so *every* token of
a document is a prediction target exactly once, and the packed stream is just ``tokens``.  ``doc_bytes[i]``
is the raw byte length of document ``i``: the denominator of bits per byte, the same for every tokenizer.

The cache directory is keyed by the corpus fingerprint (file list, sizes, mtimes, split rule), the tokenizer
fingerprint and the split; writing goes to a temporary directory that is renamed at the end, so concurrent
ranks and interrupted runs never leave a half-written cache.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .common import (
    DataError,
    ReadStats,
    canonical_split,
    default_cache_dir,
    logger,
    make_tmp_dir,
    publish_dir,
    slug,
    stable_hash,
)
from .corpus import Corpus
from .tokenizers import BytesTokenizer, Tokenizer

CACHE_VERSION = 1
BATCH_BYTES = 8 << 20  # documents are tokenised in ~8 MB batches (HF tokenizers parallelise inside a batch)
_HEADER = 128  # fixed .npy header size, so the real length can be written once it is known


@dataclasses.dataclass
class TokenizedSplit:
    """One tokenised split: documents as token arrays plus their byte counts."""

    tokens: np.ndarray  # (T,) uint16/uint32: EOS d0 EOS d1 ...
    offsets: np.ndarray  # (D+1,) int64: document i = tokens[offsets[i]:offsets[i+1]], starting with EOS
    doc_bytes: np.ndarray  # (D,) int64: raw bytes of each document
    eos_id: int
    vocab_size: int
    name: str = ""
    stats: ReadStats = dataclasses.field(default_factory=ReadStats)

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        """Real tokens (every one a prediction target once), EOS separators excluded."""
        return int(len(self.tokens) - self.num_documents)

    @property
    def num_bytes(self) -> int:
        return int(self.doc_bytes.sum())

    def document(self, i: int) -> np.ndarray:
        """Tokens of document ``i`` without its leading EOS."""
        return self.tokens[self.offsets[i] + 1:self.offsets[i + 1]]

    def documents(self) -> list[tuple[np.ndarray, int]]:
        """``[(tokens, num_bytes), ...]`` for every document, in split order (for evaluators)."""
        return [(self.document(i), int(self.doc_bytes[i])) for i in range(self.num_documents)]

    @classmethod
    def from_documents(cls, docs: list[np.ndarray], doc_bytes: list[int], eos_id: int, vocab_size: int,
                       name: str = "") -> TokenizedSplit:
        """Build in memory (tests, small data) from token arrays without EOS."""
        dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
        parts = [np.concatenate([[eos_id], d]).astype(dtype) for d in docs]
        lengths = np.array([len(p) for p in parts], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
        return cls(tokens, offsets, np.asarray(doc_bytes, dtype=np.int64), eos_id, vocab_size, name)


def _npy_header(dtype: np.dtype, n: int) -> bytes:
    d = f"{{'descr': '{np.dtype(dtype).str}', 'fortran_order': False, 'shape': ({n},), }}"
    header = (d.ljust(_HEADER - 11) + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", _HEADER - 10) + header


class _NpyStream:
    """Append 1-D chunks to a ``.npy`` file of unknown final length (bounded memory for PG19-sized splits)."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.f: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.dtype, self.n = np.dtype(dtype), 0
        self.f.write(_npy_header(self.dtype, 0))

    def write(self, arr: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(arr, dtype=self.dtype).tobytes())
        self.n += len(arr)

    def close(self) -> None:
        self.f.seek(0)
        self.f.write(_npy_header(self.dtype, self.n))
        self.f.close()


def _batches(docs: Iterator[tuple[str, bytes]]) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    size = 0
    for _, data in docs:
        batch.append(data)
        size += len(data)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode(tokenizer: Tokenizer, batch: list[bytes], stats: ReadStats) -> list[np.ndarray]:
    if tokenizer.accepts_bytes:
        if isinstance(tokenizer, BytesTokenizer):  # fast path: one frombuffer for the whole batch
            flat = np.frombuffer(b"".join(batch), dtype=np.uint8).astype(np.uint16)
            return np.split(flat, np.cumsum([len(b) for b in batch[:-1]]))
        return tokenizer.encode_batch(batch)
    texts = []
    for data in batch:
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError:
            stats.replaced += 1
            texts.append(data.decode("utf-8", errors="replace"))
    return tokenizer.encode_batch(texts)


def _write_split(corpus: Corpus, tokenizer: Tokenizer, split: str, out: Path) -> dict[str, Any]:
    eos = np.array([tokenizer.eos_id], dtype=tokenizer.dtype)
    stream = _NpyStream(out / "tokens.npy", tokenizer.dtype)
    lengths: list[int] = []
    nbytes: list[int] = []
    replaced = ReadStats()
    try:
        for batch in _batches(corpus.iter_documents(split)):
            arrays = _encode(tokenizer, batch, replaced)
            pieces = []
            for data, ids in zip(batch, arrays, strict=True):
                pieces += [eos, ids]
                lengths.append(len(ids) + 1)
                nbytes.append(len(data))
            stream.write(np.concatenate(pieces))
    finally:
        stream.close()
    stats = corpus.split_stats[split]
    stats.replaced += replaced.replaced
    if not lengths:
        raise DataError(f"split {split!r} of corpus {corpus.name!r} has no readable document "
                        f"({stats.summary()}): check the files")
    np.save(out / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    np.save(out / "doc_bytes.npy", np.asarray(nbytes, dtype=np.int64))
    meta = {"version": CACHE_VERSION, "corpus": corpus.name, "split": split,
            "tokenizer": tokenizer.fingerprint, "eos_id": tokenizer.eos_id,
            "vocab_size": tokenizer.vocab_size, "stats": stats.to_dict()}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")  # written last: marks it complete
    return meta


def _log_stats(name: str, stats: ReadStats) -> None:
    if stats.skipped():
        logger.warning("%s: %d documents skipped (%s)", name, stats.skipped(), stats.summary())
    if stats.replaced:
        logger.warning("%s: %d documents are not valid UTF-8 and were decoded with replacement characters "
                       "(the bytes tokenizer keeps them exactly)", name, stats.replaced)


def tokenize_split(corpus: Corpus, tokenizer: Tokenizer, split: str, cache_dir: str | Path | None = None,
                   *, use_cache: bool = True) -> TokenizedSplit:
    """Tokenise one split (or load it from the cache) and return it memory-mapped.

    Raises DataError if the split is empty or none of its documents could be read.
    """
    split = canonical_split(split)
    corpus.documents(split)  # raises DataError early for an empty split
    key = stable_hash(CACHE_VERSION, corpus.fingerprint, tokenizer.fingerprint, split)[:16]
    root = (Path(cache_dir) if cache_dir else default_cache_dir()) / "tokens"
    final = root / f"{slug(corpus.name, 40)}-{split}-{tokenizer.kind}-{key}"
    name = f"{corpus.name}:{split}"
    if use_cache and (final / "meta.json").is_file():
        try:
            return _load(final, corpus, split, name, tokenizer)
        except (OSError, ValueError, KeyError, TypeError) as exc:  # e.g. a truncated tokens.npy
            logger.warning("token cache %s is damaged (%s): rebuilding it", final, str(exc).splitlines()[0][:200])
            shutil.rmtree(final, ignore_errors=True)
    t0 = time.perf_counter()
    tmp = make_tmp_dir(root)
    try:
        _write_split(corpus, tokenizer, split, tmp)
        if use_cache:
            publish_dir(tmp, final)
        else:
            final = tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("tokenised %s with %s in %.2fs", name, tokenizer.kind, time.perf_counter() - t0)
    data = _load(final, corpus, split, name, tokenizer)
    if not use_cache:  # load into memory, then drop the temporary files
        data.tokens = np.array(data.tokens)
        shutil.rmtree(final, ignore_errors=True)
    return data


def _load(final: Path, corpus: Corpus, split: str, name: str, tokenizer: Tokenizer) -> TokenizedSplit:
    """A cached split, memory-mapped; ValueError when its files do not agree with each other."""
    meta = json.loads((final / "meta.json").read_text())
    stats = ReadStats.from_dict(meta["stats"])
    data = TokenizedSplit(np.load(final / "tokens.npy", mmap_mode="r", allow_pickle=False),
                          np.load(final / "offsets.npy", allow_pickle=False),
                          np.load(final / "doc_bytes.npy", allow_pickle=False),
                          int(meta["eos_id"]), int(meta["vocab_size"]), name, stats)
    if (data.tokens.dtype != tokenizer.dtype or len(data.offsets) != len(data.doc_bytes) + 1
            or int(data.offsets[-1]) != len(data.tokens) or data.eos_id != tokenizer.eos_id):
        raise ValueError("its token, offset and byte arrays do not agree")
    corpus.split_stats[split] = stats
    _log_stats(name, stats)
    return data
