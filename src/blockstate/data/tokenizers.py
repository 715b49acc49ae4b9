"""Tokenizers behind one small interface: bytes, locally trained byte-level BPE, user SentencePiece.

Every tokenizer has ``encode(text_or_bytes) -> list[int]``, ``encode_batch`` (numpy arrays, the fast path
used to build token caches), ``decode(ids) -> str``, ``vocab_size``, ``eos_id`` (the document separator,
never produced by ``encode``), ``fingerprint`` (a cache key), ``to_hf()`` (the same tokenizer as a
``transformers`` tokenizer) and ``save(dir)``; :func:`load_tokenizer` reads any saved one back.

A saved tokenizer is what ``to_hf().save_pretrained(dir)`` writes, and nothing else: ``tokenizer_config.json``
(its ``tokenizer_class`` says which tokenizer it is) plus ``tokenizer.json`` (BPE) or ``spm.model``
(SentencePiece); ``AutoTokenizer.from_pretrained(dir)`` loads it after ``import blockstate`` and encodes as
training did (with the separator first: ``[EOS] + encode(text)``). Directories written before (a
``blockstate_tokenizer.json``) still load. No pickle anywhere.

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

CONFIG_NAME = "blockstate_tokenizer.json"  # the format before transformers' files (read, never written)
HF_CONFIG = "tokenizer_config.json"
EOS_TOKEN = "<|endoftext|>"
KNOWN = ("bytes, bpe (or bpe:<vocab size>), a SentencePiece .model file or a tokenizer directory (a run directory, "
         "or one written by Tokenizer.save / save_pretrained)")


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

    def to_hf(self) -> Any:
        """This tokenizer as a ``transformers`` tokenizer (``PreTrainedTokenizerFast`` or a subclass of
        ``PreTrainedTokenizer``): same ids, EOS / BOS / PAD = the separator, prepended by ``tok(text)``."""
        raise NotImplementedError

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer_config.json`` and the tokenizer's own file into ``directory`` (``save_pretrained``)."""
        from transformers.utils import logging as hf_logging

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            self.to_hf().save_pretrained(str(directory))
        finally:
            hf_logging.set_verbosity(verbosity)
        return directory

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

    def to_hf(self) -> Any:
        from .hf_tokenizers import BlockStateBytesTokenizer

        return BlockStateBytesTokenizer()


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (our byte-level BPE, or any ``tokenizer.json``): EOS is the special token
    ``eos_token`` (``<|endoftext|>`` for ours).

    ``encode_special_tokens`` is on, so a literal ``<|endoftext|>`` in a document is encoded as text and can
    never pose as a document boundary. The post-processor that ``to_hf`` adds (the separator first) is not
    part of the fingerprint, so a tokenizer read back from its saved ``tokenizer.json`` is the same one.
    """

    kind = "bpe"

    def __init__(self, tok: Any, eos_token: str = EOS_TOKEN):
        from tokenizers import Tokenizer as HFTok

        tok = HFTok.from_str(tok.to_str())  # our own copy: the caller's object is not changed
        tok.post_processor = None
        tok.no_padding()
        tok.no_truncation()
        self.tok = tok
        tok.encode_special_tokens = True
        eos = tok.token_to_id(eos_token)
        if eos is None:
            raise DataError(f"tokenizer has no {eos_token} token: train it with build_tokenizer('bpe', ...)")
        self.eos_token = eos_token
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

    def to_hf(self) -> Any:
        from tokenizers import Tokenizer as HFTok
        from tokenizers import processors
        from transformers import PreTrainedTokenizerFast

        tok = HFTok.from_str(self.tok.to_str())
        eos = self.eos_token
        tok.post_processor = processors.TemplateProcessing(single=f"{eos} $A", pair=f"{eos} $A {eos} $B",
                                                           special_tokens=[(eos, self.eos_id)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos,
                                       split_special_tokens=True, clean_up_tokenization_spaces=False)


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

    def to_hf(self) -> Any:
        from .hf_tokenizers import BlockStateSentencePieceTokenizer

        return BlockStateSentencePieceTokenizer(str(self.model_file))


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


def is_tokenizer_dir(directory: str | Path) -> bool:
    """A directory holding a saved tokenizer (transformers' files, or the format before them)."""
    directory = Path(directory)
    return (directory / HF_CONFIG).is_file() or (directory / CONFIG_NAME).is_file() or (
        directory / "tokenizer.json").is_file()


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load a tokenizer from the files ``Tokenizer.save`` / ``save_pretrained`` wrote (the same files
    ``AutoTokenizer`` reads), or from a directory written before them (``blockstate_tokenizer.json``)."""
    directory = Path(directory)
    if not is_tokenizer_dir(directory):
        raise DataError(f"{directory} is not a saved tokenizer (no {HF_CONFIG}): save one with tokenizer.save(dir), "
                        "or pass --tokenizer")
    try:
        if (directory / HF_CONFIG).is_file():
            cfg = json.loads((directory / HF_CONFIG).read_text(encoding="utf-8"))
            cls = str(cfg.get("tokenizer_class") or "")
            if cls == "BlockStateBytesTokenizer":
                return BytesTokenizer()
            if cls == "BlockStateSentencePieceTokenizer":
                return SentencePieceTokenizer(directory / "spm.model")
            if not (directory / "tokenizer.json").is_file():
                raise DataError(f"{directory / HF_CONFIG} names tokenizer class {cls!r} and there is no "
                                "tokenizer.json: blockstate reads its own tokenizers and any tokenizer.json")
            from tokenizers import Tokenizer as HFTok
            return HFTokenizer(HFTok.from_file(str(directory / "tokenizer.json")),
                               _token_text(cfg.get("eos_token")) or EOS_TOKEN)
        if (directory / CONFIG_NAME).is_file():  # written before transformers' files (format version 1)
            cfg = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
            kind = cfg.get("type")
            if kind == "bytes":
                return BytesTokenizer()
            if kind == "bpe":
                from tokenizers import Tokenizer as HFTok
                return HFTokenizer(HFTok.from_file(str(directory / cfg["file"])))
            if kind == "sentencepiece":
                return SentencePieceTokenizer(directory / cfg["file"])
            raise DataError(f"{directory / CONFIG_NAME} names an unknown tokenizer type {kind!r}: known types are "
                            "bytes, bpe, sentencepiece")
        from tokenizers import Tokenizer as HFTok  # a bare tokenizer.json
        return HFTokenizer(HFTok.from_file(str(directory / "tokenizer.json")))
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - JSON, tokenizers and sentencepiece parse errors alike
        raise DataError(f"the tokenizer saved in {directory} is damaged ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120] if str(exc) else ''}): save it again") from None


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
    if path.is_dir() and is_tokenizer_dir(path):
        return load_tokenizer(path)
    if path.suffix == ".model" or path.exists():
        problem = "is not usable" if path.exists() else "does not exist"
        raise DataError(f"tokenizer path {spec} {problem}: use {KNOWN}")
    raise DataError(f"unknown tokenizer {spec!r}: use {KNOWN}")


def _cached_bpe(corpus: Any, vocab_size: int, cache_dir: Path, sample_bytes: int) -> Tokenizer:
    import tokenizers

    key = stable_hash("bpe-v2", corpus.fingerprint, vocab_size, sample_bytes, tokenizers.__version__)[:16]
    final = cache_dir / "tokenizers" / f"bpe{vocab_size}-{key}"
    if is_tokenizer_dir(final):
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
