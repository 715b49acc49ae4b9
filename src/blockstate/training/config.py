"""TrainConfig: every setting of a training run, from defaults < a YAML/JSON file < command-line flags.

The defaults are the README's quick-start run: the ``tiny`` BST (single head, S4D) on ``python-stdlib`` with
the bytes tokenizer, trained for a fixed *token* budget (``DEFAULT_TOKENS``), so that every machine trains the
same steps on the same data and reaches the same result; only the time it takes varies (about 8 minutes on 2
quiet CPU cores with bf16, see the README for the measured figure).

The recipe (batch 4 x 512, AdamW lr 2e-3, warmup 50, cosine over the budget, bf16 autocast where the CPU
has native bf16) was picked on validation bits per byte after 1M tokens: batch 4 / lr 2e-3 gave 2.75, batch 8:
2.80 (lr 2e-3), 2.90 (1.5e-3), 2.94 (3e-3), 3.02 (5e-3); batch 16: 3.12 (3e-3), 3.32 (6e-3). Small batches
learn the most per token at this scale, and they are also the fastest per token on 2 cores.

Fields split into two kinds. *Identity* fields define what is trained (model, data, optimiser, batch, seed...):
resuming a run with a different value is an error, because the result would silently be another experiment.
Everything else (budget, logging, evaluation cadence, output chatter) may change on ``--resume``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("cosine", "inverse-sqrt", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
PARALLEL = ("none", "ddp", "fsdp")

# Used when neither --steps, --tokens nor --time-budget is given. A token count, not a time: a wall-clock default
# gave each machine another number of steps (2,775 on one 2-core VM, 1,001 on another), hence another result.
# 3M tokens = 1,465 steps of 4 x 512, about 8 minutes at ~6-7k tokens/s (2 CPU cores, bf16).
DEFAULT_TOKENS = 3_000_000


@dataclasses.dataclass
class TrainConfig:
    # model
    model: str = "bst-sh-s4"
    size: str = "tiny"
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra model-config overrides
    block_size: int | None = None  # W; None = the preset's
    dropout: float | None = None  # hidden (residual) dropout; None = the preset's
    # data
    data: str = "python-stdlib"
    tokenizer: str = "bytes"
    suffixes: list[str] | None = None  # file suffixes read from a corpus folder; None: .txt and .jsonl
    text_field: str = "text"  # the field of a .jsonl record that holds the document
    seq_len: int | None = None  # training segment length L; None = the preset's max_train_length
    packing: bool = False
    # models that carry state (slide, transformer-xl, brect) read lanes of consecutive segments: 0 = each lane
    # walks whole documents; K >= 1 = runs of at most K segments from random starts (far more documents per run)
    lane_span: int = 0
    cache_dir: str | None = None
    # batch and budget
    batch_size: int = 4  # sequences per process per micro-step (small batches learn most per token here)
    grad_accum: int = 1
    steps: int | None = None
    tokens: int | None = None  # token budget: steps = ceil(tokens / tokens per optimiser step)
    time_budget: float | None = None  # minutes of training (evaluation excluded); a hard stop with --steps
    # optimisation
    optimizer: str = "adamw"
    lr: float = 2e-3
    ssm_lr: float | None = None  # None: min(lr, 1e-3) (SSM parameters are sensitive; S4's recipe)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    schedule: str = "cosine"
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 = off
    # a step whose loss or gradient norm is not finite is skipped (weights and optimiser state untouched);
    # this many in a row stop the run with an error (0 = never stop)
    max_skipped_steps: int = 20
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast where bf16 matmuls are native (CUDA, AVX512-BF16/AMX CPUs)
    gradient_checkpointing: bool = False  # recompute each layer in the backward: less memory, same gradients
    # run
    device: str = "auto"
    parallel: str = "none"
    output: str | None = None  # None: runs/<model>-<size>-<data>[-N]
    eval_every: int = 250  # validation every N optimiser steps (0 = only at the end)
    eval_tokens: int = 65536  # validation uses the first documents of the split up to this many tokens
    save_every: int = 500  # 0 = only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    final_eval: bool = True  # test-split bits per byte at the end
    sample_tokens: int = 256  # 0 = no sample
    sample_prompt: str | None = None  # None: "def " on python-stdlib, "ROMEO:" on shakespeare, else none
    temperature: float = 0.8
    threads: int | None = None  # torch intra-op threads; None = torch's default
    progress: bool = True

    # -- identity ------------------------------------------------------------------------------------------
    MUTABLE = frozenset({"steps", "tokens", "time_budget", "device", "parallel", "output", "eval_every",
                         "eval_tokens", "save_every", "keep_checkpoints", "log_every", "final_eval",
                         "sample_tokens", "sample_prompt", "temperature", "threads", "progress", "cache_dir",
                         "batch_size", "grad_accum",  # batch: only the global batch must match (checked apart)
                         "max_skipped_steps", "gradient_checkpointing"})  # same gradients either way

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the field, the value and what is allowed; returns self."""
        # types first: a YAML file can hold anything (lr: "fast", packing: "yes"), and a wrong type would
        # otherwise fail later as a TypeError deep in the run
        for name in ("packing", "final_eval", "progress", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{flag(name)} must be true or false, got {getattr(self, name)!r}")
        for name in ("model", "size", "data", "tokenizer", "optimizer", "schedule", "precision", "device", "parallel"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{flag(name)} must be a string, got {getattr(self, name)!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ValueError(f"--text-field must be a field name, got {self.text_field!r}")
        if self.suffixes is not None:
            from blockstate.data.corpora import normalise_suffixes

            self.suffixes = list(normalise_suffixes(self.suffixes))
        for name in ("output", "cache_dir", "sample_prompt"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{flag(name)} must be a string, got {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"--seed must be an integer >= 0, got {self.seed!r}")
        for name in ("beta1", "beta2", "dropout"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ValueError(f"{flag(name)} must be a number, got {value!r}")
        choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "precision": PRECISIONS, "device": DEVICES,
                   "parallel": PARALLEL}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("batch_size", "grad_accum", "keep_checkpoints", "log_every"):
            _positive_int(self, name)
        for name in ("steps", "tokens", "seq_len", "block_size", "threads"):
            if getattr(self, name) is not None:
                _positive_int(self, name)
        for name in ("eval_every", "save_every", "sample_tokens", "warmup_steps", "eval_tokens",
                     "max_skipped_steps", "lane_span"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{flag(name)} must be a non-negative integer, got {value!r}")
        for name in ("lr", "temperature"):
            _positive_float(self, name)
        if self.ssm_lr is not None:
            _positive_float(self, "ssm_lr")
        if self.time_budget is not None:
            _positive_float(self, "time_budget")
        for name in ("weight_decay", "grad_clip", "min_lr_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"{flag(name)} must be a finite number >= 0, got {value!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be in [0, 1), got {getattr(self, name)!r}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout!r}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"--seq-len must be at least 2 (one input and one target), got {self.seq_len}")
        if not isinstance(self.model_args, dict):
            raise ValueError(f"model_args must be a mapping of model-config fields, got {self.model_args!r}")
        return self

    def default_budget(self) -> bool:
        """True when no budget was given: the run trains DEFAULT_TOKENS tokens."""
        return self.steps is None and self.tokens is None and self.time_budget is None

    def effective_time_budget(self) -> float | None:
        """Minutes of training, or None: the default budget is a token count, not a time."""
        return self.time_budget

    def effective_tokens(self) -> int | None:
        """--tokens, else DEFAULT_TOKENS when no budget at all was given, else None."""
        return DEFAULT_TOKENS if self.default_budget() else self.tokens

    def steps_for_tokens(self, tokens_per_step: int) -> int | None:
        """--steps, else the token budget converted, else None (a time budget alone calibrates the count)."""
        if self.steps is not None:
            return self.steps
        tokens = self.effective_tokens()
        if tokens is not None:
            return max(1, math.ceil(tokens / tokens_per_step))
        return None

    def corpus_options(self) -> dict[str, Any]:
        """Keyword arguments of ``load_corpus`` for ``data``: --suffixes and --text-field."""
        options: dict[str, Any] = {"text_field": self.text_field}
        if self.suffixes is not None:
            options["suffixes"] = tuple(self.suffixes)
        return options

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        return cls(**normalise_keys(values, source)).validate()


def flag(name: str) -> str:
    """The command-line spelling of a field (for error messages)."""
    return "--" + name.replace("_", "-")


def _positive_int(cfg: TrainConfig, name: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{flag(name)} must be a positive integer, got {value!r}")


def _positive_float(cfg: TrainConfig, name: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{flag(name)} must be a positive number, got {value!r}")


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def normalise_keys(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Accept ``seq-len`` and ``seq_len``; reject unknown keys with the closest known ones."""
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            import difflib

            close = difflib.get_close_matches(name, sorted(FIELDS), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else f"; known keys: {', '.join(sorted(FIELDS))}"
            raise ValueError(f"{source}: unknown setting {key!r}{hint}")
        out[name] = value
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML (.yaml/.yml) or JSON file, as a dict of field names (not yet validated)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist: check the --config path")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except (json.JSONDecodeError, ValueError) as exc:  # yaml.YAMLError subclasses Exception, handled below
        raise ValueError(f"config file {path} is not valid JSON: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - yaml's parser errors: report as one line
        raise ValueError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings (key: value), got "
                         f"{type(values).__name__}")
    return normalise_keys(values, str(path))


def merge(file_values: dict[str, Any], flag_values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """defaults (or ``base``) < file < flags; the result is validated."""
    values = (base or TrainConfig()).to_dict()
    values.update(file_values)
    values.update(flag_values)
    return TrainConfig(**values).validate()


def resolved_settings(state: dict[str, Any], model_config: dict[str, Any]) -> dict[str, Any]:
    """What a run really used for the settings saved as None (= the preset's value), from its checkpoint's
    trainer state and model config.json: so that --resume names 512, not None, and accepts an explicit 512."""
    values = {"seq_len": state.get("seq_len") or model_config.get("max_train_length"),
              "block_size": model_config.get("block_size"), "dropout": model_config.get("hidden_dropout")}
    return {k: v for k, v in values.items() if v is not None}


def identity_mismatches(saved: TrainConfig, explicit: dict[str, Any],
                        resolved: dict[str, Any] | None = None) -> list[str]:
    """Explicitly given identity settings that differ from the saved run's (for --resume); ``resolved``
    (:func:`resolved_settings`) stands in for saved values that are None."""
    bad = []
    for name, value in explicit.items():
        if name in TrainConfig.MUTABLE:
            continue
        old = getattr(saved, name)
        if old is None and resolved and name in resolved:
            old = resolved[name]
        if isinstance(value, dict) and isinstance(old, dict):  # model_args: name the differing keys
            keys = sorted(k for k in set(value) | set(old) if _norm(value.get(k)) != _norm(old.get(k)))
            bad += [f"--model-arg {k}={value.get(k)!r} (the run used {k}={old.get(k)!r})" for k in keys]
        elif _norm(value) != _norm(old):
            bad.append(f"{flag(name)} {value!r} (the run used {old!r})")
    return bad


def _norm(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, tuple):
        return list(value)
    return value
