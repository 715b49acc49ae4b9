"""Token caches, segments, training loaders (order, sharding, resume, lanes) and evaluation batches."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from helpers.data import EOS, doc_of, targets, text_corpus, unique_split, write_files
from hypothesis import given, settings
from hypothesis import strategies as st

from blockstate.data import (
    IGNORE_INDEX,
    BytesTokenizer,
    DataError,
    SegmentLoader,
    bits_per_byte,
    build_tokenizer,
    eval_batches,
    load_corpus,
    segment_table,
    tokenize_split,
)

LENGTHS = [1, 3, 7, 8, 9, 15, 16, 17, 40, 2, 0, 5, 31, 64, 12]  # around multiples of L-1 = 7, plus 0 and 1


def all_tokens(data) -> list[int]:
    return sorted(int(t) for i in range(data.num_documents) for t in data.document(i))


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- token cache

def test_tokenize_split_cache(tmp_path, monkeypatch):
    corpus = load_corpus(text_corpus(tmp_path / "c"))
    tok = build_tokenizer("bytes")
    data = tokenize_split(corpus, tok, "train", tmp_path / "cache")
    assert data.tokens.dtype == np.uint16 and isinstance(data.tokens, np.memmap)
    raw = dict(corpus.iter_documents("train"))
    assert data.num_documents == len(raw) and data.num_bytes == sum(map(len, raw.values()))
    assert [bytes(d.astype(np.uint8)) for d, _ in data.documents()] == list(raw.values())
    assert all(data.tokens[o] == tok.eos_id for o in data.offsets[:-1])
    monkeypatch.setattr(type(corpus), "iter_documents", lambda *a: pytest.fail("cache not used"))
    again = tokenize_split(load_corpus(tmp_path / "c"), tok, "train", tmp_path / "cache")
    assert np.array_equal(again.tokens, data.tokens) and np.array_equal(again.doc_bytes, data.doc_bytes)
    assert not [p for p in (tmp_path / "cache" / "tokens").iterdir() if p.name.startswith(".tmp")]


def test_cache_key_changes_with_files_and_tokenizer(tmp_path):
    root = write_files(tmp_path / "c", {"a.txt": "one", "b.txt": "two", "c.txt": "three"})
    tok = BytesTokenizer()
    first = tokenize_split(load_corpus(root, holdout=(0, 0)), tok, "train", tmp_path / "cache")
    (root / "a.txt").write_text("one, edited")
    second = tokenize_split(load_corpus(root, holdout=(0, 0)), tok, "train", tmp_path / "cache")
    assert second.num_bytes == first.num_bytes + len(", edited")
    bpe = build_tokenizer("bpe", load_corpus(text_corpus(tmp_path / "t")), vocab_size=300, cache_dir=tmp_path)
    assert tokenize_split(load_corpus(root, holdout=(0, 0)), bpe, "train", tmp_path / "cache").eos_id == 0
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 3


# ---------------------------------------------------------------- segments

@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=12), st.integers(2, 12), st.sampled_from([0, 1]))
def test_segments_cover_every_token_once_without_mixing(lengths, seq_len, overlap):
    data = unique_split(lengths)
    starts, lens = segment_table(data, seq_len, overlap)
    batch_targets, seen = [], Counter()
    for s, n in zip(starts, lens):
        seg = data.tokens[s:s + n]
        real = [int(t) for t in seg if t != EOS]
        assert len({doc_of(data, t) for t in real}) <= 1  # never two documents
        assert len(seg) >= 2 and 1 <= n <= seq_len
        seen.update(int(t) for t in seg[1:])
        batch_targets.append(seg)
    if overlap == 1:
        assert sorted(seen.elements()) == all_tokens(data)  # every real token a target exactly once
    else:
        assert set(seen) <= set(all_tokens(data)) and max(seen.values(), default=1) == 1


def test_short_documents_are_padded_and_masked():
    data = unique_split([3, 20])
    batch = next(SegmentLoader(data, 8, 4, shuffle=False))
    row = batch["input_ids"][0].tolist()
    assert row[:4] == [EOS, 1, 2, 3] and row[4:] == [0] * 4
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 1, 2, 3] + [IGNORE_INDEX] * 4
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert batch["input_ids"].shape == (4, 8)
    assert set(batch) == {"input_ids", "labels"}
    padded = 1 - (4 + 8 + 8 + 7) / 32  # segments [EOS 1 2 3], [EOS 4..10], [10..17], [17..23]
    assert SegmentLoader(data, 8, 4).padding_fraction == pytest.approx(padded)
    assert SegmentLoader(data, 8, 4, contiguous=True).padding_fraction == pytest.approx(padded)
    assert SegmentLoader(data, 8, 4, packing=True).padding_fraction < 0.25


def test_one_epoch_of_the_loader_scores_every_token_once():
    data = unique_split(LENGTHS)
    loader = SegmentLoader(data, 8, 1, seed=3)
    got = [t for b in take(loader, loader.num_samples) for t in targets(b)]
    assert sorted(got) == all_tokens(data) and loader.epoch == 1
    again = [t for b in take(SegmentLoader(data, 8, 1, seed=3), loader.num_samples) for t in targets(b)]
    other = [t for b in take(SegmentLoader(data, 8, 1, seed=4), loader.num_samples) for t in targets(b)]
    assert got == again and got != other  # order fixed by the seed
    nxt = [t for b in take(loader, loader.num_samples) for t in targets(b)]
    assert sorted(nxt) == all_tokens(data) and nxt != got  # next epoch: reshuffled


def test_packing_masks_document_boundaries():
    data = unique_split([3, 5, 2, 9, 4])
    loader = SegmentLoader(data, 6, 1, packing=True, shuffle=False)
    batches = take(loader, loader.num_samples)
    assert sorted(t for b in batches for t in targets(b)) == all_tokens(data)
    mixed = 0
    for b in batches:
        x, y = b["input_ids"][0], b["labels"][0]
        assert torch.all(y[x == EOS] == IGNORE_INDEX)  # the separator is never a target
        real = [int(t) for t in x if t not in (EOS, 0)]
        mixed += len({doc_of(data, t) for t in real}) > 1
    assert mixed > 0  # packing does join documents
    assert int((batches[-1]["labels"] == IGNORE_INDEX).sum()) >= 1


# ---------------------------------------------------------------- determinism, sharding, resume

MODES = [dict(), dict(packing=True), dict(contiguous=True), dict(shuffle=False)]


@pytest.mark.parametrize("mode", MODES, ids=["segments", "packed", "contiguous", "ordered"])
def test_sharding_matches_single_process(mode):
    data = unique_split(LENGTHS * 3)
    single = SegmentLoader(data, 8, 6, seed=7, **mode)
    ranks = [SegmentLoader(data, 8, 2, seed=7, rank=r, world_size=3, **mode) for r in range(3)]
    for _ in range(25):  # > one epoch of the segment modes
        full = next(single)
        parts = [next(r) for r in ranks]
        for k in full:
            assert torch.equal(full[k], torch.cat([p[k] for p in parts]))


@pytest.mark.parametrize("mode", MODES, ids=["segments", "packed", "contiguous", "ordered"])
def test_resume_reproduces_the_uninterrupted_run(mode):
    data = unique_split(LENGTHS * 2)
    run = SegmentLoader(data, 8, 3, seed=11, **mode)
    reference = take(run, 30)
    for k in (0, 1, 9, 17):
        loader = SegmentLoader(data, 8, 3, seed=11, **mode)
        take(loader, k)
        state = json.loads(json.dumps(loader.state_dict()))  # plain JSON
        resumed = SegmentLoader(data, 8, 3, seed=11, **mode)
        resumed.load_state_dict(state)
        assert all(same(a, b) for a, b in zip(take(resumed, 30 - k), reference[k:]))


def test_resume_refuses_other_settings():
    data = unique_split(LENGTHS)
    state = SegmentLoader(data, 8, 2, seed=1).state_dict()
    with pytest.raises(DataError, match="seq_len=8 .*this loader: 16"):
        SegmentLoader(data, 16, 2, seed=1).load_state_dict(state)
    state = SegmentLoader(data, 8, 2, contiguous=True).state_dict()
    with pytest.raises(DataError, match="lanes"):
        SegmentLoader(data, 8, 3, contiguous=True).load_state_dict(state)


def test_contiguous_lanes_walk_documents_in_order():
    data = unique_split(LENGTHS * 2)
    loader = SegmentLoader(data, 8, 4, seed=5, contiguous=True)
    current: list[list[int]] = [[] for _ in range(4)]
    finished = []
    last: list[int | None] = [None] * 4
    for step in range(200):
        batch = next(loader)
        assert set(batch) == {"input_ids", "labels", "reset"} and batch["reset"].dtype == torch.bool
        for j in range(4):
            x, reset = batch["input_ids"][j], bool(batch["reset"][j])
            if step == 0:
                assert reset
            if reset:
                assert int(x[0]) == EOS
                if current[j]:
                    finished.append(current[j])
                current[j] = []
            else:
                assert int(x[0]) == last[j]  # continues the same document (overlap of one token)
            real = [int(t) for t in x if t not in (EOS, 0)]
            assert len({doc_of(data, t) for t in real}) <= 1
            current[j] += [int(t) for t in batch["labels"][j, 1:] if t != IGNORE_INDEX]
            last[j] = int(x[x != 0][-1])  # last input that is not padding (real tokens are >= 1)
    docs = {tuple(int(t) for t in data.document(i)) for i in range(data.num_documents)}
    assert len(finished) > data.num_documents  # more than an epoch
    assert all(tuple(f) in docs for f in finished)  # every finished lane document is complete and in order


def test_loader_argument_errors():
    data = unique_split([5])
    with pytest.raises(DataError, match="packing=True and contiguous=True"):
        SegmentLoader(data, 8, 1, packing=True, contiguous=True)
    with pytest.raises(DataError, match="rank 2"):
        SegmentLoader(data, 8, 1, rank=2, world_size=2)
    with pytest.raises(DataError, match="no tokens"):
        SegmentLoader(unique_split([0, 0]), 8, 1)


# ---------------------------------------------------------------- evaluation

@pytest.mark.parametrize("contiguous", [False, True])
def test_eval_batches_score_every_token_once(contiguous):
    data = unique_split(LENGTHS)
    batches = list(eval_batches(data, 8, 3, contiguous=contiguous))
    assert sorted(t for b in batches for t in targets(b)) == all_tokens(data)
    assert sum(len(targets(b)) for b in batches) == data.num_tokens
    assert all(b["input_ids"].shape == (3, 8) for b in batches)
    sharded = [list(eval_batches(data, 8, 1, contiguous=contiguous, rank=r, world_size=3)) for r in range(3)]
    assert len({len(s) for s in sharded}) == 1  # ranks stay in lockstep
    for k, b in enumerate(batches):
        assert torch.equal(b["labels"], torch.cat([s[k]["labels"] for s in sharded]))


def test_eval_documents_and_bits_per_byte(tmp_path):
    root = write_files(tmp_path / "c", {"a.txt": "héllo wörld", "b.txt": "x", "c.txt": "long " * 30})
    data = tokenize_split(load_corpus(root, holdout=(0, 0)), BytesTokenizer(), "train", tmp_path / "cache")
    docs = data.documents()
    assert [n for _, n in docs] == [len("héllo wörld".encode()), 1, 150]
    assert sum(len(t) for t, _ in docs) == data.num_tokens == data.num_bytes  # bytes: one token per byte
    scored = sum(len(targets(b)) for b in eval_batches(data, 16, 2))
    assert scored == data.num_tokens
    assert bits_per_byte(np.log(2) * 300, 300) == pytest.approx(1.0)
