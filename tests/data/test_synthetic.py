"""Synthetic tasks (blockstate.data.synthetic): generators are deterministic, every answer is right by construction
(checked here independently of the generators), masks cover the answers only, bad options name the problem.
The benchmark that trains on them (``blockstate synthetic``): tests/benchmarks/test_synthetic.py."""

import statistics

import numpy as np
import pytest

from blockstate.data import IGNORE_INDEX
from blockstate.data.synthetic import SyntheticSet, hf_labels, make_task, task_names
from blockstate.data.synthetic.passkey import KEY_PREFIX, QUESTION

SMALL = {"mqar": dict(seq_len=64, num_kv_pairs=4, vocab_size=32), "passkey": dict(seq_len=128, distances=(1, 2, 4, 16)),
         "copy": dict(seq_len=48, num_tokens=6), "induction": dict(seq_len=40, vocab_size=10),
         "listops": dict(min_length=20, max_length=120, max_depth=5, max_args=5)}


def same(a: SyntheticSet, b: SyntheticSet) -> bool:
    return all(np.array_equal(x, y) for x, y in ((a.input_ids, b.input_ids), (a.targets, b.targets),
                                                 (a.distance, b.distance)))


@pytest.mark.parametrize("name", task_names())
def test_generators_are_deterministic_and_masks_mark_the_answers(name):
    task = make_task(name, **SMALL[name])
    a, b = task.train_batch(3, 5, 6), task.train_batch(3, 5, 6)
    assert same(a, b) and not same(a, task.train_batch(3, 6, 6)) and not same(a, task.train_batch(4, 5, 6))
    tests, again = task.test_sets(3, 5), task.test_sets(3, 5)
    assert len(tests) == len(again) and all(same(x, y) and x.name == y.name for x, y in zip(tests, again))
    assert not any(t.length == a.length and same(t, task.sample(np.random.default_rng(0), 5)) for t in tests)
    for data in (a, *tests):
        assert data.input_ids.dtype == np.int64 and data.input_ids.min() >= 0
        assert data.input_ids.max() < task.vocab_size and data.targets[data.mask].max() < task.vocab_size
        assert (data.mask == (data.distance >= 0)).all()  # a distance exactly where something is scored
        assert data.mask.any(axis=1).all()
    labels = hf_labels(a.targets)  # the Hugging Face form is the same answers, shifted by one
    assert (labels[:, 1:] == a.targets[:, :-1]).all() and (labels[:, 0] == IGNORE_INDEX).all()


def test_mqar_every_query_asks_for_the_value_paired_with_its_key():
    task = make_task("mqar", seq_len=128, num_kv_pairs=8, vocab_size=64)
    data = task.train_batch(0, 0, 32)
    half, kv = 32, 8
    for ids, targets, dist in zip(data.input_ids, data.targets, data.distance):
        keys, values = ids[0:2 * kv:2], ids[1:2 * kv:2]
        assert len(set(keys)) == kv and len(set(values)) == kv
        assert ((1 <= keys) & (keys < half)).all() and ((half <= values) & (values < 64)).all()
        scored = np.flatnonzero(targets != IGNORE_INDEX)
        assert len(scored) == kv and scored.min() >= 2 * kv and (scored % 2 == 0).all()
        assert sorted(ids[scored]) == sorted(keys)  # every key asked once
        pairs = dict(zip(keys, values))
        for q in scored:
            assert targets[q] == pairs[ids[q]]
            assert ids[q - dist[q]] == targets[q] and ids[q - dist[q] - 1] == ids[q]  # the value, after its key
    # Zoology's power law puts most queries in the first slots after the pairs
    gaps = (np.flatnonzero(task.train_batch(0, 1, 256).mask.ravel()) % 128 - 16) // 2
    assert np.median(gaps) < 56 / 2


def test_passkey_distance_in_blocks_is_exact_and_the_answer_is_the_passkey():
    task = make_task("passkey", seq_len=256, block_size=16, distances=(1, 2, 4, 8, 64), digits=5)
    sets = task.test_sets(0, 8)
    assert {(s.info["distance_blocks"], s.length) for s in sets} == {
        *((k, 256) for k in (1, 2, 4, 8)), *((k, 1040) for k in (1, 2, 4, 8, 64))}
    vocab = task.tokens()
    digits = {vocab.index(str(d)) for d in range(10)}
    for data in [*sets, task.train_batch(0, 0, 16)]:
        k = data.info.get("distance_blocks")
        for ids, targets, dist in zip(data.input_ids, data.targets, data.distance):
            scored = np.flatnonzero(targets != IGNORE_INDEX)
            assert list(scored) == list(range(data.length - 6, data.length - 1))  # before each answer digit
            answer = ids[-5:]
            assert list(targets[scored]) == list(answer) and ids[-6] == vocab.index("is")
            assert [vocab[i] for i in ids[-5 - len(QUESTION):-5]] == QUESTION
            where = [i for i in np.flatnonzero(np.isin(ids, list(digits))) if i < data.length - 5]
            assert len(where) == 5 and list(ids[where]) == list(answer)  # the passkey appears once before
            assert [vocab[i] for i in ids[where[0] - len(KEY_PREFIX):where[0]]] == KEY_PREFIX
            for j, s in enumerate(scored):
                assert s - dist[s] == where[j]
                if k is not None:
                    assert dist[s] == k * 16 and s // 16 - where[j] // 16 == k  # exactly k blocks back
    with pytest.raises(ValueError, match="block size >= 15"):
        make_task("passkey", block_size=4, distances=(1, 2, 4), digits=5)
    with pytest.raises(ValueError, match="distances must be positive"):
        make_task("passkey", distances=(0, 2))


def test_copy_and_induction_answers():
    task = make_task("copy", seq_len=64, num_tokens=8, vocab_size=10)
    data = task.train_batch(1, 0, 16)
    for ids, targets in zip(data.input_ids, data.targets):
        delimiter = int(np.flatnonzero(ids == 1)[0])
        scattered = [t for t in ids[:delimiter] if t != 0]
        scored = np.flatnonzero(targets != IGNORE_INDEX)
        assert list(scored) == list(range(delimiter, 64)) and list(targets[scored]) == scattered
        assert list(ids[delimiter + 1:]) == scattered[:-1]  # teacher forcing
    task = make_task("induction", seq_len=50, vocab_size=12)
    for data in task.test_sets(2, 8):
        for ids, targets in zip(data.input_ids, data.targets):
            triggers = np.flatnonzero(ids == 11)
            assert len(triggers) == 2 and triggers[1] == data.length - 1
            assert np.flatnonzero(targets != IGNORE_INDEX).tolist() == [data.length - 1]
            assert targets[-1] == ids[triggers[0] + 1]
    assert [s.length for s in task.test_sets(0, 2)] == [50, 200]


def listops_value(tokens: list[str]) -> tuple[int, int, int]:
    """An independent evaluator (a stack machine over the rendered tokens): (value, depth, most arguments)."""
    ops = {"[MIN": min, "[MAX": max, "[MED": lambda v: int(statistics.median(v) // 1), "[SM": lambda v: sum(v) % 10}
    stack: list[tuple[str, list[int]]] = []
    depth = widest = 0
    result = None
    for t in tokens:
        if t in ops:
            stack.append((t, []))
            depth = max(depth, len(stack))
        elif t == "]":
            op, args = stack.pop()
            widest = max(widest, len(args))
            value = ops[op](args)
            if stack:
                stack[-1][1].append(value)
            else:
                result = value
        else:
            assert stack, tokens
            stack[-1][1].append(int(t))
    assert not stack and result is not None
    return result, depth, widest


@pytest.mark.parametrize("options", [SMALL["listops"], {}], ids=["small", "lra"])
def test_listops_answers_match_an_independent_evaluator(options):
    task = make_task("listops", **options)
    data = task.train_batch(0, 0, 24 if options else 4)
    vocab = task.tokens()
    for ids, targets in zip(data.input_ids, data.targets):
        words = [vocab[i] for i in ids]
        end = words.index("=")
        assert task.min_length < end < task.max_length and all(w == "<pad>" for w in words[end + 2:])
        value, depth, widest = listops_value(words[:end])
        assert depth <= task.max_depth and widest <= task.max_args
        assert np.flatnonzero(targets != IGNORE_INDEX).tolist() == [end] and vocab[targets[end]] == str(value)
        assert words[end + 1] == str(value)


def test_bad_task_options_name_the_problem():
    for name, options, message in [("nosuch", {}, "unknown synthetic task"),
                                   ("mqar", {"kv": 3}, "has no option 'kv'"),
                                   ("mqar", {"seq_len": 65}, "must be even"),
                                   ("mqar", {"seq_len": 32, "num_kv_pairs": 16}, "seq_len >= 4 \\* num_kv_pairs"),
                                   ("mqar", {"vocab_size": 16}, "raise vocab_size"),
                                   ("mqar", {"num_kv_pairs": "8"}, "must be an integer"),
                                   ("copy", {"seq_len": 20, "num_tokens": 10}, "seq_len >= 2 \\* num_tokens"),
                                   ("induction", {"test_factors": (1, 0)}, "test_factors"),
                                   ("listops", {"min_length": 100, "max_length": 50}, "min_length < max_length"),
                                   ("listops", {"max_depth": 2, "max_args": 3}, "never reach")]:
        with pytest.raises(ValueError, match=message):
            make_task(name, **options)
