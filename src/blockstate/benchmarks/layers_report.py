"""Tables, goals and the plot of ``blockstate bench layers`` (also re-rendered from a saved JSON: ``--report``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blockstate.benchmarks.common import pyplot

REFERENCE = "bst-sh-s4"  # the paper's speed comparison is BST:SH:S4 against the others


def load(path: Path) -> dict[str, Any]:
    """A saved result, with its lengths as integers again (JSON keys are strings)."""
    try:
        payload = json.loads(Path(path).read_text())
        for r in payload["results"].values():
            for mode in ("forward", "backward", "memory"):
                r[mode] = {int(k): v for k, v in r[mode].items()}
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise ValueError(f"--report {path}: not a bench layers result ({exc})") from None
    return payload


def _label(length: int) -> str:
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)


def tables(payload: dict[str, Any]) -> str:
    res, lengths = payload["results"], payload["lengths"]
    head = "| layer | " + " | ".join(_label(n) for n in lengths) + " |\n|---|" + "---|" * len(lengths)
    m = payload["machine"]
    out = [f"# One layer, {m['device']}, torch {m['torch']}, {m['threads']} threads, OMP_WAIT_POLICY "
           f"{m.get('omp_wait_policy', '?')}, load {m.get('load_1min_at_start', '?')} at start; "
           + ", ".join(f"{k}={v}" for k, v in payload["setting"].items())]

    def cell(r: dict[str, Any], length: int, fmt: Callable[[Any], str]) -> str:
        return fmt(r[length]) if length in r else "-"

    for mode, title in (("forward", "forward, median ms (min-max)"),
                        ("backward", "forward+backward, median ms")):
        out += [f"\n## {title}\n", head]
        for n in res:
            def fmt(t: dict[str, float], mode=mode) -> str:
                ms = f"{1000 * t['median']:.0f}"
                return f"{ms} ({1000 * t['min']:.0f}-{1000 * t['max']:.0f})" if mode == "forward" else ms
            out.append(f"| {n} | " + " | ".join(cell(res[n][mode], L, fmt) for L in lengths) + " |")
    out += ["\n## peak extra memory of forward+backward, MiB\n", head]
    for n in res:
        out.append(f"| {n} | " + " | ".join(
            cell(res[n]["memory"], L, lambda b: "n/a" if b is None else f"{b / 2**20:.0f}") for L in lengths) + " |")
    out += ["\n## ratios (forward medians)\n", head]
    for row, val in ratio_rows(payload).items():
        out.append(f"| {row} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in val) + " |")
    if payload["stopped"]:
        out.append("\nstopped: " + "; ".join(f"{n}: {why}" for n, why in payload["stopped"].items()))
    return "\n".join(out)


def ratio_rows(payload: dict[str, Any]) -> dict[str, list[float | None]]:
    """time(2L)/time(L) of each BST layer, and how many times faster BST:SH is than each rival."""
    res, lengths = payload["results"], payload["lengths"]

    def fwd(n: str, length: int) -> float | None:
        r = res.get(n, {}).get("forward", {}).get(length)
        return r["median"] if r else None

    rows: dict[str, list[float | None]] = {}
    for n in res:
        if n.startswith("bst-"):
            rows[f"{n} t(L)/t(L/2)"] = [
                (fwd(n, L) / fwd(n, L // 2)) if (L // 2 in lengths and fwd(n, L) and fwd(n, L // 2)) else None
                for L in lengths]
    ref = "bst-sh-s4"
    for rival in ("brect", "peer-brect", "slide", "full"):
        if rival in res and ref in res:
            rows[f"{rival} / {ref}"] = [
                (fwd(rival, L) / fwd(ref, L)) if (fwd(rival, L) and fwd(ref, L)) else None for L in lengths]
    return rows


def plot(payload: dict[str, Any], path: Path) -> None:
    plt = pyplot(path)
    if plt is None:
        return

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for ax, mode, title in zip(axes, ("forward", "backward", "memory"),
                               ("forward (s)", "forward+backward (s)", "peak extra memory (MiB)"), strict=True):
        for n, r in payload["results"].items():
            pts = sorted((L, v) for L, v in r[mode].items() if v is not None)
            if not pts:
                continue
            ys = [v["median"] if mode != "memory" else v / 2**20 for _, v in pts]
            style = "-" if n.startswith("bst-") else "--"
            ax.plot([L for L, _ in pts], ys, style, marker="o", markersize=3, label=n)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"one layer, {payload['machine']['device']}, batch {payload['setting']['batch']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fwd(payload: dict[str, Any], name: str, length: int) -> float | None:
    r = payload["results"].get(name, {}).get("forward", {}).get(length)
    return r["median"] if r else None


def goals(payload: dict[str, Any]) -> list[str]:
    """The issue's goals, each with the measured figures and whether they hold (never asserted in tests)."""
    lengths = [n for n in payload["lengths"] if n >= 4096]
    gpu = "cpu" not in payload["machine"]["device"].lower()
    lines = []

    def check(text: str, values: list[float], ok: bool) -> None:
        shown = ", ".join(f"{v:.2f}" for v in values) if values else "not measured"
        lines.append(f"[{'met' if ok and values else 'NOT met' if values else '  -  '}] {text}: {shown}")

    def speedups(rival: str) -> list[float]:
        return [_fwd(payload, rival, n) / _fwd(payload, REFERENCE, n) for n in lengths
                if _fwd(payload, rival, n) and _fwd(payload, REFERENCE, n)]

    if gpu:
        at4k = [v for v in speedups("brect")[:1]]
        check("BST:SH forward at 4k vs Block-Recurrent, x faster (goal >= 6)", at4k, all(v >= 6 for v in at4k))
        slide = [1 / v for v in speedups("slide")[:1]]
        check("BST:SH forward at 4k / sliding window (goal <= 2)", slide, all(v <= 2 for v in slide))
    for rival in ("brect", "peer-brect", "full"):
        if rival in payload["results"]:
            v = speedups(rival)
            check(f"BST:SH forward vs {rival} from 4k up, x faster (goal > 1)", v, all(x > 1 for x in v))
    # issue 16 item 4: BST:SH close to block-local, MH close to SH, growth per doubling near linear
    for name, base, limit in ((REFERENCE, "block", 1.3), ("bst-mh-s4", REFERENCE, 2.0)):
        v = [_fwd(payload, name, n) / _fwd(payload, base, n) for n in lengths
             if _fwd(payload, name, n) and _fwd(payload, base, n)]
        check(f"{name} forward / {base} from 4k up (goal <= {limit})", v, all(x <= limit for x in v))
    for name in payload["results"]:
        growth = [_fwd(payload, name, n) / _fwd(payload, name, n // 2) for n in lengths
                  if _fwd(payload, name, n) and _fwd(payload, name, n // 2)]
        if name.startswith("bst-"):
            check(f"{name} t(L)/t(L/2) from 4k up (goal <= 2.1)", growth, all(g <= 2.1 for g in growth))
        elif name == "block" and growth:  # the machine's own growth for a linear-cost layer, for comparison
            lines.append(f"[ref] block t(L)/t(L/2) from 4k up (no goal): {', '.join(f'{g:.2f}' for g in growth)}")
    mem = payload["results"].get(REFERENCE, {}).get("memory", {})
    per_token = [mem[n] / n / 1024 for n in sorted(mem) if n >= 4096 and mem[n]]
    check("BST:SH peak memory per token from 4k up, KiB (goal: flat, i.e. linear in L)", per_token,
          bool(per_token) and max(per_token) <= 1.25 * min(per_token))
    return lines
