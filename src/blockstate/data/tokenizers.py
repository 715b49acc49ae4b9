"""Tokenizers behind one small interface: bytes, locally trained byte-level BPE, user SentencePiece.

Every tokenizer has ``encode(text_or_bytes) -> list[int]``, ``encode_batch`` (numpy arrays, the fast path
used to build token caches), ``decode(ids) -> str``, ``vocab_size``, ``eos_id`` (the document separator,
never produced by ``encode``), ``fingerprint`` (a cache key) and ``save(dir)``; :func:`load_tokenizer` reads
any saved one back.  A saved tokenizer is ``blockstate_tokenizer.json`` plus the tokenizer's own file
(``tokenizer.json`` / ``spm.model``): no pickle.

Bits per byte never depends on the tokenizer: the byte count of a document is its raw UTF-8 length
(``Tokenizer.num_bytes``), kept per document by the token cache (``TokenizedSplit.doc_bytes``).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .common import DataError, default_cache_dir, logger, make_tmp_dir, publish_dir, stable_hash

CONFIG_NAME = "blockstate_tokenizer.json"
EOS_TOKEN = "<|endoftext|>"
KNOWN = "bytes, bpe (or bpe:<vocab size>), a SentencePiece .model file or a directory saved by Tokenizer.save"


def _text(data: str | bytes) -> str:
    return data if isinstance(data, str) else data.decode("utf-8", errors="replace")


class Tokenizer:
    """Base class: subclasses set ``kind``, ``vocab_size``, ``eos_id`` and implement the encoders."""

    kind = "base"
    vocab_size: int
    eos_id: int
    accepts_bytes = False  # True: encode() models raw bytes, so invalid UTF-8 is kept, not replaced

    @property
    def dtype(self) -> np.dtype:
        """Smallest unsigned dtype holding every id (uint16 up to 65536 symbols)."""
        return np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.uint32)

    @property
    def fingerprint(self) -> str:
        raise NotImplementedError

    def encode(self, data: str | bytes) -> list[int]:
        return self.encode_batch([data])[0].tolist()

    @staticmethod
    def num_bytes(data: str | bytes) -> int:
        """UTF-8 bytes of a document: the bits-per-byte denominator, whatever the tokenizer."""
        return len(data) if isinstance(data, bytes) else len(data.encode("utf-8"))

    def encode_batch(self, docs: Sequence[str | bytes]) -> list[np.ndarray]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def _write_config(self, directory: Path, **extra: Any) -> None:
        cfg = {"format": "blockstate-tokenizer", "version": 1, "type": self.kind,
               "vocab_size": self.vocab_size, "eos_id": self.eos_id, **extra}
        (directory / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")

    def save(self, directory: str | Path) -> Path:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class BytesTokenizer(Tokenizer):
    """The 256 byte values are ids 0..255 and id 256 is EOS (vocab 257).  No training; raw bytes kept."""

    kind = "bytes"
    vocab_size = 257
    eos_id = 256
    accepts_bytes = True

    @property
    def fingerprint(self) -> str:
        return "bytes-v1"

    def encode_batch(self, docs: Sequence[str | bytes]) -> list[np.ndarray]:
        raw = [d.encode("utf-8") if isinstance(d, str) else d for d in docs]
        return [np.frombuffer(d, dtype=np.uint8).astype(np.uint16) for d in raw]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in (int(i) for i in ids) if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._write_config(directory)
        return directory


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (our byte-level BPE): EOS is the special token ``<|endoftext|>``.

    ``encode_special_tokens`` is on, so a literal ``<|endoftext|>`` in a document is encoded as text and can
    never pose as a document boundary.
    """

    kind = "bpe"

    def __init__(self, tok: Any):
        self.tok = tok
        tok.encode_special_tokens = True
        eos = tok.token_to_id(EOS_TOKEN)
        if eos is None:
            raise DataError(f"tokenizer has no {EOS_TOKEN} token: train it with build_tokenizer('bpe', ...)")
        self.eos_id = eos
        self.vocab_size = tok.get_vocab_size()
        self._fp = hashlib.sha1(tok.to_str().encode()).hexdigest()

    @property
    def fingerprint(self) -> str:
        return f"bpe-{self._fp}"

    def encode_batch(self, docs: Sequence[str | bytes]) -> list[np.ndarray]:
        encs = self.tok.encode_batch([_text(d) for d in docs], add_special_tokens=False)
        return [np.asarray(e.ids, dtype=self.dtype) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(directory / "tokenizer.json"))
        self._write_config(directory, file="tokenizer.json")
        return directory


def _sentencepiece() -> Any:
    try:
        import sentencepiece
    except ImportError:
        raise DataError("a SentencePiece .model needs the sentencepiece package: "
                        "pip install sentencepiece") from None
    return sentencepiece


class SentencePieceTokenizer(Tokenizer):
    """A user-supplied SentencePiece model.  EOS is the model's ``</s>``; a model trained without one gets
    an extra id ``piece_size`` for EOS (so ``vocab_size = piece_size + 1``)."""

    kind = "sentencepiece"

    def __init__(self, model_file: str | Path):
        self.model_file = Path(model_file)
        try:
            self._proto = self.model_file.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read SentencePiece model {model_file}: {e.strerror}") from None
        try:
            self.sp = _sentencepiece().SentencePieceProcessor(model_proto=self._proto)
        except (RuntimeError, OSError) as e:
            raise DataError(f"{model_file} is not a valid SentencePiece .model file ({e})") from None
        n = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else n
        self.vocab_size = n if self.sp.eos_id() >= 0 else n + 1

    @property
    def fingerprint(self) -> str:
        return "spm-" + hashlib.sha1(self._proto).hexdigest()

    def encode_batch(self, docs: Sequence[str | bytes]) -> list[np.ndarray]:
        ids = self.sp.encode([_text(d) for d in docs], out_type=int)
        return [np.asarray(x, dtype=self.dtype) for x in ids]

    def decode(self, ids: Iterable[int]) -> str:
        n = self.sp.get_piece_size()
        return self.sp.decode([int(i) for i in ids if int(i) != self.eos_id and 0 <= int(i) < n])

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "spm.model").write_bytes(self._proto)
        self._write_config(directory, file="spm.model")
        return directory


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """Train a GPT-2-style byte-level BPE (lossless: decode(encode(x)) == x for any text)."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise DataError(f"BPE vocab_size {vocab_size} is too small: it needs > 257 (256 bytes + EOS)")
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def chunks() -> Iterable[str]:  # ~64 KB pieces cut at newlines, so the trainer can work in parallel
        for text in texts:
            start = 0
            while start < len(text):
                end = text.find("\n", start + 65536)
                end = len(text) if end < 0 else end + 1
                yield from _short_runs(text[start:end])
                start = end

    tok.train_from_iterator(chunks(), trainer=trainer)
    return HFTokenizer(tok)


# A run of this many non-space (or space) characters is cut into pieces for BPE training: the trainer's cost
# grows with the length of a pre-token, and one minified / base64 / "aaaa..." line of 1 MB took minutes (random
# letters: ~4 minutes; one repeated letter: over 5) where 1 KB pieces take under a second. Encoding any text is
# unaffected; only merges spanning more than MAX_RUN characters are never learned.
MAX_RUN = 1024
_LONG_RUN = re.compile(rf"\S{{{MAX_RUN},}}|\s{{{MAX_RUN},}}")


def _short_runs(text: str) -> Iterator[str]:
    """``text`` as pieces in which no run of non-space (or space) characters is longer than MAX_RUN."""
    pos = 0
    for m in _LONG_RUN.finditer(text):
        if m.start() > pos:
            yield text[pos:m.start()]
        for i in range(m.start(), m.end(), MAX_RUN):
            yield text[i:min(i + MAX_RUN, m.end())]
        pos = m.end()
    if pos < len(text):
        yield text[pos:]


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load a tokenizer written by ``Tokenizer.save``."""
    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise DataError(f"{directory} is not a saved tokenizer (no {CONFIG_NAME}): save one with "
                        "tokenizer.save(dir)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        kind = cfg.get("type")
        if kind == "bytes":
            return BytesTokenizer()
        if kind == "bpe":
            from tokenizers import Tokenizer as HFTok
            return HFTokenizer(HFTok.from_file(str(directory / cfg["file"])))
        if kind == "sentencepiece":
            return SentencePieceTokenizer(directory / cfg["file"])
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - JSON, tokenizers and sentencepiece parse errors alike
        raise DataError(f"the tokenizer saved in {directory} is damaged ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120] if str(exc) else ''}): save it again") from None
    raise DataError(f"{cfg_path} names an unknown tokenizer type {kind!r}: known types are bytes, bpe, "
                    "sentencepiece")


def build_tokenizer(name_or_path: str | Path, corpus: Any = None, *, vocab_size: int = 8192,
                    cache_dir: str | Path | None = None, sample_bytes: int = 10_000_000) -> Tokenizer:
    """Make a tokenizer from a name or path; DataError (listing the known ones) otherwise.

    ``bytes``; ``bpe`` / ``bpe:<vocab>``: trained on <= ``sample_bytes`` of ``corpus``'s train split and
    cached under ``cache_dir/tokenizers`` keyed by corpus fingerprint + vocab size, so it is trained once; a
    SentencePiece ``.model`` file; or a directory written by ``Tokenizer.save``.
    """
    spec = str(name_or_path).strip()
    if spec == "bytes":
        return BytesTokenizer()
    if spec == "bpe" or spec.startswith("bpe:"):
        if spec.startswith("bpe:"):
            try:
                vocab_size = int(spec[4:])
            except ValueError:
                raise DataError(f"bad BPE spec {spec!r}: use bpe:<vocab size>, e.g. bpe:8192") from None
        if corpus is None:
            raise DataError("the bpe tokenizer is trained on a corpus: pass corpus=load_corpus(...)")
        root = Path(cache_dir) if cache_dir else default_cache_dir()
        return _cached_bpe(corpus, vocab_size, root, sample_bytes)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return load_tokenizer(path)
    if path.suffix == ".model" or path.exists():
        problem = "is not usable" if path.exists() else "does not exist"
        raise DataError(f"tokenizer path {spec} {problem}: use {KNOWN}")
    raise DataError(f"unknown tokenizer {spec!r}: use {KNOWN}")


def _cached_bpe(corpus: Any, vocab_size: int, cache_dir: Path, sample_bytes: int) -> Tokenizer:
    import tokenizers

    key = stable_hash("bpe-v2", corpus.fingerprint, vocab_size, sample_bytes, tokenizers.__version__)[:16]
    final = cache_dir / "tokenizers" / f"bpe{vocab_size}-{key}"
    if (final / CONFIG_NAME).is_file():
        logger.info("using cached BPE tokenizer %s", final)
        return load_tokenizer(final)
    t0 = time.perf_counter()
    tok = train_bpe(corpus.sample_texts("train", sample_bytes), vocab_size)
    logger.info("trained BPE (vocab %d) on %s in %.1fs", tok.vocab_size, corpus.name,
                time.perf_counter() - t0)
    tmp = make_tmp_dir(final.parent)
    try:
        tok.save(tmp)
        (tmp / "meta.json").write_text(json.dumps({"corpus": corpus.name, "vocab_size": vocab_size}) + "\n")
        publish_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(final)
