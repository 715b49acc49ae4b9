"""Evaluation of finished ``blockstate compare`` runs: validation loss for the learning-rate choice, and test-split
perplexity / bits per byte at every length with the loss by position inside the training-length segments. Each
result is cached in its run directory (``compare-valid.json``, ``compare-eval.json``) with the settings it was
computed under, so a rerun with the same settings reads it back."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blockstate.benchmarks.common import write_json

if TYPE_CHECKING:  # compare.py imports this module
    from blockstate.benchmarks.compare_settings import CompareSettings

EVAL_FILE = "compare-eval.json"
VALID_FILE = "compare-valid.json"
POSITION_BUCKETS = 32  # loss by position: mean over this many equal buckets of the segment's positions


def eval_identity(s: CompareSettings) -> dict[str, Any]:
    return {"lengths": s.lengths, "eval_tokens": s.eval_tokens, "split": s.split, "position_buckets": POSITION_BUCKETS}


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _load(s: CompareSettings, run_dir: Path, corpus: str, split: str):
    """(model, tokenised split head, device, autocast) for evaluating a finished run."""
    import torch

    from blockstate.data import load_corpus, tokenize_split
    from blockstate.evaluation import head_documents
    from blockstate.runtime.device import autocast_factory, pick_device
    from blockstate.runtime.loading import load_checkpoint

    if s.threads:
        torch.set_num_threads(s.threads)
    device = pick_device(s.device)
    lm = load_checkpoint(run_dir, device=device, cache_dir=s.cache_dir)
    data = tokenize_split(load_corpus(corpus), lm.tokenizer, split, cache_dir=s.cache_dir)
    data = head_documents(data, s.eval_tokens) if s.eval_tokens else data
    return lm, data, device, autocast_factory(s.precision, device)


def validate_one(s: CompareSettings, corpus: str, row: str, log: Any = print, *, lr: float | None = None
                 ) -> dict[str, Any]:
    """Validation loss at the training length (the learning-rate choice; cached in the run directory)."""
    from blockstate.evaluation import evaluate

    run_dir = s.run_dir(corpus, row, lr)
    ident = {"split": "validation", "eval_tokens": s.eval_tokens}
    cached = _read(run_dir / VALID_FILE)
    if cached and cached.get("settings") == ident:
        return cached
    lm, data, device, autocast = _load(s, run_dir, corpus, "validation")
    r = evaluate(lm.model, data, lm.train_length, device=device, autocast=autocast, positions=False,
                 progress=s.progress)
    log(f"   {row} at lr {lr or s.base_lr():.3g}: validation loss {r.loss:.4f}, {r.bpb:.4f} bits/byte over "
        f"{r.tokens:,} tokens")
    payload = {"settings": ident, **r.summary()}
    write_json(run_dir / VALID_FILE, payload)
    return payload


def position_buckets(result: Any, buckets: int = POSITION_BUCKETS) -> dict[str, Any]:
    """Mean NLL (nats) per bucket of positions inside the segment, from an EvalResult's per-position sums.

    Position p is the index of the input a prediction is made from (0 .. length-2); bucket b covers positions
    ``edges[b] <= p < edges[b+1]``; ``loss`` is None for a bucket without targets."""
    import numpy as np

    nll, cnt = np.asarray(result.position_nll, dtype=np.float64), np.asarray(result.position_count, dtype=np.int64)
    n = len(nll)
    edges = np.linspace(0, n, max(1, min(buckets, n)) + 1).round().astype(int)
    sums, counts = np.add.reduceat(nll, edges[:-1]), np.add.reduceat(cnt, edges[:-1])
    return {"length": result.length, "edges": edges.tolist(), "count": counts.tolist(),
            "loss": [float(a / c) if c else None for a, c in zip(sums, counts)]}


def evaluate_one(s: CompareSettings, corpus: str, row: str, log: Any = print, *, lr: float | None = None
                 ) -> dict[str, Any]:
    """Test-split perplexity and bits per byte at every length, loss by position at the training length (cached)."""
    from blockstate.evaluation import evaluate, parse_lengths, write_report

    run_dir = s.run_dir(corpus, row, lr)
    ident = eval_identity(s)
    cached = _read(run_dir / EVAL_FILE)
    if cached and cached.get("settings") == ident:
        return {**cached, "status": "evaluated earlier"}
    lm, data, device, autocast = _load(s, run_dir, corpus, s.split)
    t0 = time.perf_counter()
    results = []
    for length in parse_lengths(s.lengths, lm.train_length):
        results.append(evaluate(lm.model, data, length, device=device, autocast=autocast, progress=s.progress))
        r = results[-1]
        log(f"   {row} L={length}: ppl {r.ppl:.3f}, {r.bpb:.4f} bits/byte over {r.tokens:,} tokens")
    seconds = time.perf_counter() - t0
    at_train = next((r for r in results if r.length == lm.train_length), None)
    meta = {"checkpoint": str(lm.path), "tokenizer": getattr(lm.tokenizer, "kind", "?"),
            "vocab_size": lm.tokenizer.vocab_size, "train_length": lm.train_length, "data": corpus,
            "parameters": sum(p.numel() for p in lm.model.parameters())}
    write_report({row: meta}, {row: results}, run_dir / "eval", s.split, corpus)
    payload = {"settings": ident, "train_length": lm.train_length, "parameters": meta["parameters"],
               "documents": data.num_documents, "eval_seconds": round(seconds, 1),
               "results": [r.summary() for r in results],
               "position": position_buckets(at_train) if at_train is not None else None}
    write_json(run_dir / EVAL_FILE, payload)
    del lm
    return {**payload, "status": f"evaluated in {seconds:.0f} s"}
