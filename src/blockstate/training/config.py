"""TrainConfig: every setting of a training run, from defaults < a YAML/JSON file < command-line flags.

The defaults are the README's quick-start run: the ``tiny`` BST (single head, S4D) on ``python-stdlib`` with
the bytes tokenizer, trained for a fixed *token* budget (``DEFAULT_TOKENS``), so that every machine trains the
same steps on the same data and reaches the same result; only the time it takes varies (about 8 minutes on 2
quiet CPU cores with bf16, see the README for the measured figure).

The recipe (batch 4 x 512, AdamW lr 2e-3, warmup 50, cosine over the budget, bf16 autocast where the CPU
has native bf16) was picked on validation bits per byte after 1M tokens: batch 4 / lr 2e-3 gave 2.75, batch 8:
2.80 (lr 2e-3), 2.90 (1.5e-3), 2.94 (3e-3), 3.02 (5e-3); batch 16: 3.12 (3e-3), 3.32 (6e-3). Small batches
learn the most per token at this scale, and they are also the fastest per token on 2 cores.

Each field is declared once (:func:`setting`): default, kind of value, ``--help`` group and text. ``validate``,
the flags of ``blockstate train`` (``blockstate.cli.train``) and the config-file keys are derived from that.
Fields split into two kinds. *Identity* fields define what is trained (model, data, optimiser, batch, seed...):
resuming a run with a different value is an error, because the result would silently be another experiment.
The ``mutable`` rest (budget, logging, evaluation cadence, output chatter) may change on ``--resume``.
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
CPU_MALLOC = ("keep", "system")  # runtime.device.keep_freed_memory, or glibc's defaults
PARALLEL = ("none", "ddp", "fsdp")

# Used when neither --steps, --tokens nor --time-budget is given. A token count, not a time: a wall-clock default
# gave each machine another number of steps (2,775 on one 2-core VM, 1,001 on another), hence another result.
# 3M tokens = 1,465 steps of 4 x 512, about 8 minutes at ~6-7k tokens/s (2 CPU cores, bf16).
DEFAULT_TOKENS = 3_000_000

# What a value of each kind must be: the phrase of the one-line error "--flag must be <phrase>, got <value>".
# The kind also gives the command-line type (int / float / a true-false flag / choices; see blockstate.cli.train).
KINDS = {"bool": "true or false", "str": "a string", "name": "a field name", "choice": "one of {choices}",
         "int": "a positive integer", "int0": "a non-negative integer", "seed": "an integer >= 0",
         "float": "a positive number", "float0": "a finite number >= 0", "fraction": "in [0, 1)",
         "mapping": "a mapping of model-config fields", "suffixes": None}
GROUPS = ("model", "data", "budget and batch", "optimisation", "run")


def setting(default: Any = None, *, kind: str, group: str, help: str | None = None, nullable: bool = False,
            choices: tuple[str, ...] = (), mutable: bool = False, metavar: str | None = None,
            parse: str | None = None, factory: Any = None) -> Any:
    """A TrainConfig field declared once: its default, the kind of value it takes (checked by ``validate``, see
    KINDS), whether None is allowed, its ``--help`` group and text, and whether it may change on ``--resume``
    (``mutable``; the others are the run's identity). ``parse`` names a command-line parser other than the
    kind's (``count``: 5M, 500k). The flag is the field name with dashes."""
    assert kind in KINDS and group in GROUPS, (kind, group)
    meta = {"kind": kind, "group": group, "help": help, "nullable": nullable, "choices": choices, "mutable": mutable,
            "metavar": metavar, "parse": parse}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class TrainConfig:
    # model
    model: str = setting("bst-sh-s4", kind="str", group="model",
                         help="model name: {models} (default bst-sh-s4; blockstate models lists them with their sizes)")
    size: str = setting("tiny", kind="str", group="model", help="preset size: tiny, small, paper (default tiny)")
    model_args: dict[str, Any] = setting(kind="mapping", group="model", factory=dict, metavar="K=V",
                                         parse="model_arg",  # --model-arg K=V, repeatable
                                         help="override a model-config field (repeatable), e.g. num_hidden_layers=6")
    block_size: int | None = setting(kind="int", nullable=True, group="model",
                                     help="block length W (default: the preset's)")
    dropout: float | None = setting(kind="fraction", nullable=True, group="model",
                                    help="residual dropout (default: the preset's)")
    # data
    data: str = setting("python-stdlib", kind="str", group="data",
                        help="python-stdlib, shakespeare, books, a directory, a .txt/.jsonl file, hf:<name> "
                             "(default python-stdlib)")
    tokenizer: str = setting("bytes", kind="str", group="data",
                             help="bytes, bpe, bpe:<vocab>, a SentencePiece .model, a saved tokenizer directory "
                                  "(default bytes)")
    suffixes: list[str] | None = setting(kind="suffixes", nullable=True, group="data", metavar=".EXT,...",
                                         help="file suffixes read from a corpus folder, e.g. .py,.md "
                                              "(default .txt,.jsonl)")
    text_field: str = setting("text", kind="name", group="data", metavar="NAME",
                              help="the field of each .jsonl record that holds the text (default text)")
    seq_len: int | None = setting(kind="int", nullable=True, group="data",
                                  help="training segment length L (default: the preset's)")
    packing: bool = setting(False, kind="bool", group="data",
                            help="pack documents into one stream (default: no, segments never mix documents)")
    # models that carry state (slide, transformer-xl, brect) read lanes of consecutive segments: 0 = each lane
    # walks whole documents; K >= 1 = runs of at most K segments from random starts (far more documents per run)
    lane_span: int = setting(0, kind="int0", group="data", metavar="K",
                             help="models that carry state (slide, transformer-xl, brect): each batch row walks K "
                                  "consecutive segments from a random document and offset, then jumps (state "
                                  "reset); 0 = whole documents in order (default 0)")
    cache_dir: str | None = setting(kind="str", nullable=True, group="data", mutable=True,
                                    help="token / tokenizer cache (default ~/.cache/blockstate)")
    # batch and budget; batch_size / grad_accum may change on resume: only the global batch must match (checked
    # apart). Small batches learn most per token here.
    batch_size: int = setting(4, kind="int", group="budget and batch", mutable=True,
                              help="segments per process per micro-step (default 4)")
    grad_accum: int = setting(1, kind="int", group="budget and batch", mutable=True,
                              help="micro-steps per optimiser step (default 1)")
    steps: int | None = setting(kind="int", nullable=True, group="budget and batch", mutable=True,
                                help="optimiser steps")
    tokens: int | None = setting(kind="int", nullable=True, group="budget and batch", mutable=True, parse="count",
                                 help=f"token budget instead of --steps (e.g. 20M); the default when no budget is "
                                      f"given is {DEFAULT_TOKENS / 1e6:g}M, the same result on every machine")
    time_budget: float | None = setting(kind="float", nullable=True, group="budget and batch", mutable=True,
                                        metavar="MIN",  # evaluation excluded; a hard stop with --steps
                                        help="minutes of training (with --steps or --tokens: a hard stop; alone: "
                                             "the cosine follows time, so the result depends on the machine's speed)")
    # optimisation
    optimizer: str = setting("adamw", kind="choice", choices=OPTIMIZERS, group="optimisation", help="default adamw")
    lr: float = setting(2e-3, kind="float", group="optimisation", help="peak learning rate (default 2e-3)")
    ssm_lr: float | None = setting(kind="float", nullable=True, group="optimisation",  # S4's recipe
                                   help="SSM parameters' learning rate (default min(lr, 1e-3))")
    weight_decay: float = setting(0.1, kind="float0", group="optimisation",
                                  help="default 0.1 (not on norms, embeddings, SSM)")
    beta1: float = setting(0.9, kind="fraction", group="optimisation")
    beta2: float = setting(0.95, kind="fraction", group="optimisation")
    schedule: str = setting("cosine", kind="choice", choices=SCHEDULES, group="optimisation",
                            help="after warmup (default cosine)")
    warmup_steps: int = setting(50, kind="int0", group="optimisation", help="default 50")
    min_lr_ratio: float = setting(0.1, kind="float0", group="optimisation",
                                  help="cosine floor as a fraction of --lr (default 0.1)")
    grad_clip: float = setting(1.0, kind="float0", group="optimisation",
                               help="global gradient-norm clip, 0 = off (default 1)")
    # a step whose loss or gradient norm is not finite is skipped (weights and optimiser state untouched);
    # this many in a row stop the run with an error (0 = never stop), raised at the next log / eval / save step
    max_skipped_steps: int = setting(20, kind="int0", group="optimisation", mutable=True, metavar="N",
                                     help="a step with a non-finite loss or gradient is skipped; stop after N in a "
                                          "row, 0 = never (default 20)")
    seed: int = setting(0, kind="seed", group="optimisation")
    precision: str = setting("auto", kind="choice", choices=PRECISIONS, group="optimisation",
                             help="auto = bf16 autocast where bf16 is native (GPU, AVX512-BF16/AMX CPUs), else fp32")
    gradient_checkpointing: bool = setting(False, kind="bool", group="optimisation", mutable=True,  # same gradients
                                           help="recompute each layer's activations in the backward: less memory, "
                                                "same gradients")
    # run
    device: str = setting("auto", kind="choice", choices=DEVICES, group="run", mutable=True)
    cpu_malloc: str = setting("keep", kind="choice", choices=CPU_MALLOC, group="run", mutable=True,
                              help="on CPU: keep = glibc's malloc keeps freed memory for reuse, so a step's large "
                                   "temporaries are not page-faulted in again every step (faster; the process "
                                   "keeps its peak memory); system = glibc's defaults")
    parallel: str = setting("none", kind="choice", choices=PARALLEL, group="run", mutable=True,
                            help="under torchrun: ddp or fsdp")
    output: str | None = setting(kind="str", nullable=True, group="run", mutable=True,
                                 help="run directory (default runs/<model>-<size>-<data>, numbered)")
    eval_every: int = setting(250, kind="int0", group="run", mutable=True,
                              help="validation every N steps, 0 = at the end (250)")
    eval_tokens: int = setting(65536, kind="int0", group="run", mutable=True, parse="count", metavar="N",
                               help="validate on the first whole documents of the validation split up to N tokens; "
                                    "documents are never cut, so at least one is used and the first may exceed N "
                                    "(default 65536)")
    save_every: int = setting(500, kind="int0", group="run", mutable=True,
                              help="checkpoint every N steps, 0 = at the end (500)")
    keep_checkpoints: int = setting(2, kind="int", group="run", mutable=True, help="newest checkpoints kept (2)")
    log_every: int = setting(10, kind="int", group="run", mutable=True,
                             help="metrics.jsonl line every N steps (10)")
    final_eval: bool = setting(True, kind="bool", group="run", mutable=True,
                               help="test-split bits per byte at the end (default yes)")
    sample_tokens: int = setting(256, kind="int0", group="run", mutable=True,
                                 help="tokens sampled at the end, 0 = none (256)")
    sample_prompt: str | None = setting(kind="str", nullable=True, group="run", mutable=True,
                                        help="prompt of the sample (default: 'def ' on python-stdlib)")
    temperature: float = setting(0.8, kind="float", group="run", mutable=True)
    threads: int | None = setting(kind="int", nullable=True, group="run", mutable=True, help="torch CPU threads")
    progress: bool = setting(True, kind="bool", group="run", mutable=True, help="progress bar")

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the field, the value and what is allowed; returns self. Types too: a YAML file
        can hold anything (lr: "fast", packing: "yes"), which would otherwise fail later deep in the run."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata["nullable"]:
                continue
            problem = value_problem(f.metadata, value)
            if problem is not None:
                label = "model_args" if f.name == "model_args" else flag(f.name)
                raise ValueError(f"{label} must be {problem}, got {value!r}")
        return check_combinations(self)

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


def value_problem(meta: Any, value: Any) -> str | None:
    """What ``value`` must be instead (the phrase of KINDS), or None when it is a good value of its kind."""
    kind = meta["kind"]
    number = not isinstance(value, bool) and isinstance(value, int | float)
    integer = not isinstance(value, bool) and isinstance(value, int)
    if kind == "bool":
        good = isinstance(value, bool)
    elif kind == "str":
        good = isinstance(value, str)
    elif kind == "name":
        good = isinstance(value, str) and bool(value)
    elif kind == "choice":
        if not isinstance(value, str):
            return KINDS["str"]
        good = value in meta["choices"]
    elif kind in ("int", "int0"):
        good = integer and value >= (1 if kind == "int" else 0)
    elif kind == "seed":
        good = integer and 0 <= value < 2**63
    elif kind == "float":
        good = number and value > 0 and math.isfinite(value)
    elif kind == "float0":
        good = number and 0 <= value < math.inf
    elif kind == "fraction":
        if not number:
            return "a number"
        good = 0 <= value < 1
    elif kind == "mapping":
        good = isinstance(value, dict)
    else:  # suffixes: normalised (and refused in its own words) by check_combinations
        good = True
    return None if good else KINDS[kind].format(choices=", ".join(meta["choices"]))


def check_combinations(cfg: TrainConfig) -> TrainConfig:
    """The checks a field's kind cannot say: the suffix list's normal form, a segment of at least two tokens."""
    if cfg.suffixes is not None:
        from blockstate.data.corpora import normalise_suffixes

        cfg.suffixes = list(normalise_suffixes(cfg.suffixes))
    if cfg.seq_len is not None and cfg.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2 (one input and one target), got {cfg.seq_len}")
    return cfg


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
# may change on --resume; every other field is the identity of the run
MUTABLE = frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["mutable"])


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
