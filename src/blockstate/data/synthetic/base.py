"""What every synthetic task shares: the example format, seeding, option validation and the task registry.

Example format (one :class:`SyntheticSet`): ``input_ids`` (N, L) and ``targets`` (N, L), aligned with the logits:
the logits at position t of row i must predict ``targets[i, t]`` wherever it is not ``IGNORE_INDEX`` (-100).
So the answer mask is ``targets != IGNORE_INDEX`` and the loss is ``cross_entropy(logits, targets,
ignore_index=-100)`` with no shift (Zoology's convention; the Hugging Face ``labels`` are the same thing shifted
right by one, see :func:`hf_labels`). ``distance`` (N, L) holds, at every scored position, how many tokens back
the fact it needs sits (the value of a key, the passkey digit...), and -1 elsewhere, so reports can bin accuracy
by distance in blocks.

Determinism: every random draw comes from ``numpy.random.default_rng((seed, stream, index))``; training batch
``step`` uses stream 0 and index ``step`` (any step can be regenerated on its own, so a resumed or shortened run
sees the same data), test set ``k`` uses stream 1 and index ``k``. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..segments import IGNORE_INDEX

TRAIN_STREAM, TEST_STREAM = 0, 1


@dataclass
class SyntheticSet:
    """N examples of one task at one length; ``name`` labels its column in reports, ``info`` its coordinates."""

    input_ids: np.ndarray  # (N, L) int64
    targets: np.ndarray  # (N, L) int64, IGNORE_INDEX where nothing is scored
    distance: np.ndarray  # (N, L) int64, tokens back to the needed fact at scored positions, -1 elsewhere
    name: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shapes = {self.input_ids.shape, self.targets.shape, self.distance.shape}
        if len(shapes) != 1 or self.input_ids.ndim != 2:
            raise ValueError(f"input_ids, targets and distance must share one (N, L) shape, got {sorted(shapes)}")

    @property
    def mask(self) -> np.ndarray:
        """(N, L) bool: the scored positions."""
        return self.targets != IGNORE_INDEX

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def named(self, name: str, **info: Any) -> SyntheticSet:
        """Label this set's report column (and its coordinates, e.g. ``length``, ``distance_blocks``)."""
        self.name, self.info = name, {**self.info, **info}
        return self

    def batches(self, batch_size: int) -> Iterator[SyntheticSet]:
        for start in range(0, len(self), batch_size):
            sl = slice(start, start + batch_size)
            yield SyntheticSet(self.input_ids[sl], self.targets[sl], self.distance[sl], self.name, self.info)


def hf_labels(targets: np.ndarray) -> np.ndarray:
    """The Hugging Face ``labels`` of ``targets`` (the model shifts them left by one inside its loss)."""
    labels = np.full_like(targets, IGNORE_INDEX)
    labels[:, 1:] = targets[:, :-1]
    return labels


def rng_for(seed: int, stream: int, *index: int) -> np.random.Generator:
    """The generator of one batch or test set: independent of every other (seed, stream, index)."""
    return np.random.default_rng((int(seed), stream, *(int(i) for i in index)))


def empty_set(n: int, length: int, fill: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrays for ``n`` examples of ``length``: inputs filled with ``fill``, nothing scored yet."""
    return (np.full((n, length), fill, dtype=np.int64), np.full((n, length), IGNORE_INDEX, dtype=np.int64),
            np.full((n, length), -1, dtype=np.int64))


@dataclass
class SyntheticTask:
    """Base class: a dataclass of options (validated by :meth:`validate`) that generates examples.

    Subclasses set ``name``, ``score`` (``"token"``: accuracy over scored tokens; ``"sequence"``: an example
    counts only if every scored token is right, i.e. greedy decoding returns the whole answer) and
    ``bin_by_distance`` (reports also split the accuracy by distance in blocks), and implement
    :meth:`tokens`, :meth:`sample` and :meth:`test_sets`.
    """

    name: ClassVar[str] = ""
    score: ClassVar[str] = "token"
    bin_by_distance: ClassVar[bool] = False
    summary: ClassVar[str] = ""

    def tokens(self) -> list[str]:
        """The vocabulary: ``tokens()[i]`` is token id i (its length is the models' ``vocab_size``)."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        return len(self.tokens())

    @property
    def train_length(self) -> int:
        return int(self.seq_len)  # type: ignore[attr-defined]

    def sample(self, rng: np.random.Generator, n: int, length: int | None = None) -> SyntheticSet:
        """``n`` fresh training-distribution examples (at ``length``, default the training length)."""
        raise NotImplementedError

    def test_sets(self, seed: int, n: int) -> list[SyntheticSet]:
        """The held-out sets, one per report column (drawn from the test stream, never from training's)."""
        return [self.sample(rng_for(seed, TEST_STREAM, 0), n).named(f"L={self.train_length}", length=self.train_length)]

    def train_batch(self, seed: int, step: int, batch_size: int) -> SyntheticSet:
        """Training batch number ``step``: a pure function of (options, seed, step)."""
        return self.sample(rng_for(seed, TRAIN_STREAM, step), batch_size)

    def chance(self) -> float:
        """The accuracy of guessing uniformly among the possible answers (the floor of the report's tables)."""
        return float("nan")

    def decode(self, ids: np.ndarray | list[int]) -> str:
        vocab = self.tokens()
        return " ".join(vocab[int(i)] for i in ids)

    def options(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def validate(self) -> SyntheticTask:
        """Raise ValueError naming the option and the fix; returns self."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(f.default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"{self.name} option {f.name} must be true or false, got {value!r}")
            elif isinstance(f.default, int) and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{self.name} option {f.name} must be an integer, got {value!r}")
            elif isinstance(f.default, float) and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ValueError(f"{self.name} option {f.name} must be a number, got {value!r}")
        return self

    def _positive(self, *names: str, minimum: int = 1) -> None:
        for n in names:
            if getattr(self, n) < minimum:
                raise ValueError(f"{self.name} option {n} must be at least {minimum}, got {getattr(self, n)}")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


TASKS: dict[str, type[SyntheticTask]] = {}


def register_task(cls: type[SyntheticTask]) -> type[SyntheticTask]:
    TASKS[cls.name] = cls
    return cls


def task_names() -> list[str]:
    return list(TASKS)


def make_task(name: str, **options: Any) -> SyntheticTask:
    """The task ``name`` with its options (dataclass fields); ValueError naming a bad name, option or value."""
    key = str(name).strip().lower()
    if key not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}: use one of {', '.join(TASKS)}")
    cls = TASKS[key]
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise ValueError(f"{key} has no option {unknown[0]!r}: its options are {', '.join(allowed)}")
    for f in dataclasses.fields(cls):  # JSON / CLI lists arrive as lists; the dataclasses hold tuples
        if f.name in options and isinstance(options[f.name], list):
            options[f.name] = tuple(options[f.name])
    return cls(**options).validate()
