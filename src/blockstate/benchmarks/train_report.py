"""Tables and plots of ``bench train`` results (``blockstate.benchmarks.train``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blockstate.benchmarks.common import pyplot


# -- reporting ---------------------------------------------------------------------------------------------------
def _k(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def table(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    lengths = payload["lengths"]
    head = (f"# training tokens/s (forward + backward + clip + AdamW step), size={payload['size']}, batch "
            f"{payload['batch_size']}, precision {payload['precision']}, {m['device']}, torch {m['torch']}, "
            f"{m['threads']} threads, OMP_WAIT_POLICY {m.get('omp_wait_policy', '?')}, load "
            f"{m.get('load_1min_at_start', '?')} at start\n"
            f"# median of {payload['steps']} timed steps after {payload['warmup']} warm-up (min-max); wall-clock on "
            f"{'a shared machine: noisy' if payload['device'] == 'cpu' else payload['device']}")
    lines = [head, "", f"| model | parameters at {lengths[0]:,} | " + " | ".join(f"{n:,}" for n in lengths) + " |",
             "|---|---|" + "---|" * len(lengths)]
    mem = ["", f"peak step memory, MiB ({payload['memory_note']}); state = parameters + AdamW moments", "",
           "| model | state | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---|---|" + "---|" * len(lengths)]
    for name, rows in payload["results"].items():
        by_length = {r["length"]: r for r in rows}
        cells, mcells = [], []
        for n in lengths:
            r = by_length.get(n)
            if r is None:
                cells.append("stopped" if name in payload["stopped"] else "-")
                mcells.append("-")
                continue
            cells.append(f"{_k(r['tokens_per_s'])} ({_k(r['tokens_per_s_min'])}-{_k(r['tokens_per_s_max'])})")
            mcells.append("-" if r.get("peak_mib") is None else f"{r['peak_mib']:,.0f}")
        params = rows[0]["parameters"] if rows else payload["parameters"].get(name, 0)
        state = f"{rows[0]['state_mib']:,.0f}" if rows else "-"
        lines.append(f"| {name} | {params / 1e6:.2f}M | " + " | ".join(cells) + " |")
        mem.append(f"| {name} | {state} | " + " | ".join(mcells) + " |")
    notes = [f"{n}: stopped: {why}" for n, why in payload["stopped"].items()]
    notes += ["parameters: the explicit kernels have one tap per position, so they grow with the length"] if any(
        "explicit" in n for n in payload["results"]) else []
    return "\n".join(lines + mem + extra_tables(payload) + ([""] + notes if notes else []))


def extra_tables(payload: dict[str, Any]) -> list[str]:
    """Model FLOPs utilisation and gradient checkpointing's memory saving, where they were measured."""
    lengths, out = payload["lengths"], []
    rows_of = {name: {r["length"]: r for r in rows} for name, rows in payload["results"].items()}
    if any(r.get("flops_per_step") for rows in rows_of.values() for r in rows.values()):
        peak = payload.get("peak_bf16_flops")
        out += ["", f"model FLOPs per step (GFLOP, FlopCounterMode) and MFU against the bf16 peak "
                    f"({'%.0f TFLOP/s' % (peak / 1e12) if peak else 'unknown: no MFU'})", "",
                "| model | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
        for name, rows in rows_of.items():
            cells = []
            for n in lengths:
                r = rows.get(n) or {}
                f, u = r.get("flops_per_step"), r.get("mfu")
                cells.append("-" if not f else f"{f / 1e9:,.1f}" + ("" if u is None else f" ({100 * u:.1f}%)"))
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    if any("checkpointed_peak_mib" in r for rows in rows_of.values() for r in rows.values()):
        out += ["", "gradient checkpointing: peak step MiB with it (change vs without; step time ratio)", "",
                "| model | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
        for name, rows in rows_of.items():
            cells = []
            for n in lengths:
                r = rows.get(n) or {}
                peak, saved, secs = r.get("checkpointed_peak_mib"), r.get("checkpointing_saves_mib"), \
                    r.get("checkpointed_step_s")
                if peak is None:
                    cells.append("-")
                    continue
                ratio = f", x{secs / r['step_s']['median']:.2f}" if secs and r.get("step_s") else ""
                cells.append(f"{peak:,.0f}" + ("" if saved is None else f" ({-saved:+,.0f}{ratio})"))
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def plot(payload: dict[str, Any], path: Path) -> None:
    plt = pyplot(path)
    if plt is None:
        return

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, rows) in enumerate(payload["results"].items()):
        if not rows:
            continue
        style = "-" if name.startswith("bst-") else "--"
        x = [r["length"] for r in rows]
        y = [r["tokens_per_s"] for r in rows]
        err = [[r["tokens_per_s"] - r["tokens_per_s_min"] for r in rows],
               [r["tokens_per_s_max"] - r["tokens_per_s"] for r in rows]]
        ax.errorbar(x, y, yerr=err, marker="o", linestyle=style, capsize=3, label=name,
                    color=plt.cm.tab20(i % 20))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("training tokens / s (median, min-max)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    m = payload["machine"]
    where = "wall-clock on a shared machine" if payload["device"] == "cpu" else payload["device"]
    ax.set_title(f"training step throughput, size={payload['size']}, batch {payload['batch_size']}, "
                 f"{payload['precision']}\n{m['device']} ({where})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
