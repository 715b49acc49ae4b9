"""Long Range Arena ListOps (Tay et al. 2021, ``lra_benchmarks/data/listops.py``) as next-token prediction.

LRA's generator: a node below ``max_depth`` is an operator with probability ``VALUE_P`` = 0.25 (else a digit),
an operator takes 2..``max_args`` arguments (each a new node one level deeper) and is one of MIN, MAX, MED
(``int(median)``), SM (sum mod 10); whole trees are drawn until one has between ``min_length`` and
``max_length`` tokens (both exclusive, as LRA), counting an operator as two tokens (``[MAX`` and ``]``) and a
digit as one. LRA renders it with parentheses that its input pipeline strips again; here it is rendered directly
without them: ``[MAX 2 9 [MIN 4 7 ] 0 ]``.

As a sequence task: the expression, then ``=``, then the answer digit; the ``=`` position is scored (a 10-way
classification read off the next-token logits), and rows are right-padded to the longest row of the set
(padding after the answer cannot change a causal model's prediction).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import TEST_STREAM, SyntheticSet, SyntheticTask, empty_set, register_task, rng_for

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END, EQUALS, PAD = "]", "=", "<pad>"
TOKENS = (PAD, *OPERATORS, END, EQUALS, *(str(d) for d in range(10)))
END_ID, EQUALS_ID, DIGIT_0 = TOKENS.index(END), TOKENS.index(EQUALS), TOKENS.index("0")
VALUE_P = 0.25
MAX_ATTEMPTS = 1_000_000


class _TooLong(Exception):
    pass


@register_task
@dataclass
class ListOps(SyntheticTask):
    name = "listops"
    summary = "LRA ListOps: nested MIN / MAX / MED / SM over digits, the answer digit predicted"

    min_length: int = 500
    max_length: int = 2000
    max_depth: int = 10
    max_args: int = 10

    def validate(self) -> ListOps:
        super().validate()
        self._positive("max_depth")
        self._positive("max_args", minimum=2)
        if not 1 <= self.min_length < self.max_length - 1:
            raise ValueError(f"listops needs 1 <= min_length < max_length - 1 (lengths strictly between them), got "
                             f"min_length {self.min_length}, max_length {self.max_length}")
        # the largest tree: operators with max_args arguments down to max_depth, digits there
        most = 2 * sum(self.max_args ** d for d in range(self.max_depth - 1)) + self.max_args ** (self.max_depth - 1)
        if most <= self.min_length:
            raise ValueError(f"listops trees of max_depth {self.max_depth} and max_args {self.max_args} never reach "
                             f"min_length {self.min_length}: raise max_depth / max_args or lower min_length")
        return self

    @property
    def train_length(self) -> int:
        return self.max_length + 1  # the longest expression (max_length - 1 tokens), "=" and the answer

    def chance(self) -> float:
        return 0.1

    def tokens(self) -> list[str]:
        return list(TOKENS)

    def _tree(self, rng: np.random.Generator, depth: int, out: list[int], budget: int) -> int:
        """Append one node's tokens to ``out``; returns its value. Stops early (``_TooLong``) once the tree
        passes ``budget`` tokens: LRA would reject it anyway, and a deep tree can be huge."""
        if len(out) >= budget:
            raise _TooLong
        if depth >= self.max_depth or rng.random() > VALUE_P:
            value = int(rng.integers(0, 10))
            out.append(DIGIT_0 + value)
            return value
        count = int(rng.integers(2, self.max_args + 1))
        op = int(rng.integers(0, len(OPERATORS)))
        out.append(TOKENS.index(OPERATORS[op]))
        values = [self._tree(rng, depth + 1, out, budget) for _ in range(count)]
        out.append(END_ID)
        if op == 0:
            return min(values)
        if op == 1:
            return max(values)
        if op == 2:
            return int(np.median(values))  # LRA: int(np.median(...)), the mean of the middle two, truncated
        return sum(values) % 10

    def expression(self, rng: np.random.Generator) -> tuple[list[int], int]:
        """One accepted expression (token ids) and its value, by LRA's rejection sampling."""
        for _ in range(MAX_ATTEMPTS):
            out: list[int] = []
            try:
                value = self._tree(rng, 1, out, self.max_length)
            except _TooLong:
                continue
            if self.min_length < len(out) < self.max_length:
                return out, value
        raise ValueError(f"listops drew no tree with {self.min_length} < length < {self.max_length} in "
                         f"{MAX_ATTEMPTS:,} attempts: widen the length range")

    def sample(self, rng: np.random.Generator, n: int, length: int | None = None) -> SyntheticSet:
        rows = [self.expression(rng) for _ in range(n)]
        width = max(len(e) for e, _ in rows) + 2
        ids, targets, distance = empty_set(n, width)
        for i, (expr, value) in enumerate(rows):
            ids[i, :len(expr)] = expr
            ids[i, len(expr)] = EQUALS_ID
            ids[i, len(expr) + 1] = DIGIT_0 + value
            targets[i, len(expr)] = DIGIT_0 + value
            distance[i, len(expr)] = len(expr)  # the answer depends on the whole expression
        return SyntheticSet(ids, targets, distance)

    def test_sets(self, seed: int, n: int) -> list[SyntheticSet]:
        data = self.sample(rng_for(seed, TEST_STREAM, 0), n)
        return [data.named(f"{self.min_length}-{self.max_length} tokens", length=data.length)]
