"""Reporting of ``blockstate compare`` (``compare.py`` trains and evaluates): the markdown tables, the
length-generalisation plot and the loss-by-position plot, all rendered from the saved ``compare.json`` payload."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _at(entry: dict[str, Any], corpus: str, factor: float) -> dict[str, Any] | None:
    c = entry["corpora"].get(corpus)
    if not c or not c.get("eval"):
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


def _bits(loss: float | None) -> str:
    return "-" if loss is None or not math.isfinite(loss) else f"{loss / math.log(2):.4f}"


def markdown(payload: dict[str, Any]) -> str:
    st, m = payload["settings"], payload["machine"]
    corpora = st["corpora"]
    sweep = st.get("lr_sweep", 1) > 1
    evaluated = [e["corpora"][c] for e in payload["models"] for c in corpora if (e["corpora"].get(c) or {}).get("eval")]
    first = evaluated[0] if evaluated else None
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
    if sweep:
        lines += [f"Learning rate: each model trained at {st['lr_sweep']} learning rates "
                  f"({', '.join(f'{x:.3g}' for x in payload.get('lrs', []))}); the table reports the run with the "
                  "lowest validation loss (validation split, training length); only that run is scored on the "
                  f"{st['split']} split, so the {st['split']} split plays no part in the choice. Every run is in "
                  "compare.json.", ""]
    per = " {c} ppl | {c} bits/byte |" + (" {c} lr | {c} val bits/byte |" if sweep else "") + \
        " {c} train time | train tok/s |"
    width = 6 if sweep else 4
    lines += ["| model | parameters |" + "".join(per.format(c=c) for c in corpora),
              "|---|---|" + "---|" * (width * len(corpora))]
    best = {c: min((_at(e, c, 1) or {"bpb": math.inf})["bpb"] for e in payload["models"]) for c in corpora}
    for e in payload["models"]:
        cells = [e["name"], f"{(e.get('parameters') or 0) / 1e6:.2f}M"]
        for c in corpora:
            r, entry = _at(e, c, 1), e["corpora"].get(c) or {}
            t = entry.get("train", {})
            if r is None:
                cells += ["-"] * width
                continue
            bold = "**" if r["bpb"] == best[c] else ""
            rate = t["tokens"] / t["train_seconds"] if t.get("tokens") and t.get("train_seconds") else None
            cells += [f"{r['ppl']:.3f}", f"{bold}{r['bpb']:.4f}{bold}"]
            if sweep:
                valid = entry.get("valid") or {}
                cells += [f"{entry.get('lr', 0):.3g}", "-" if valid.get("bpb") is None else f"{valid['bpb']:.4f}"]
            cells += [_minutes(t.get("train_seconds")), "-" if rate is None else f"{rate:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    stateful = [e["name"] for e in payload["models"] if e.get("carries_state")]
    if stateful:
        span = st.get("lane_span", 0)
        how = (f"lanes that each walk a run of {span} consecutive segments from a random document and offset, "
               "then jump to a new random start (their state reset): documents are drawn as shuffled training "
               f"draws them (in proportion to their length), one draw per {span} segments per lane instead of one "
               "per segment" if span else
               "lanes that walk through whole documents in order (their state must follow the text) instead of "
               "shuffled segments; at a small batch that is far less varied data per step")
        controls = [e["name"] for e in payload["models"] if e["name"].endswith(":nocarry")]
        lines += ["", f"{', '.join(stateful)} carry state across training segments, so they train on "
                      f"{st['batch_size']} {how}." + (f" {', '.join(controls)}: the same architectures with nothing "
                                                      "carried (carry_state=false), on shuffled segments."
                                                      if controls else "")]
    lines += ["", "Length generalisation: test bits per byte at 1x, 4x and 16x the training length "
                  "(lower is better; the last column is 16x minus 1x).", ""]
    factors = sorted({round(r["length"] / e["corpora"][c]["eval"]["train_length"], 6) for e in payload["models"]
                      for c in corpora if (e["corpora"].get(c) or {}).get("eval")
                      for r in e["corpora"][c]["eval"]["results"]})
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
    lines += _position_table(payload, corpora)
    if sweep:
        lines += _sweep_table(payload, corpora)
    return "\n".join(lines) + "\n"


def _position_table(payload: dict[str, Any], corpora: list[str]) -> list[str]:
    """First, middle and last position bucket of the training-length segments (compare-position.png has all)."""
    have = [(e, c) for e in payload["models"] for c in corpora if (e["corpora"].get(c) or {}).get("position")]
    if not have:
        return []
    n = max(len(p["position"]["loss"]) for p in (e["corpora"][c] for e, c in have))
    lines = ["", f"Loss by position within the training-length segments ({st_split(payload)} split, bits per token, "
                 f"mean over {n} equal buckets of positions; compare-position.png plots every bucket): the first "
                 "bucket has the least context inside the segment.", "",
             "| model |" + "".join(f" {c} first | {c} middle | {c} last |" for c in corpora),
             "|---|" + "---|---|---|" * len(corpora)]
    for e in payload["models"]:
        cells = [e["name"]]
        for c in corpora:
            pos = (e["corpora"].get(c) or {}).get("position")
            if not pos:
                cells += ["-", "-", "-"]
                continue
            loss = pos["loss"]
            cells += [_bits(loss[0]), _bits(loss[len(loss) // 2]), _bits(loss[-1])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def st_split(payload: dict[str, Any]) -> str:
    return payload["settings"]["split"]


def _sweep_table(payload: dict[str, Any], corpora: list[str]) -> list[str]:
    lrs = payload.get("lrs", [])
    lines = ["", "Learning-rate sweep: validation bits per byte of every run (bold: the chosen one; "
                 "diverged: stopped on non-finite losses).", "",
             "| model |" + "".join(f" {c} lr {lr:.3g} |" for c in corpora for lr in lrs),
             "|---|" + "---|" * (len(corpora) * len(lrs))]
    for e in payload["models"]:
        cells = [e["name"]]
        for c in corpora:
            entry = e["corpora"].get(c) or {}
            runs = {round(r["lr"], 12): r for r in entry.get("sweep", [])}
            for lr in lrs:
                r = runs.get(round(lr, 12))
                if r is None:
                    cells.append("-")
                elif r.get("diverged"):
                    cells.append("diverged")
                else:
                    bpb = (r.get("valid") or {}).get("bpb")
                    text = "-" if bpb is None or not math.isfinite(bpb) else f"{bpb:.4f}"
                    cells.append(f"**{text}**" if r.get("chosen") else text)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _style(name: str) -> str:
    return "-" if name.startswith("bst-") else ":" if name.endswith(":nocarry") else "--"


def plot(payload: dict[str, Any], path: Path) -> None:
    """Test bits per byte against the evaluation length, one line per model, one panel per corpus."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = payload["settings"]["corpora"]
    fig, axes = plt.subplots(1, len(corpora), figsize=(7 * len(corpora), 4.8), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        train_length = None
        for i, e in enumerate(payload["models"]):
            c = e["corpora"].get(corpus)
            if not c or not c.get("eval"):
                continue
            train_length = c["eval"]["train_length"]
            rs = c["eval"]["results"]
            ax.plot([r["length"] for r in rs], [r["bpb"] for r in rs], marker="o", linestyle=_style(e["name"]),
                    color=plt.cm.tab20(i % 20), label=e["name"])
        if train_length:
            ax.axvline(train_length, color="gray", linestyle=":", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("evaluation length (tokens; dotted: training length)")
        ax.set_ylabel(f"{st_split(payload)} bits per byte")
        ax.set_title(corpus, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    st = payload["settings"]
    fig.suptitle(f"length generalisation, size {st['size']}, {st['tokens']:,} training tokens per model", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_position(payload: dict[str, Any], path: Path) -> bool:
    """Mean loss (bits per token) by position bucket inside the training-length segments; False if no data."""
    corpora = payload["settings"]["corpora"]
    if not any((e["corpora"].get(c) or {}).get("position") for e in payload["models"] for c in corpora):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(corpora), figsize=(7 * len(corpora), 4.8), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        for i, e in enumerate(payload["models"]):
            pos = (e["corpora"].get(corpus) or {}).get("position")
            if not pos:
                continue
            edges = pos["edges"]
            xs = [(a + b - 1) / 2 for a, b in zip(edges[:-1], edges[1:])]
            ys = [math.nan if v is None else v / math.log(2) for v in pos["loss"]]
            ax.plot(xs, ys, marker=".", linestyle=_style(e["name"]), color=plt.cm.tab20(i % 20), label=e["name"])
        ax.set_xlabel("position inside the segment (input index of the prediction; bucket centres)")
        ax.set_ylabel(f"{st_split(payload)} loss, bits per token")
        ax.set_title(corpus, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    st = payload["settings"]
    fig.suptitle(f"loss by position within the training-length segments, size {st['size']}, {st['tokens']:,} "
                 "training tokens per model", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
