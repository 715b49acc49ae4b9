"""Tokenizers: round trips, EOS handling, save/load, the BPE cache and the factory's errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.data import text_corpus
from hypothesis import given, settings
from hypothesis import strategies as st

from blockstate.data import (
    BytesTokenizer,
    DataError,
    build_tokenizer,
    load_corpus,
    load_tokenizer,
    tokenizers,
)

SAMPLES = ["", "hello world", "def f(x):\n    return x ** 2\n", "naïve café — Ωμέγα ✓ 日本語 🙂", "a\r\nb\tc",
           "<|endoftext|> is just text"]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    root = text_corpus(tmp_path_factory.mktemp("corpus"))
    cache = tmp_path_factory.mktemp("cache")
    return build_tokenizer("bpe", load_corpus(root), vocab_size=400, cache_dir=cache)


def test_bytes_tokenizer():
    tok = BytesTokenizer()
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    for s in SAMPLES:
        assert tok.encode(s) == list(s.encode("utf-8"))
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode(b"\xff\x00a") == [255, 0, 97]  # raw bytes, any value
    assert tok.decode([104, 256, 105]) == "hi"  # EOS is a separator, not text
    assert tok.dtype.itemsize == 2
    assert tok.num_bytes("café") == 5 == tok.num_bytes("café".encode())


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_bytes_and_bpe_round_trip_any_text(bpe, text):
    assert BytesTokenizer().decode(BytesTokenizer().encode(text)) == text
    ids = bpe.encode(text)
    assert bpe.eos_id not in ids
    assert bpe.decode(ids) == text


def test_bpe_basics_and_save_load(bpe, tmp_path):
    assert 258 < bpe.vocab_size <= 400 and bpe.eos_id == 0
    for s in SAMPLES:
        assert bpe.decode(bpe.encode(s)) == s
    assert len(bpe.encode("the of and to in a is that")) < len("the of and to in a is that")  # merges learnt
    assert bpe.eos_id not in bpe.encode("<|endoftext|>")  # a literal marker in a document is plain text
    assert bpe.encode(b"caf\xe9") == bpe.encode("caf\ufffd")  # bytes input: invalid UTF-8 replaced
    bpe.save(tmp_path / "tok")
    cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|endoftext|>" and cfg["split_special_tokens"] is True
    assert not (tmp_path / "tok" / "blockstate_tokenizer.json").exists()  # one format: transformers' files
    again = load_tokenizer(tmp_path / "tok")
    assert again.fingerprint == bpe.fingerprint and (again.vocab_size, again.eos_id) == (bpe.vocab_size, 0)
    assert all(again.encode(s) == bpe.encode(s) for s in SAMPLES)
    assert build_tokenizer(tmp_path / "tok").fingerprint == bpe.fingerprint
    BytesTokenizer().save(tmp_path / "b")
    assert isinstance(load_tokenizer(tmp_path / "b"), BytesTokenizer)


def test_bpe_is_trained_once_and_cached(tmp_path, monkeypatch):
    corpus = load_corpus(text_corpus(tmp_path / "c"))
    first = build_tokenizer("bpe", corpus, vocab_size=300, cache_dir=tmp_path / "cache")
    def no_training(*args, **kwargs):
        raise RuntimeError("trained twice")

    monkeypatch.setattr(tokenizers, "train_bpe", no_training)
    again = build_tokenizer("bpe:300", load_corpus(tmp_path / "c"), cache_dir=tmp_path / "cache")
    assert again.fingerprint == first.fingerprint
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 1  # no temporary directory left over
    with pytest.raises(RuntimeError):  # a different vocabulary size is a different cache entry
        build_tokenizer("bpe", corpus, vocab_size=290, cache_dir=tmp_path / "cache")


def test_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text = tmp_path / "train.txt"
    text.write_text("\n".join(f"the quick brown fox number {i} jumps over the lazy dog" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "m"), vocab_size=60,
                                   minloglevel=2)
    tok = build_tokenizer(tmp_path / "m.model")
    assert tok.kind == "sentencepiece" and tok.vocab_size == 60 and 0 <= tok.eos_id < 60
    ids = tok.encode("the lazy brown fox")
    assert tok.eos_id not in ids and tok.decode(ids + [tok.eos_id]) == "the lazy brown fox"
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.fingerprint == tok.fingerprint and again.encode("over the dog") == tok.encode("over the dog")


@pytest.mark.parametrize("spec, expected", [
    ("wordpiece", "unknown tokenizer 'wordpiece': use bytes, bpe"),
    ("bpe:big", "bad BPE spec"),
    ("missing/spm.model", "does not exist"),
])
def test_factory_errors(spec, expected):
    with pytest.raises(DataError, match=expected):
        build_tokenizer(spec)


def test_factory_errors_with_files(tmp_path):
    with pytest.raises(DataError, match="pass corpus="):
        build_tokenizer("bpe")
    with pytest.raises(DataError, match="not a saved tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(DataError, match="vocab_size 100 is too small"):
        build_tokenizer("bpe", load_corpus(text_corpus(tmp_path / "c")), vocab_size=100, cache_dir=tmp_path)
    (tmp_path / "bad.model").write_bytes(b"not a model")
    pytest.importorskip("sentencepiece")
    with pytest.raises(DataError, match="not a valid SentencePiece"):
        build_tokenizer(tmp_path / "bad.model")


# -- transformers tokenizers: AutoTokenizer reads the same files and encodes as training did -------------------
def real_text() -> str:
    """Real source text with non-ASCII characters: this repository's own tokenizer module and README."""
    root = Path(__file__).resolve().parents[2]
    return (root / "src/blockstate/data/tokenizers.py").read_text(encoding="utf-8") + (
        root / "README.md").read_text(encoding="utf-8")[:20000] + "\nnaïve café — Ωμέγα ✓ 日本語 🙂 <|endoftext|>\n"


def auto(directory):
    from transformers import AutoTokenizer

    import blockstate  # noqa: F401 - registers the tokenizer classes with AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def test_bytes_tokenizer_through_auto_tokenizer_round_trips_invalid_utf8(tmp_path):
    BytesTokenizer().save(tmp_path / "b")
    assert {p.name for p in (tmp_path / "b").iterdir()} <= {"added_tokens.json", "special_tokens_map.json",
                                                             "tokenizer_config.json"}
    tok, ours = auto(tmp_path / "b"), load_tokenizer(tmp_path / "b")
    assert type(tok).__name__ == "BlockStateBytesTokenizer" and isinstance(ours, BytesTokenizer)
    assert (len(tok), tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (257, 256, 256, 256)
    text = real_text()
    ids = tok(text).input_ids
    assert ids == [256] + ours.encode(text) == [256] + list(text.encode("utf-8"))  # separator first, as in training
    assert tok.decode(ids, skip_special_tokens=True) == ours.decode(ids) == text
    raw = text.encode("utf-8")[:3000] + b"\xff\xfe caf\xe9 \xc3(" + bytes(range(256))
    as_str = raw.decode("utf-8", "surrogateescape")
    assert tok(as_str, add_special_tokens=False).input_ids == ours.encode(raw) == list(raw)
    assert tok.decode(list(raw), errors="surrogateescape").encode("utf-8", "surrogateescape") == raw  # exact
    assert tok.decode(list(raw)) == ours.decode(list(raw))  # default: U+FFFD for invalid bytes, as training did
    assert tok.decode([104, 256, 105]) == "h<|endoftext|>i"
    assert tok.decode([104, 256, 105], skip_special_tokens=True) == "hi"


def test_bpe_through_auto_tokenizer_equals_the_project_encoding(bpe, tmp_path):
    bpe.save(tmp_path / "tok")
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "tok").iterdir()}
    tok, ours = auto(tmp_path / "tok"), load_tokenizer(tmp_path / "tok")
    assert ours.fingerprint == bpe.fingerprint and tok.eos_token_id == bpe.eos_id == tok.bos_token_id
    text = real_text()
    assert tok(text).input_ids == [bpe.eos_id] + bpe.encode(text)
    assert tok(text, add_special_tokens=False).input_ids == bpe.encode(text)
    assert bpe.eos_id not in tok("a <|endoftext|> b", add_special_tokens=False).input_ids  # text, not a separator
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == bpe.decode(bpe.encode(text)) == text
    for s in SAMPLES:
        assert tok.decode(tok(s).input_ids, skip_special_tokens=True) == s


def test_sentencepiece_through_auto_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text = tmp_path / "train.txt"
    text.write_text("\n".join(f"the quick brown fox number {i} jumps over the lazy dog" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "m"), vocab_size=60, minloglevel=2)
    ours = build_tokenizer(tmp_path / "m.model")
    ours.save(tmp_path / "saved")
    tok = auto(tmp_path / "saved")
    sample = "the lazy brown fox jumps over the quick dog 12 times"
    assert tok(sample).input_ids == [ours.eos_id] + ours.encode(sample)
    assert tok.decode(tok(sample).input_ids, skip_special_tokens=True) == ours.decode(ours.encode(sample))
    assert load_tokenizer(tmp_path / "saved").fingerprint == ours.fingerprint


def test_directories_of_the_format_before_still_load(bpe, tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "blockstate_tokenizer.json").write_text(json.dumps(
        {"format": "blockstate-tokenizer", "version": 1, "type": "bytes", "vocab_size": 257, "eos_id": 256}))
    assert isinstance(load_tokenizer(tmp_path / "b"), BytesTokenizer)
    (tmp_path / "p").mkdir()
    bpe.tok.save(str(tmp_path / "p" / "tokenizer.json"))
    (tmp_path / "p" / "blockstate_tokenizer.json").write_text(json.dumps(
        {"format": "blockstate-tokenizer", "version": 1, "type": "bpe", "file": "tokenizer.json"}))
    assert load_tokenizer(tmp_path / "p").fingerprint == bpe.fingerprint  # same cache key, same resume check
    (tmp_path / "p" / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(DataError, match="is damaged .*save it again"):
        load_tokenizer(tmp_path / "p")
