"""Like-for-like quality comparison (the layout of the paper's Table 1): every chosen model trained at the same size
preset (so the same parameter budget: the registry matches every model to BST:SH:S4 within 5%), on the same
corpus, tokenizer, seed, recipe and number of training TOKENS, then scored on the test split at the training
length and at 4x and 16x of it.

Training and evaluation are the project's own (``blockstate.training.Trainer``, ``blockstate.evaluation``), run
in-process. Each model trains in its own run directory, ``<runs>/<corpus>-<size>/<model>``, which also records
the comparison settings (``compare.json``) and the evaluation (``compare-eval.json``, plus the usual
``eval/`` report). Rerunning the same command skips finished models, evaluates trained ones, and resumes
interrupted ones from their last checkpoint (saved every ``save_every`` steps): an interrupted comparison costs
at most the steps since that checkpoint. A run directory trained with other settings is refused (pass
``--overwrite`` to retrain, or another ``--runs``).

Same data for every model: the same tokenised corpus and the same seeded segment order; models that carry state
across segments (Slide, Transformer-XL, BRecT) read documents as contiguous lanes (their state must follow the
text), so they see the same documents in another order. Evaluation follows ``blockstate.evaluation.evaluate``'s
protocol on the first documents of the split holding at most ``eval_tokens`` tokens (0: the whole split), the
same documents for every model; stateful models carry their state across segments of a document there too.

Quality numbers depend only on the token budget, never on timing; training wall time is reported beside them
and is only as good as the machine was quiet.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

from blockstate.benchmarks.common import machine, write_json

DEFAULT_MODELS = ["bst-sh-s4", "bst-mh-s4", "bst-mf-s4", "bst-sh-unstructured", "bst-mf-unstructured", "slide",
                  "transformer-xl", "brect", "gpt", "gss-hybrid"]
DEFAULT_TOKENS = 1_000_000  # ~35 min with evaluation for the 10 default tiny models on 2 quiet CPU cores
DEFAULT_LENGTHS = "1x,4x,16x"
DEFAULT_EVAL_TOKENS = 262144  # python-stdlib test: the first 12 of 26 documents (203k bytes); 0 = all
SETTINGS_FILE = "compare.json"
EVAL_FILE = "compare-eval.json"


@dataclasses.dataclass
class CompareSettings:
    models: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_MODELS))
    corpora: list[str] = dataclasses.field(default_factory=lambda: ["python-stdlib"])
    size: str = "tiny"
    tokens: int = DEFAULT_TOKENS
    seq_len: int | None = None  # None: the preset's max_train_length
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # config overrides for every model
    batch_size: int = 4
    lr: float | None = None  # None: the trainer's default
    seed: int = 0
    tokenizer: str = "bytes"
    precision: str = "auto"
    device: str = "auto"
    lengths: str = DEFAULT_LENGTHS
    eval_tokens: int = DEFAULT_EVAL_TOKENS
    split: str = "test"
    save_every: int = 100
    runs: Path = Path("runs/compare")
    out: Path | None = None  # None: benchmarks/results/compare-<corpora>[-<size>]
    threads: int | None = None
    cache_dir: str | None = None
    progress: bool = True
    overwrite: bool = False
    command: str = ""

    def output_dir(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        name = "compare-" + "+".join(slug(c) for c in self.corpora) + ("" if self.size == "tiny" else f"-{self.size}")
        return Path("benchmarks/results") / name

    def run_dir(self, corpus: str, model: str) -> Path:
        return Path(self.runs) / f"{slug(corpus)}-{self.size}" / model


def slug(text: str) -> str:
    name = Path(str(text).rstrip("/\\")).name or str(text)
    s = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
    return s.strip("-.") or "data"


# -- one model ---------------------------------------------------------------------------------------------------
def train_config(s: CompareSettings, corpus: str, model: str):
    from blockstate.training import TrainConfig

    values: dict[str, Any] = dict(model=model, size=s.size, data=corpus, tokenizer=s.tokenizer, seq_len=s.seq_len,
                                  batch_size=s.batch_size, tokens=s.tokens, seed=s.seed, precision=s.precision,
                                  device=s.device, output=str(s.run_dir(corpus, model)), eval_every=0,
                                  eval_tokens=32768, save_every=s.save_every, keep_checkpoints=1, final_eval=False,
                                  sample_tokens=0, threads=s.threads, cache_dir=s.cache_dir, progress=s.progress)
    if s.lr is not None:
        values["lr"] = s.lr
    if s.model_args:
        values["model_args"] = dict(s.model_args)
    return TrainConfig(**values).validate()


def identity(s: CompareSettings, corpus: str, model: str) -> dict[str, Any]:
    """What makes two trainings the same experiment (the recipe's other fields are the trainer's defaults)."""
    cfg = train_config(s, corpus, model)
    ident = {k: getattr(cfg, k) for k in ("model", "size", "data", "tokenizer", "seq_len", "batch_size", "tokens",
                                          "seed", "precision", "lr")}
    if cfg.model_args:  # only when given, so runs made before the option existed still match
        ident["model_args"] = dict(cfg.model_args)
    return ident


def eval_identity(s: CompareSettings) -> dict[str, Any]:
    return {"lengths": s.lengths, "eval_tokens": s.eval_tokens, "split": s.split}


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def train_one(s: CompareSettings, corpus: str, model: str, log: Any = print) -> dict[str, Any]:
    """Train (or resume, or skip) one model; returns its ``results.json`` plus ``status``."""
    from blockstate.training import Trainer
    from blockstate.training.checkpoint import latest_checkpoint
    from blockstate.training.rundir import holds_run

    run_dir = s.run_dir(corpus, model)
    ident = identity(s, corpus, model)
    marker = run_dir / SETTINGS_FILE
    saved = _read(marker)
    fresh = s.overwrite or not holds_run(run_dir)
    if not fresh and (saved or {}).get("train") != ident:
        what = ("was trained with other settings: " + ", ".join(
            f"{k} {saved['train'].get(k)!r} (now {v!r})" for k, v in ident.items() if saved["train"].get(k) != v)
            if saved and "train" in saved else "holds a run that blockstate compare did not start")
        raise ValueError(f"{run_dir} {what}: pass --overwrite to retrain, or another --runs directory")
    results = _read(run_dir / "results.json")
    if not fresh and results is not None and (results.get("config") or {}).get("tokens") == s.tokens:
        return {**results, "status": "trained earlier"}  # results.json is written when a run completes
    run_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        (run_dir / EVAL_FILE).unlink(missing_ok=True)
    write_json(marker, {"train": ident, "machine_at_training_start": machine()})  # wall time is only as good
    cfg = train_config(s, corpus, model)
    resume = None if fresh else latest_checkpoint(run_dir)
    log(f"== {model} on {corpus}: " + (f"resuming {resume}" if resume else f"training {s.tokens:,} tokens")
        + f" into {run_dir}")
    t0 = time.perf_counter()
    result = Trainer(cfg, resume=resume, overwrite=resume is None).run()
    if result.interrupted:
        return {"status": "interrupted", "signal": result.interrupted}
    results = _read(run_dir / "results.json") or {}
    return {**results, "status": f"trained in {time.perf_counter() - t0:.0f} s of wall time"}


def evaluate_one(s: CompareSettings, corpus: str, model: str, log: Any = print) -> dict[str, Any]:
    """Test-split perplexity and bits per byte at every length (cached in the run directory)."""
    import torch

    from blockstate.data import load_corpus, tokenize_split
    from blockstate.evaluation import evaluate, head_documents, load_checkpoint, parse_lengths, write_report
    from blockstate.training.distributed import pick_device
    from blockstate.training.steps import autocast_factory

    run_dir = s.run_dir(corpus, model)
    ident = eval_identity(s)
    cached = _read(run_dir / EVAL_FILE)
    if cached and cached.get("settings") == ident:
        return {**cached, "status": "evaluated earlier"}
    if s.threads:
        torch.set_num_threads(s.threads)
    device = pick_device(s.device)
    lm = load_checkpoint(run_dir, device=device, cache_dir=s.cache_dir)
    data = tokenize_split(load_corpus(corpus), lm.tokenizer, s.split, cache_dir=s.cache_dir)
    data = head_documents(data, s.eval_tokens) if s.eval_tokens else data
    autocast = autocast_factory(s.precision, device)
    t0 = time.perf_counter()
    results = []
    for length in parse_lengths(s.lengths, lm.train_length):
        results.append(evaluate(lm.model, data, length, device=device, autocast=autocast, progress=s.progress))
        r = results[-1]
        log(f"   {model} L={length}: ppl {r.ppl:.3f}, {r.bpb:.4f} bits/byte over {r.tokens:,} tokens")
    seconds = time.perf_counter() - t0
    meta = {"checkpoint": str(lm.path), "tokenizer": getattr(lm.tokenizer, "kind", "?"),
            "vocab_size": lm.tokenizer.vocab_size, "train_length": lm.train_length, "data": corpus,
            "parameters": sum(p.numel() for p in lm.model.parameters())}
    write_report({model: meta}, {model: results}, run_dir / "eval", s.split, corpus)
    payload = {"settings": ident, "train_length": lm.train_length, "parameters": meta["parameters"],
               "documents": data.num_documents, "eval_seconds": round(seconds, 1),
               "results": [r.summary() for r in results]}
    write_json(run_dir / EVAL_FILE, payload)
    del lm
    return {**payload, "status": f"evaluated in {seconds:.0f} s"}


# -- the comparison ----------------------------------------------------------------------------------------------
def run(s: CompareSettings, log: Any = print) -> dict[str, Any] | None:
    """Train and evaluate every model on every corpus; write the table, JSON and plot. None when interrupted."""
    from blockstate.data import load_corpus

    for corpus in s.corpora:  # a bad corpus fails now, not after an hour of training on the first one
        load_corpus(corpus)
    if s.threads:
        import torch

        torch.set_num_threads(s.threads)
    info = machine()
    log(f"compare on {info['device']}, torch {info['torch']}, {info['threads']} threads: {len(s.models)} models x "
        f"{len(s.corpora)} corpora, size {s.size}, {s.tokens:,} training tokens each; runs in {s.runs}")
    entries: dict[str, dict[str, Any]] = {m: {"name": m, "carries_state": carries_state(m, s), "corpora": {}}
                                          for m in s.models}
    started = time.perf_counter()
    for corpus in s.corpora:
        for model in s.models:
            train = train_one(s, corpus, model, log)
            if train["status"] == "interrupted":
                log(f"interrupted ({train['signal']}) while training {model} on {corpus}; its last checkpoint is "
                    "kept: rerun the same command to continue (finished models are skipped)")
                return None
            ev = evaluate_one(s, corpus, model, log)
            log(f"   {model} on {corpus}: {train['status']}, {ev['status']}")
            entries[model]["parameters"] = train.get("parameters") or ev.get("parameters")
            trained_on = (_read(s.run_dir(corpus, model) / SETTINGS_FILE) or {}).get("machine_at_training_start")
            entries[model]["corpora"][corpus] = {
                "train": {k: train.get(k) for k in ("step", "tokens", "train_seconds", "wall_seconds", "train_loss",
                                                    "val_bpb", "val_loss")},
                "eval": {k: ev[k] for k in ("train_length", "documents", "eval_seconds", "results")},
                "run_dir": str(s.run_dir(corpus, model)), "machine_at_training_start": trained_on}
    payload = {"benchmark": "compare", "command": s.command, "machine": info,
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(s).items()
                            if k not in ("command", "overwrite", "progress")},
               "wall_seconds_this_invocation": round(time.perf_counter() - started, 1),
               "models": list(entries.values())}
    out = s.output_dir()
    write_json(out / "compare.json", payload)
    (out / "compare.md").write_text(markdown(payload), encoding="utf-8")
    plot(payload, out / "compare.png")
    log(markdown(payload))
    log(f"wrote {out / 'compare.json'}, compare.md and compare.png")
    return payload


def carries_state(model: str, s: CompareSettings) -> bool:
    """Whether ``model`` (with ``s.model_args``) carries state across training segments (built on the meta device)."""
    import torch

    from blockstate import registry

    with torch.device("meta"):
        return registry.carries_state(registry.create_model(model, s.size, **s.model_args))


def _at(entry: dict[str, Any], corpus: str, factor: float) -> dict[str, Any] | None:
    c = entry["corpora"].get(corpus)
    if not c:
        return None
    train_length = c["eval"]["train_length"]
    for r in c["eval"]["results"]:
        if train_length and abs(r["length"] / train_length - factor) < 1e-6:
            return r
    return None


def _loads(payload: dict[str, Any]) -> str:
    """The 1-minute load average when each model's training started, where the run directories recorded it."""
    loads = [c["machine_at_training_start"].get("load_1min_at_start") for e in payload["models"]
             for c in e["corpora"].values() if c.get("machine_at_training_start")]
    loads = [x for x in loads if x is not None]
    if not loads:
        return "the load during training was not recorded"
    return f"load average {min(loads):g}-{max(loads):g} when the models' training started"


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def markdown(payload: dict[str, Any]) -> str:
    st, m = payload["settings"], payload["machine"]
    corpora = st["corpora"]
    first = payload["models"][0]["corpora"][corpora[0]] if payload["models"] else None
    train_length = first["eval"]["train_length"] if first else "?"
    docs = first["eval"]["documents"] if first else "?"
    split = (f"the whole {st['split']} split ({docs} documents)" if not st["eval_tokens"] else
             f"the first {docs} documents of the {st['split']} split (at most {st['eval_tokens']:,} tokens)")
    lines = [f"# Like-for-like comparison: size {st['size']}, {st['tokens']:,} training tokens per model",
             "",
             f"Training length L = {train_length}, batch {st['batch_size']}, tokenizer {st['tokenizer']}, seed "
             f"{st['seed']}, precision {st['precision']}; evaluated on {split}. Machine: {m['device']}, torch "
             f"{m['torch']}, {m['threads']} threads, OMP_WAIT_POLICY {m.get('omp_wait_policy', '?')}. Training "
             f"time is wall-clock on a shared machine (noisy; {_loads(payload)}); the quality numbers depend "
             "only on the token budget.",
             "",
             f"Command: `{payload['command']}`", ""]
    head = "| model | parameters |" + "".join(f" {c} ppl | {c} bits/byte | {c} train time | train tok/s |"
                                               for c in corpora)
    lines += [head, "|---|---|" + "---|---|---|---|" * len(corpora)]
    best = {c: min((_at(e, c, 1) or {"bpb": math.inf})["bpb"] for e in payload["models"]) for c in corpora}
    for e in payload["models"]:
        cells = [e["name"], f"{(e.get('parameters') or 0) / 1e6:.2f}M"]
        for c in corpora:
            r, t = _at(e, c, 1), e["corpora"].get(c, {}).get("train", {})
            if r is None:
                cells += ["-", "-", "-", "-"]
                continue
            bold = "**" if r["bpb"] == best[c] else ""
            rate = t["tokens"] / t["train_seconds"] if t.get("tokens") and t.get("train_seconds") else None
            cells += [f"{r['ppl']:.3f}", f"{bold}{r['bpb']:.4f}{bold}", _minutes(t.get("train_seconds")),
                      "-" if rate is None else f"{rate:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    stateful = [e["name"] for e in payload["models"] if e.get("carries_state")]
    if stateful:
        lines += ["", f"{', '.join(stateful)} carry state across training segments, so they train on "
                      f"{st['batch_size']} lanes that walk through whole documents in order (their state must follow "
                      "the text) instead of shuffled segments; at a small batch that is far less varied data per step "
                      "(--model-arg carry_state=false trains Slide and Transformer-XL on shuffled segments)."]
    lines += ["", "Length generalisation: test bits per byte at 1x, 4x and 16x the training length "
                  "(lower is better; the last column is 16x minus 1x).", ""]
    factors = sorted({round(r["length"] / e["corpora"][c]["eval"]["train_length"], 6) for e in payload["models"]
                      for c in corpora if c in e["corpora"] for r in e["corpora"][c]["eval"]["results"]})
    head = "| model |" + "".join(f" {c} {f:g}x |" for c in corpora for f in factors) + "".join(
        f" {c} {factors[-1]:g}x - {factors[0]:g}x |" for c in corpora if len(factors) > 1)
    lines += [head, "|---|" + "---|" * (len(corpora) * len(factors) + (len(corpora) if len(factors) > 1 else 0))]
    for e in payload["models"]:
        cells = [e["name"]]
        for c in corpora:
            for f in factors:
                r = _at(e, c, f)
                cells.append("-" if r is None else f"{r['bpb']:.4f}")
        if len(factors) > 1:
            for c in corpora:
                lo, hi = _at(e, c, factors[0]), _at(e, c, factors[-1])
                cells.append("-" if lo is None or hi is None else f"{hi['bpb'] - lo['bpb']:+.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = payload["settings"]["corpora"]
    fig, axes = plt.subplots(1, len(corpora), figsize=(7 * len(corpora), 4.8), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        train_length = None
        for i, e in enumerate(payload["models"]):
            c = e["corpora"].get(corpus)
            if not c:
                continue
            train_length = c["eval"]["train_length"]
            rs = c["eval"]["results"]
            ax.plot([r["length"] for r in rs], [r["bpb"] for r in rs], marker="o",
                    linestyle="-" if e["name"].startswith("bst-") else "--", color=plt.cm.tab10(i % 10),
                    label=e["name"])
        if train_length:
            ax.axvline(train_length, color="gray", linestyle=":", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("evaluation length (tokens; dotted: training length)")
        ax.set_ylabel("test bits per byte")
        ax.set_title(corpus, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    st = payload["settings"]
    fig.suptitle(f"length generalisation, size {st['size']}, {st['tokens']:,} training tokens per model", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
