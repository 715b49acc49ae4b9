"""The paper's speed goals with our ratios, from the results ``scripts/gpu-check.sh`` leaves in its OUTDIR.

``python -m blockstate.benchmarks.gpu_check OUTDIR`` reads ``layers-{gpu,cpu}[-bf16].json`` (bench layers),
``train[-gpu].json`` (bench train) and ``generation.json`` (bench generate) and prints, per precision and mode,
the Block-Recurrent / BST:SH time ratio (paper: a BST layer is more than 10x faster), BST:SH / sliding window
(paper: less than 2x), BST:SH / block-local and full attention / BST:SH; then BST:SH's training tokens/s against
Slide's, its MFU, what gradient checkpointing saved at the longest length, and decoding ms/token. Ratios are
reported, never asserted: times depend on the machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REFERENCE = "bst-sh-s4"
RIVALS = (  # (layer, what is divided by what, the paper's goal as text, the check)
    ("brect", "Block-Recurrent / BST:SH", "> 10", lambda r: r > 10),
    ("peer-brect", "peer Block-Recurrent / BST:SH", "> 10", lambda r: r > 10),
    ("slide", "BST:SH / sliding window", "< 2", lambda r: r < 2),
    ("block", "BST:SH / block-local", "(none)", None),
    ("full", "full attention / BST:SH", "(none)", None),
)


def _label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def layer_goals(payload: dict[str, Any], title: str) -> list[str]:
    """One line per rival and mode: the ratio at every length, and whether the goal holds at every length."""
    results, lengths = payload["results"], payload["lengths"]
    ref = results.get(REFERENCE)
    if ref is None:
        return [f"{title}: {REFERENCE} not measured"]
    out = [f"{title} ({payload['machine']['device']}, D={payload['setting']['dim']}, W={payload['setting']['block']})"]
    for mode in ("forward", "backward"):
        for rival, text, goal, ok in RIVALS:
            if rival not in results:
                continue
            ratios = {}
            for n in lengths:
                a, b = ref[mode].get(n), results[rival][mode].get(n)
                if a and b:
                    ratios[n] = a["median"] / b["median"] if text.startswith("BST") else b["median"] / a["median"]
            if not ratios:
                continue
            verdict = "" if ok is None else ("  [met]" if all(ok(r) for r in ratios.values()) else "  [NOT met]")
            cells = ", ".join(f"{_label(n)} {r:.2f}" for n, r in ratios.items())
            what = "fwd" if mode == "forward" else "fwd+bwd"
            out.append(f"  {what:7} {text:30} goal {goal:6}: {cells}{verdict}")
    return out


def train_goals(payload: dict[str, Any]) -> list[str]:
    rows = {name: {r["length"]: r for r in rs} for name, rs in payload["results"].items()}
    ref = rows.get(REFERENCE, {})
    out = [f"bench train, size {payload['size']}, {payload['precision']}, {payload['machine']['device']}"]
    for n, r in ref.items():
        parts = [f"{r['tokens_per_s']:,.0f} tok/s"]
        if r.get("mfu") is not None:
            parts.append(f"MFU {100 * r['mfu']:.1f}%")
        slide = rows.get("slide", {}).get(n)
        if slide:
            parts.append(f"{r['tokens_per_s'] / slide['tokens_per_s']:.2f}x Slide's tokens/s (goal >= 0.9)")
        if r.get("checkpointing_saves_mib") is not None:
            parts.append(f"peak step memory {r['peak_mib']:,.0f} MiB, {r['checkpointed_peak_mib']:,.0f} MiB with "
                         f"gradient checkpointing")
        out.append(f"  {REFERENCE} at {_label(n)}: " + ", ".join(parts))
    return out


def generation_goals(payload: dict[str, Any]) -> list[str]:
    out = [f"bench generate, size {payload['size']}, {payload['machine']['device']} (ms per token by context)"]
    for name, rows in payload["results"].items():
        cells = ", ".join(f"{_label(r['context'])} {r['ms_per_token']:.2f}" for r in rows)
        growth = rows[-1]["ms_per_token"] / rows[0]["ms_per_token"] if rows else float("nan")
        out.append(f"  {name:26} {cells}  (x{growth:.2f} from the shortest to the longest context)")
    dynamic = payload["results"].get("bst-sh-s4")
    for suffix, what in ((" static", "static cache (a CUDA graph on CUDA)"),
                         (" static compiled", "static cache, step compiled (torch.compile)")):
        other = payload["results"].get("bst-sh-s4" + suffix)
        if dynamic and other:  # against the dynamic cache's eager step
            cells = ", ".join(f"{_label(a['context'])} x{a['ms_per_token'] / b['ms_per_token']:.2f}"
                              for a, b in zip(dynamic, other))
            out.append(f"  {what} speed-up, bst-sh-s4 dynamic / this: {cells}")
    return out


def report(outdir: Path) -> str:
    from blockstate.benchmarks.layers_report import load

    outdir = Path(outdir)
    lines = ["# the paper's speed goals, our ratios (time ratios; > 1 means BST:SH is faster where rival / BST)"]
    for stem, title in (("layers-gpu", "bench layers fp32"), ("layers-gpu-bf16", "bench layers bf16 autocast"),
                        ("layers-cpu", "bench layers fp32 (CPU)"), ("layers-cpu-bf16", "bench layers bf16 (CPU)")):
        path = outdir / f"{stem}.json"
        if path.is_file():
            lines += [""] + layer_goals(load(path), title)
    for stem, fn in (("train-gpu", train_goals), ("train", train_goals), ("generation", generation_goals)):
        path = outdir / f"{stem}.json"
        if path.is_file():
            lines += [""] + fn(json.loads(path.read_text()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m blockstate.benchmarks.gpu_check OUTDIR", file=sys.stderr)
        return 2
    print(report(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
