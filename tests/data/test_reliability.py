"""Hostile corpus directories: every bad file is skipped and counted by reason, nothing crashes the run, nothing
is dropped silently, and a corpus with nothing usable is a one-line error."""

import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.data import write_files
from helpers.training import write_corpus

from blockstate.cli.main import main
from blockstate.data import DataError, build_tokenizer, load_corpus, reading, tokenize_split
from blockstate.data.tokenizers import train_bpe

HUGE_LINE = 2_000_000  # bytes on one line, no whitespace: minified / base64-like
ROOT = os.geteuid() == 0  # root reads chmod-000 files: those cases are simulated instead


def hostile_corpus(root: Path) -> dict[str, int]:
    """Six good documents plus one file (or link) of every kind of trouble; returns the expected counts."""
    write_corpus(root, n_docs=6)
    rnd = random.Random(0)
    write_files(root, {
        "empty.txt": b"",
        "huge_line.txt": "".join(rnd.choice("abcdefghij") for _ in range(HUGE_LINE)),
        "nul_start.txt": b"\x00\x01\x02 binary",
        "nul_late.txt": b"x" * 9000 + b"\x00 after the sniffed head",  # found only when read
        "utf16.txt": "hello world".encode("utf-16"),  # NUL bytes: counted as binary
        "latin1.txt": "caf\xe9 na\xefve r\xe9sum\xe9\n".encode("latin-1") * 20,  # kept, counted
        "locked.txt": "no permission to read this\n",
        "image.png": b"\x89PNG not a corpus file",
        "records.jsonl": "\n".join([json.dumps({"text": "a good record"}), "{not json", json.dumps({"text": 5}),
                                    json.dumps({"body": "no text field"}), "", json.dumps({"text": ""})]) + "\n",
    })
    (root / "records.jsonl").write_bytes((root / "records.jsonl").read_bytes() + b'{"text": "caf\xe9"}\n')
    os.symlink("loop.txt", root / "loop.txt")  # a link to itself
    os.symlink("missing.txt", root / "dangling.txt")
    (root / "sub").mkdir()
    os.symlink("..", root / "sub" / "up")  # a directory loop
    os.mkfifo(root / "fifo.txt")  # opening it would block forever
    os.chmod(root / "locked.txt", 0)
    return {"documents": 6 + 2 + 2, "binary": 3, "empty": 2, "unreadable": 3, "symlink_loop": 2, "bad_records": 3,
            "invalid_utf8": 2, "ignored": 1}


@pytest.fixture
def locked(monkeypatch):
    """``locked.txt`` unreadable even for root (where chmod 000 does not stop reading)."""
    if ROOT:
        real = reading._read_bytes

        def read(path, limit=-1):
            if path.endswith("locked.txt"):
                raise PermissionError(13, "Permission denied", path)
            return real(path, limit)

        monkeypatch.setattr(reading, "_read_bytes", read)


def test_every_kind_of_bad_file_is_skipped_and_counted(tmp_path, locked, caplog):
    expected = hostile_corpus(tmp_path / "c")
    with caplog.at_level(logging.INFO, "blockstate.data"):
        corpus = load_corpus(tmp_path / "c", holdout=(0.0, 0.0))
        data = tokenize_split(corpus, build_tokenizer("bytes"), "train", tmp_path / "cache")
    stats = corpus.stats.to_dict()
    assert {k: stats[k] for k in expected} == expected, stats
    assert "skipped while scanning" in caplog.text and "documents skipped" in caplog.text
    # what is kept is kept whole: the huge line and the non-UTF-8 bytes, byte for byte
    lengths = sorted(int(n) for _, n in data.documents())
    assert HUGE_LINE in lengths and data.num_documents == expected["documents"]
    raw = {bytes(d.astype(np.uint8)) for d, _ in data.documents()}
    assert (tmp_path / "c" / "latin1.txt").read_bytes() in raw


def test_a_file_that_vanishes_between_scan_and_read_is_counted(tmp_path):
    write_corpus(tmp_path / "c", n_docs=4)
    corpus = load_corpus(tmp_path / "c", holdout=(0.0, 0.0))
    (tmp_path / "c" / "doc02.txt").unlink()
    data = tokenize_split(corpus, build_tokenizer("bytes"), "train", tmp_path / "cache")
    assert data.num_documents == 3 and corpus.stats.unreadable == 1


@pytest.mark.skipif(ROOT, reason="root reads chmod-000 directories; the file case is simulated in other tests")
def test_unreadable_directory_is_counted(tmp_path):
    write_corpus(tmp_path / "c", n_docs=3)
    write_corpus(tmp_path / "c" / "private", n_docs=2)
    os.chmod(tmp_path / "c" / "private", 0)
    try:
        corpus = load_corpus(tmp_path / "c", holdout=(0.0, 0.0))
        assert corpus.num_documents("train") == 3 and corpus.stats.unreadable == 1
    finally:
        os.chmod(tmp_path / "c" / "private", 0o755)


def test_training_on_the_hostile_corpus_runs_and_reports_every_reason(tmp_path, locked, capsys):
    """The whole run (a BPE trained on a corpus with a 2 MB single-line file, tokenising, training, evaluation)
    completes, and its log line counts every reason."""
    expected = hostile_corpus(tmp_path / "c" / "train")  # held-out splits of good text: evaluation stays small
    write_corpus(tmp_path / "c" / "validation", n_docs=2, seed=1)
    write_corpus(tmp_path / "c" / "test", n_docs=2, seed=2)
    expected["documents"] += 4
    t0 = time.perf_counter()
    rc = main(["train", "--data", str(tmp_path / "c"), "--tokenizer", "bpe:300", "--cache-dir", str(tmp_path / "cache"),
               "--output", str(tmp_path / "run"), "--steps", "2", "--seq-len", "64", "--block-size", "16",
               "--model-arg", "hidden_size=32", "--model-arg", "num_hidden_layers=2", "--model-arg",
               "num_attention_heads=2", "--model-arg", "intermediate_size=64", "--sample-tokens", "0",
               "--no-progress", "--threads", "1"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    read = next(line for line in out.out.splitlines() if line.startswith("data:"))
    for reason in ("documents", "binary", "empty", "unreadable", "symlink loop", "bad records", "invalid utf8",
                   "ignored"):
        count = expected[reason.replace(" ", "_")]
        assert f"{count} {reason}" in read, (reason, read)
    assert "replacement characters" in out.err  # the BPE decodes invalid UTF-8 with U+FFFD, and says so
    assert time.perf_counter() - t0 < 120


@pytest.mark.parametrize("text", ["a" * 1_000_000, "".join(random.Random(1).choice("ab") for _ in range(1_000_000)),
                                  " " * 1_000_000 + "x"])
def test_bpe_training_on_one_huge_run_is_fast_and_lossless(text):
    """One 1 MB run without whitespace took the BPE trainer over 5 minutes before runs were cut to 1 KB."""
    t0 = time.perf_counter()
    tok = train_bpe([text], 300)
    assert time.perf_counter() - t0 < 30
    assert tok.decode(tok.encode(text)) == text


def test_nothing_usable_is_one_line(tmp_path, capsys, monkeypatch):
    cases = {
        "junk": ({"a.txt": b"", "b.txt": b"\x00\x01", "c.md": "other suffix"}, "no usable text under"),
        "late_nul": ({"a.txt": b"x" * 9000 + b"\x00", "b.txt": b"y" * 9000 + b"\x00"}, "has no readable document"),
        "records": ({"a.jsonl": "{bad\n[1, 2]\n" + json.dumps({"text": 3}) + "\n"}, "bad records"),
        "locked": ({"a.txt": "secret", "b.txt": "also secret"}, "2 unreadable"),
    }
    real = reading._read_bytes

    def read(path, limit=-1):
        if "/locked/" in path:
            raise PermissionError(13, "Permission denied", path)
        return real(path, limit)

    monkeypatch.setattr(reading, "_read_bytes", read)
    for name, (files, message) in cases.items():
        write_files(tmp_path / name, files)
        rc = main(["train", "--data", str(tmp_path / name), "--output", str(tmp_path / f"run-{name}"),
                   "--cache-dir", str(tmp_path / "cache"), "--steps", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and "Traceback" not in "".join(err), (name, err)
        assert message in err[-1] and err[-1].startswith("blockstate train: error: "), (name, err)
        assert not (tmp_path / f"run-{name}" / "run.json").exists()  # a failed start leaves no run behind
    os.symlink("self", tmp_path / "self")
    with pytest.raises(DataError, match="broken symlink"):
        load_corpus(tmp_path / "self")


def test_a_damaged_token_cache_is_rebuilt(tmp_path, caplog):
    write_corpus(tmp_path / "c", n_docs=4)
    corpus = load_corpus(tmp_path / "c", holdout=(0.0, 0.0))
    tok = build_tokenizer("bytes")
    first = np.array(tokenize_split(corpus, tok, "train", tmp_path / "cache").tokens)
    (cached,) = (tmp_path / "cache" / "tokens").glob("*-train-*")
    tokens = cached / "tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[: tokens.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, "blockstate.data"):
        again = tokenize_split(corpus, tok, "train", tmp_path / "cache")
    assert "is damaged" in caplog.text and np.array_equal(np.array(again.tokens), first)
    (cached / "meta.json").write_text("{")
    assert np.array_equal(np.array(tokenize_split(corpus, tok, "train", tmp_path / "cache").tokens), first)
