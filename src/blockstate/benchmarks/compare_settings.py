"""The settings of one ``blockstate compare`` (and ``ablate``) run: rows, corpora, budget, recipe, places.

Apart from ``compare.py`` so that ``compare_eval`` can name them without importing the comparison itself.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from blockstate.data.common import slug

NOCARRY = ":nocarry"  # row suffix: the model with carry_state=false
# the paper's configurations, the preset chosen by ``blockstate ablate`` (bst-sh-s4-gated), the baselines
DEFAULT_MODELS = ["bst-sh-s4", "bst-sh-s4-gated", "bst-mh-s4", "bst-mf-s4", "bst-sh-unstructured",
                  "bst-mf-unstructured", "slide", "transformer-xl", "brect", "gpt", "gss-hybrid", "slide" + NOCARRY,
                  "transformer-xl" + NOCARRY]
DEFAULT_TOKENS = 1_000_000  # ~45 min with evaluation for the 13 default tiny rows on 2 quiet CPU cores
DEFAULT_LENGTHS = "1x,4x,16x"
DEFAULT_EVAL_TOKENS = 262144  # python-stdlib test: the first 12 of 26 documents (203k bytes); 0 = all
DEFAULT_LANE_SPAN = 8  # consecutive segments per lane run of a carried-state model (module doc)
SETTINGS_FILE = "compare.json"
DIVERGED_FILE = "compare-diverged.json"


@dataclasses.dataclass
class CompareSettings:
    models: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_MODELS))  # rows (module doc)
    corpora: list[str] = dataclasses.field(default_factory=lambda: ["python-stdlib"])
    size: str = "tiny"
    tokens: int = DEFAULT_TOKENS
    seq_len: int | None = None  # None: the preset's max_train_length
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # config overrides for every model
    train_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # TrainConfig overrides for every run
    batch_size: int = 4
    lr: float | None = None  # None: the trainer's default
    lr_sweep: int = 1  # learning rates per row (module doc); 1 = only --lr
    lane_span: int = DEFAULT_LANE_SPAN  # carried-state models only; 0 = whole-document lanes
    seed: int = 0
    tokenizer: str = "bytes"
    precision: str = "auto"
    device: str = "auto"
    lengths: str = DEFAULT_LENGTHS
    eval_tokens: int = DEFAULT_EVAL_TOKENS
    split: str = "test"
    save_every: int = 100
    runs: Path = Path("runs/compare")
    out: Path | None = None  # None: benchmarks/results/compare-<corpora>[-<size>][-L<seq_len>]
    threads: int | None = None
    cache_dir: str | None = None
    progress: bool = True
    overwrite: bool = False
    command: str = ""

    def output_dir(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        name = "compare-" + "+".join(slug(c) for c in self.corpora) + ("" if self.size == "tiny" else f"-{self.size}")
        return Path("benchmarks/results") / (name + (f"-L{self.seq_len}" if self.seq_len else ""))

    def base_lr(self) -> float:
        from blockstate.training import TrainConfig

        return self.lr if self.lr is not None else TrainConfig().lr

    def lrs(self) -> list[float]:
        return [self.base_lr() * f for f in lr_factors(self.lr_sweep)]

    def run_dir(self, corpus: str, model: str, lr: float | None = None) -> Path:
        root = Path(self.runs) / (f"{slug(corpus)}-{self.size}" + (f"-L{self.seq_len}" if self.seq_len else ""))
        name = model.replace(":", "-")
        if lr is not None and not math.isclose(lr, self.base_lr(), rel_tol=1e-9):
            name += f"-lr{lr:.3g}"
        return root / name


def lr_factors(n: int) -> list[float]:
    """The sweep's multipliers of the base learning rate: 2^(k - (n-1)//2), k = 0..n-1 (always holds 1)."""
    return [2.0 ** (k - (n - 1) // 2) for k in range(n)]
