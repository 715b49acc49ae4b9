"""Recall tasks over random tokens: multi-query associative recall, induction heads, selective copying."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import SyntheticSet, SyntheticTask, empty_set, register_task


def _distinct(rng: np.random.Generator, n: int, low: int, high: int, k: int) -> np.ndarray:
    """(n, k) ids from [low, high), distinct within each row, uniformly (a random permutation's first k)."""
    return rng.random((n, high - low)).argsort(axis=1)[:, :k].astype(np.int64) + low


def _weighted_distinct(rng: np.random.Generator, n: int, p: np.ndarray, k: int) -> np.ndarray:
    """(n, k) indices into ``p`` drawn without replacement with probabilities ``p`` (Gumbel top-k: the same law
    as numpy's sequential ``choice(replace=False, p=p)``, vectorised over rows)."""
    keys = np.log(p)[None, :] + rng.gumbel(size=(n, len(p)))
    return np.argsort(-keys, axis=1)[:, :k]


@register_task
@dataclass
class MQAR(SyntheticTask):
    """Multi-query associative recall as Zoology generates it (Arora et al. 2023,
    ``zoology/data/associative_recall.py::multiquery_ar``).

    A row starts with ``num_kv_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (keys distinct, from ids
    ``1 .. vocab_size//2 - 1``; values distinct, from ``vocab_size//2 .. vocab_size - 1``). The rest of the row
    is ``(seq_len - 2*num_kv_pairs) // 2`` slots of two tokens; every key is asked once, in the first token of
    a slot drawn without replacement with probability proportional to ``gap ** (power_a - 1)`` (gap 1, 2, ...;
    Zoology's power law, a = 0.01: near slots are much likelier). The model must predict the key's value at the
    query position; only those positions are scored. Every other token is uniform noise over the whole
    vocabulary (Zoology's ``random_non_queries``), and the value itself never follows its query in the input.

    Zoology's vocabulary is 8192; the default here is 1024 (the LM head over 8192 tokens would triple a step's
    cost at these widths). With noise over 1024 tokens a given key reappears as noise in ~18% of rows of 256
    tokens, a decoy the model must tell from the real pair (at 8192: ~2.5%).
    """

    name = "mqar"
    bin_by_distance = True
    summary = "multi-query associative recall (Zoology)"

    seq_len: int = 256
    num_kv_pairs: int = 16
    vocab_size: int = 1024
    power_a: float = 0.01
    random_non_queries: bool = True

    def validate(self) -> MQAR:
        super().validate()
        self._positive("num_kv_pairs")
        if self.seq_len % 2:
            raise ValueError(f"mqar option seq_len must be even (key-value pairs and query slots are two tokens), "
                             f"got {self.seq_len}")
        if self.seq_len < 4 * self.num_kv_pairs:
            raise ValueError(f"mqar needs seq_len >= 4 * num_kv_pairs (room for the pairs and one query per key), got "
                             f"seq_len {self.seq_len} with {self.num_kv_pairs} pairs: raise seq_len or lower "
                             "num_kv_pairs")
        if self.vocab_size // 2 - 1 < self.num_kv_pairs:
            raise ValueError(f"mqar vocab_size {self.vocab_size} has {self.vocab_size // 2 - 1} keys, fewer than "
                             f"num_kv_pairs {self.num_kv_pairs}: raise vocab_size to at least "
                             f"{2 * self.num_kv_pairs + 2}")
        if not 0 < self.power_a <= 1:
            raise ValueError(f"mqar option power_a must be in (0, 1], got {self.power_a}")
        return self

    def chance(self) -> float:
        return 1 / (self.vocab_size - self.vocab_size // 2)

    def tokens(self) -> list[str]:
        half = self.vocab_size // 2
        return ["_"] + [f"k{i}" for i in range(1, half)] + [f"v{i}" for i in range(self.vocab_size - half)]

    def sample(self, rng: np.random.Generator, n: int, length: int | None = None) -> SyntheticSet:
        length = length or self.seq_len
        kv, half = self.num_kv_pairs, self.vocab_size // 2
        context = 2 * kv
        keys = _distinct(rng, n, 1, half, kv)
        values = _distinct(rng, n, half, self.vocab_size, kv)
        space = (length - context) // 2
        p = self.power_a * np.arange(1, space + 1, dtype=np.float64) ** (self.power_a - 1)
        gaps = _weighted_distinct(rng, n, p / p.sum(), kv)  # query slot of key i
        ids, targets, distance = empty_set(n, length)
        ids[:, 0:context:2], ids[:, 1:context:2] = keys, values
        rows = np.arange(n)[:, None]
        query = context + 2 * gaps
        if self.random_non_queries:
            noise = rng.integers(0, self.vocab_size, size=(n, length - context))
            ids[:, context:] = noise
        ids[rows, query] = keys
        targets[rows, query] = values
        distance[rows, query] = query - (2 * np.arange(kv) + 1)[None, :]  # back to the value's position
        return SyntheticSet(ids, targets, distance)

    def test_sets(self, seed: int, n: int) -> list[SyntheticSet]:
        from .base import TEST_STREAM, rng_for

        return [self.sample(rng_for(seed, TEST_STREAM, 0), n).named("all", length=self.seq_len)]


@register_task
@dataclass
class Induction(SyntheticTask):
    """Induction-head copying (the safari / H3 synthetic): random tokens, a trigger token followed by a value
    somewhere, and the trigger again as the last token; the model must predict the value there (one scored
    token per row). Tested at each ``test_factors`` multiple of the training length (length generalisation).
    """

    name = "induction"
    summary = "induction head: predict the token that followed the trigger"

    seq_len: int = 256
    vocab_size: int = 32
    test_factors: tuple[int, ...] = (1, 4)

    def validate(self) -> Induction:
        super().validate()
        self._positive("seq_len", minimum=4)
        self._positive("vocab_size", minimum=3)
        _check_factors(self)
        return self

    def chance(self) -> float:
        return 1 / (self.vocab_size - 1)

    def tokens(self) -> list[str]:
        return [f"t{i}" for i in range(self.vocab_size - 1)] + ["TRIGGER"]

    def sample(self, rng: np.random.Generator, n: int, length: int | None = None) -> SyntheticSet:
        length = length or self.seq_len
        trigger = self.vocab_size - 1
        ids = rng.integers(0, trigger, size=(n, length)).astype(np.int64)  # never the trigger
        _, targets, distance = empty_set(n, length)
        rows = np.arange(n)
        where = rng.integers(0, length - 2, size=n)  # the value at where + 1 <= length - 2
        ids[rows, where] = trigger
        ids[:, -1] = trigger
        targets[:, -1] = ids[rows, where + 1]
        distance[:, -1] = (length - 1) - (where + 1)
        return SyntheticSet(ids, targets, distance)

    def test_sets(self, seed: int, n: int) -> list[SyntheticSet]:
        return _sets_at_factors(self, seed, n)


@register_task
@dataclass
class SelectiveCopy(SyntheticTask):
    """Selective copying (Gu and Dao 2023, the Mamba paper): ``num_tokens`` data tokens scattered at random
    positions among noise tokens, then a delimiter; the model must reproduce the data tokens in order after it
    (teacher forcing: each scored position sees the previous data tokens, as greedy decoding would)."""

    name = "copy"
    summary = "selective copying (Mamba)"

    seq_len: int = 256
    num_tokens: int = 16
    vocab_size: int = 18
    test_factors: tuple[int, ...] = (1,)

    NOISE, DELIMITER = 0, 1

    def validate(self) -> SelectiveCopy:
        super().validate()
        self._positive("num_tokens")
        self._positive("vocab_size", minimum=3)
        if self.seq_len < 2 * self.num_tokens + 1:
            raise ValueError(f"copy needs seq_len >= 2 * num_tokens + 1, got seq_len {self.seq_len} with "
                             f"{self.num_tokens} tokens: raise seq_len or lower num_tokens")
        _check_factors(self)
        return self

    def chance(self) -> float:
        return 1 / (self.vocab_size - 2)

    def tokens(self) -> list[str]:
        return ["·", "|"] + [f"d{i}" for i in range(self.vocab_size - 2)]

    def sample(self, rng: np.random.Generator, n: int, length: int | None = None) -> SyntheticSet:
        length = length or self.seq_len
        k = self.num_tokens
        context = length - k  # data tokens sit in [0, context), the delimiter at context, the answers after it
        ids, targets, distance = empty_set(n, length, fill=self.NOISE)
        rows = np.arange(n)[:, None]
        positions = np.sort(_distinct(rng, n, 0, context, k), axis=1)
        data = rng.integers(2, self.vocab_size, size=(n, k)).astype(np.int64)
        ids[rows, positions] = data
        ids[:, context] = self.DELIMITER
        ids[:, context + 1:] = data[:, :-1]
        answer = context + np.arange(k)[None, :]  # the delimiter predicts data 0, data j predicts data j + 1
        targets[rows, answer] = data
        distance[rows, answer] = answer - positions
        return SyntheticSet(ids, targets, distance)

    def test_sets(self, seed: int, n: int) -> list[SyntheticSet]:
        return _sets_at_factors(self, seed, n)


def _check_factors(task: SyntheticTask) -> None:
    factors = task.test_factors  # type: ignore[attr-defined]
    if not factors or any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in factors):
        raise ValueError(f"{task.name} option test_factors must be positive integers (multiples of seq_len), got "
                         f"{list(factors)!r}")


def _sets_at_factors(task: SyntheticTask, seed: int, n: int) -> list[SyntheticSet]:
    from .base import TEST_STREAM, rng_for

    out = []
    for f in dict.fromkeys(task.test_factors):  # type: ignore[attr-defined]
        length = f * task.train_length
        out.append(task.sample(rng_for(seed, TEST_STREAM, length), n, length).named(f"L={length}", length=length))
    return out
