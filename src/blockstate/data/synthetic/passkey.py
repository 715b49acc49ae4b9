"""Passkey retrieval (Landmark Attention's test, Mohtashami and Jaggi 2023), with the distance counted in blocks.

Landmark's prompt is repeated filler ("The grass is green. The sky is blue. ..."), a line "The pass key is
71432." somewhere, and at the end "What is the pass key? The pass key is"; the model must continue with the
number. Here the text is word tokens (one token per word, per punctuation mark and per digit), and the answer's
digits are scored with teacher forcing, an example counting only when every digit is right (exactly what greedy
decoding would return). Landmark's second sentence "Remember it. 71432 is the pass key." is left out so that a
passkey one block back still fits in front of the question at small block sizes.

The default passkey is ONE digit (chance: 10%), not Landmark's five: models trained from scratch at CPU budgets
(D = 64, a few hundred steps) do not learn to copy several digits in order (measured here: full attention learns
one digit in ~200 steps of 16 x 320 tokens, and two digits are still at 40% per digit after 400), and the test is
about how far back the number sits, not about copying. ``digits=5`` is Landmark's setting.

Distance: each scored position (the token before answer digit j) sits exactly ``k * block_size`` tokens after
passkey digit j, so the passkey is exactly k blocks back from where it is needed, at every digit and for any
alignment of the row to the blocks. Training rows place the passkey at a log-uniform random distance from the
shortest possible up to the longest that fits in the training length: every scale (1, 2, 4, ... blocks) gets the
same share of training, and near passkeys are common, as near queries are in Zoology's power law (measured: full
attention then learns the task in ~200 steps instead of ~75% after 500 with uniform distances). Test sets hold
one distance each (``distances``, in blocks), at the training length where it fits and at one longer length that
fits the largest distance (every distance is also tested there, which separates "too far back" from "longer than
trained").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import TEST_STREAM, SyntheticSet, SyntheticTask, empty_set, register_task, rng_for

FILLER = "the grass is green . the sky is blue . the sun is yellow . here we go . there and back again .".split()
KEY_PREFIX = "the pass key is".split()  # then the digits, then "."
QUESTION = "what is the pass key ? the pass key is".split()  # then the answer digits
WORDS = list(dict.fromkeys(FILLER + KEY_PREFIX + ["."] + QUESTION))
DIGITS = [str(d) for d in range(10)]


@register_task
@dataclass
class Passkey(SyntheticTask):
    name = "passkey"
    score = "sequence"
    summary = "passkey retrieval (Landmark Attention), accuracy by distance in blocks"

    seq_len: int = 320  # 20 blocks of 16: a passkey 16 blocks back fits in training
    block_size: int = 16
    distances: tuple[int, ...] = (1, 2, 4, 8, 16, 64)
    digits: int = 1

    def chance(self) -> float:
        return 1 / (9 * 10 ** (self.digits - 1))  # no leading zero

    def tokens(self) -> list[str]:
        return ["<pad>", *WORDS, *DIGITS]

    def _ids(self, words: list[str]) -> np.ndarray:
        index = {t: i for i, t in enumerate(self.tokens())}
        return np.array([index[w] for w in words], dtype=np.int64)

    @property
    def min_distance(self) -> int:
        """Fewest tokens between a passkey digit and the position that must recall it: the rest of the passkey
        line (the later digits and ".") and the question stand in between."""
        return self.digits + len(QUESTION)

    def max_distance(self, length: int) -> int:
        """Most tokens back a passkey can sit in a row of ``length`` (its line must start at position >= 0)."""
        return length - self.digits - 1 - len(KEY_PREFIX)

    def validate(self) -> Passkey:
        super().validate()
        self._positive("block_size", "digits")
        if not self.distances or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.distances):
            raise ValueError("passkey option distances must be positive integers (blocks), got "
                             f"{list(self.distances)!r}")
        if self.max_distance(self.seq_len) < self.min_distance:
            raise ValueError(f"passkey seq_len {self.seq_len} cannot hold a passkey line and the question: use at "
                             f"least {self.min_distance + self.digits + 1 + len(KEY_PREFIX)}")
        short = [k for k in self.distances if k * self.block_size < self.min_distance]
        if short:
            raise ValueError(f"passkey distance {short[0]} block(s) = {short[0] * self.block_size} tokens is shorter "
                             f"than the passkey line and question need ({self.min_distance} tokens): use a block "
                             f"size >= {-(-self.min_distance // short[0])} or drop that distance")
        return self

    def place(self, rng: np.random.Generator, distance: np.ndarray, length: int) -> SyntheticSet:
        """Rows of ``length`` whose passkey digit j sits ``distance[i]`` tokens before the position that must
        predict answer digit j."""
        n = len(distance)
        d = self.digits
        filler = self._ids(FILLER)
        phase = rng.integers(0, len(filler), size=n)
        ids, targets, dist = empty_set(n, length)
        ids[:] = filler[(phase[:, None] + np.arange(length)[None, :]) % len(filler)]
        key = rng.integers(0, 10, size=(n, d))
        key[:, 0] = rng.integers(1, 10, size=n)  # a d-digit number, as Landmark's randint: no leading zero
        key_ids = self._ids(DIGITS)[key]
        answer = length - d  # first answer digit; the question ends right before it
        scored = answer - 1 + np.arange(d)  # the position that predicts answer digit j
        question = self._ids(QUESTION)
        ids[:, answer - len(question):answer] = question
        ids[:, answer:] = key_ids
        prefix, stop = self._ids(KEY_PREFIX), self._ids(["."])
        rows = np.arange(n)
        start = scored[0] - distance  # passkey digit 0
        for j, t in enumerate(prefix):
            ids[rows, start - len(prefix) + j] = t
        ids[rows[:, None], start[:, None] + np.arange(d)[None, :]] = key_ids
        ids[rows, start + d] = stop[0]
        targets[:, scored] = key_ids
        dist[:, scored] = distance[:, None]
        return SyntheticSet(ids, targets, dist)

    def sample(self, rng: np.random.Generator, n: int, length: int | None = None) -> SyntheticSet:
        length = length or self.seq_len
        low, high = self.min_distance, self.max_distance(length)
        distance = np.exp(rng.uniform(np.log(low), np.log(high + 1), size=n)).astype(np.int64)
        return self.place(rng, np.clip(distance, low, high), length)

    def test_lengths(self) -> list[int]:
        """The training length, and, if some distance does not fit there, the shortest multiple of the block
        size that fits the largest."""
        lengths = [self.seq_len]
        need = max(self.distances) * self.block_size
        if need > self.max_distance(self.seq_len):
            extra = self.digits + 1 + len(KEY_PREFIX)
            lengths.append(-(-(need + extra) // self.block_size) * self.block_size)
        return lengths

    def test_sets(self, seed: int, n: int) -> list[SyntheticSet]:
        out = []
        for length in self.test_lengths():
            for k in sorted(set(self.distances)):
                tokens = k * self.block_size
                if tokens > self.max_distance(length):
                    continue
                rng = rng_for(seed, TEST_STREAM, length, k)
                name = f"d={k}" if length == self.seq_len else f"d={k} @{length}"
                out.append(self.place(rng, np.full(n, tokens), length).named(name, length=length, distance_blocks=k))
        return out
