"""Evaluation reports: ``results.json``, a markdown table and two PNGs (perplexity / bits per byte against the
evaluation length, loss by token position inside a segment)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from blockstate.evaluation.evaluate import EvalResult

PROTOCOL = ("every document of the split is scored whole and on its own: it is cut into consecutive segments of "
            "the evaluation length that share one boundary token, so every token is a target exactly once with "
            "the context inside its segment (no sliding window); documents shorter than the length are one "
            "shorter segment, scored as they are; the first token is predicted from the document separator. "
            "ppl = exp(NLL / tokens); bits per byte = NLL / (ln 2 * UTF-8 bytes), independent of the tokenizer.")


def binned_positions(result: EvalResult, bins: int = 48) -> dict[str, list[float]]:
    """Mean loss in log-spaced position bins (position = index of the target inside the segment, from 1)."""
    losses = np.asarray(result.position_nll or [], dtype=np.float64)
    counts = np.asarray(result.position_count or [], dtype=np.float64)
    n = len(losses)
    if n == 0:
        return {"position": [], "loss": []}
    edges = np.unique(np.round(np.geomspace(1, n + 1, bins + 1)).astype(int))
    pos, out = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        c = counts[lo - 1:hi - 1].sum()
        if c > 0:
            pos.append(float(np.sqrt(lo * (hi - 1)) if hi - 1 > lo else lo))
            out.append(float(losses[lo - 1:hi - 1].sum() / c))
    return {"position": pos, "loss": out}


def markdown_table(models: dict[str, dict[str, Any]]) -> str:
    lines = ["| model | tokenizer | train length | eval length | x train | tokens | loss | ppl | bits/byte |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        for r in m["results"]:
            ratio = r["length"] / m["train_length"] if m.get("train_length") else float("nan")
            lines.append(f"| {name} | {m.get('tokenizer', '?')} | {m.get('train_length', '?')} | {r['length']} | "
                         f"{ratio:g} | {r['tokens']:,} | {r['loss']:.4f} | {r['ppl']:.3f} | {r['bpb']:.4f} |")
    return "\n".join(lines) + "\n"


def write_report(models: dict[str, dict[str, Any]], results: dict[str, list[EvalResult]], out_dir: Path,
                 split: str, data: str, complete: bool = True) -> dict[str, Path]:
    """``models[name]`` holds metadata (checkpoint, tokenizer, train_length); ``results[name]`` its results.
    ``complete=False``: a report of the lengths finished so far (JSON and markdown only, the plots come last)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"data": data, "split": split, "protocol": PROTOCOL, "complete": complete,
                               "models": {}}
    for name, meta in models.items():
        payload["models"][name] = {**meta, "results": [r.summary() for r in results[name]],
                                   "loss_by_position": {str(r.length): binned_positions(r) for r in results[name]}}
    paths = {"json": out_dir / "eval_results.json", "markdown": out_dir / "eval_results.md",
             "lengths_png": out_dir / "ppl_vs_length.png", "positions_png": out_dir / "loss_by_position.png"}
    _replace(paths["json"], json.dumps(payload, indent=1) + "\n")  # never a half-written report
    table = markdown_table(payload["models"])
    status = "" if complete else " - in progress, the lengths finished so far"
    _replace(paths["markdown"], f"# Evaluation on {data} ({split} split){status}\n\n{table}\nProtocol: {PROTOCOL}\n")
    if not complete:
        return {k: v for k, v in paths.items() if k in ("json", "markdown")}
    plot_lengths(payload["models"], paths["lengths_png"])
    plot_positions(payload["models"], paths["positions_png"])
    return paths


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lengths(models: dict[str, dict[str, Any]], out: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for name, m in models.items():
        rs = m["results"]
        x = [r["length"] for r in rs]
        axes[0].plot(x, [r["ppl"] for r in rs], "o-", label=name)
        axes[1].plot(x, [r["bpb"] for r in rs], "o-", label=name)
        if m.get("train_length"):
            for ax in axes:
                ax.axvline(m["train_length"], color="gray", linestyle=":", linewidth=0.8)
    for ax, label in zip(axes, ("token perplexity", "bits per byte")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("evaluation length (tokens; dotted: training length)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("length generalisation")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_positions(models: dict[str, dict[str, Any]], out: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, m in models.items():
        for length, curve in m["loss_by_position"].items():
            if curve["position"]:
                ax.plot(curve["position"], curve["loss"], label=f"{name} L={length}")
    ax.set_xscale("log")
    ax.set_xlabel("token position inside the segment")
    ax.set_ylabel("mean loss (nats / token)")
    ax.set_title("loss by position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def format_results(name: str, results: list[EvalResult], train_length: int | None) -> str:
    rows = []
    for r in results:
        ratio = f" ({r.length / train_length:g}x train)" if train_length else ""
        rows.append(f"{name} L={r.length}{ratio}: loss {r.loss:.4f}, ppl {r.ppl:.3f}, {r.bpb:.4f} bits/byte "
                    f"over {r.tokens:,} tokens" + ("" if math.isfinite(r.loss) else " (non-finite!)"))
    return "\n".join(rows)
