"""Tables and plot of ``blockstate synthetic`` (from its JSON payload, so a saved run re-renders the same)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

RECALL_THRESHOLD = 0.9  # "recalls to": the farthest distance at or above this accuracy
NAMES = {"bst-sh-s4": "BST:SH:S4", "bst-mh-s4": "BST:MH:S4", "bst-mf-s4": "BST:MF:S4",
         "bst-sh-unstructured": "BST:SH:unstructured", "bst-mf-unstructured": "BST:MF:unstructured",
         "gpt": "GPT (full attention)", "slide": "Slide", "transformer-xl": "Transformer-XL",
         "brect": "Block-Recurrent", "gss-hybrid": "GSS-Hybrid"}


def display(model: str) -> str:
    return NAMES.get(model, model)


def _pct(x: float | None) -> str:
    if x is None or x != x:
        return "-"
    return f"{100 * x:.1f}" if x < 0.1 else f"{100 * x:.0f}"  # near chance, one more digit says more


def _seconds(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f} s" if x < 120 else f"{x / 60:.1f} min"


def columns(pairs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(key, header) of the accuracy columns of one task, in the order of its first pair's results: every test
    set, then (for tasks binned by distance) the distance bins of the training-length set."""
    out: list[tuple[str, str]] = []
    for p in pairs:
        for r in p["results"]:
            out.append((f"set:{r['name']}", r["name"]))
            for b in r.get("by_distance_blocks", []):
                out.append((f"bin:{r['name']}:{b['blocks']}", f"{b['blocks']} blocks"))
    seen: dict[str, str] = {}
    for key, head in out:
        seen.setdefault(key, head)
    bins = sorted((k for k in seen if k.startswith("bin:")), key=lambda k: _bin_order(k))
    return [(k, seen[k]) for k in seen if k.startswith("set:")] + [(k, seen[k]) for k in bins]


def _bin_order(key: str) -> tuple[str, float]:
    _, name, blocks = key.split(":", 2)
    return name, -1.0 if blocks.startswith("<") else float(blocks.split("-")[0])


def cell(pair: dict[str, Any], key: str) -> float | None:
    kind, _, rest = key.partition(":")
    for r in pair["results"]:
        if kind == "set" and r["name"] == rest:
            return r["accuracy"]
        if kind == "bin" and rest.startswith(r["name"] + ":"):
            label = rest[len(r["name"]) + 1:]
            for b in r.get("by_distance_blocks", []):
                if b["blocks"] == label:
                    return b["accuracy"]
    return None


def recalls_to(pair: dict[str, Any], train_length: int) -> str:
    """The farthest distance (blocks) recalled at >= 90% at the training length, for tasks tested by distance."""
    hits = [r["distance_blocks"] for r in pair["results"]
            if "distance_blocks" in r and r.get("length") == train_length and r["accuracy"] >= RECALL_THRESHOLD]
    if not any("distance_blocks" in r for r in pair["results"]):
        return ""
    return f"{max(hits)} blocks" if hits else "none"


def at_chance(pairs: list[dict[str, Any]], task: dict[str, Any]) -> list[str]:
    """Models whose final training answer loss is that of guessing uniformly (within 2%)."""
    chance = task.get("chance")
    if not chance or chance != chance:
        return []
    return [p["model"] for p in pairs if p["train"]["final_train_loss"] >= 0.98 * -math.log(chance)]


def task_text(name: str, task: dict[str, Any], settings: dict[str, Any]) -> str:
    o, w = task["options"], settings["block_size"]
    recipe = (f"{task['steps']} steps of {task['batch_size']} rows; {task['test_examples']} held-out rows per "
              f"test set; vocabulary {task['vocab_size']}")
    if name == "mqar":
        return (f"L = {o['seq_len']}, {o['num_kv_pairs']} key-value pairs, power law a = {o['power_a']}, noise "
                f"{'on' if o['random_non_queries'] else 'off'}; {recipe}. Accuracy over the queried values "
                f"(Zoology's metric), overall and by the distance from a query back to its value in blocks of "
                f"W = {w} (bin a-b: at least a, less than b blocks).")
    if name == "passkey":
        return (f"Training length {o['seq_len']}, {o['digits']}-digit passkeys at log-uniform random distances; W = "
                f"{o['block_size']}; {recipe}. Accuracy = all digits right (what greedy decoding returns), by the "
                "distance from the passkey to where it is asked for, in blocks (`d=k`: k blocks back, at the "
                "training length; `@ N`: the same at test length N, past the training length).")
    return f"Options {o}; {recipe}. Score: {'whole answers' if task['score'] == 'sequence' else 'token accuracy'}."


def markdown(payload: dict[str, Any]) -> str:
    st, m = payload["settings"], payload["machine"]
    lines = ["# Synthetic tasks: what the context states recall", "",
             f"Size {st['size']} (every model of a task: the same vocabulary, width, depth, heads, W = "
             f"{st['block_size']} and training length; each baseline's FFN / GSS width solved to BST:SH:S4's "
             f"parameter count), seed {st['seed']}, lr {st['lr']}, precision {st['precision']}; answer-only loss, "
             f"fresh batches every step. Machine: {m['device']}, torch {m['torch']}, {m['threads']} threads, "
             f"OMP_WAIT_POLICY {m.get('omp_wait_policy', '?')}, load {m.get('load_1min_at_start', '?')} at the "
             f"start; this invocation took {_seconds(payload.get('wall_seconds_this_invocation'))} (pairs done "
             "before are reused). Accuracies in %; bold: a column's best, where it is at least 10 points above "
             "chance. BST:MF and BST:SH:unstructured carry their variant's own extra SSM parameters (the ratio "
             "column).", "", f"Command: `{payload['command']}`", ""]
    for name, task in payload["tasks"].items():
        pairs = [p for p in payload["pairs"] if p["task"] == name]
        if not pairs:
            continue
        cols = columns(pairs)
        has_reach = any(recalls_to(p, task["train_length"]) for p in pairs)
        chance = f" Chance: {100 * task['chance']:.1f}%." if task.get("chance") == task.get("chance") else ""
        lines += [f"## {name}: {task['summary']}", "", task_text(name, task, st) + chance, ""]
        head = ["model", "parameters", "vs BST:SH:S4", "train time", "answer loss", *(h for _, h in cols)]
        if has_reach:
            head.append(f"recalls to (>= {RECALL_THRESHOLD:.0%})")
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        reference = task.get("reference_parameters")
        best = {k: max((cell(p, k) or 0.0) for p in pairs) for k, _ in cols}
        floor = (task.get("chance") or 0.0) + 0.1  # bold only clearly above chance (64 rows: +-6 points of noise)
        for p in pairs:
            ratio = f"{p['parameters'] / reference:.3f}" if reference else "-"
            row = [display(p["model"]), f"{p['parameters'] / 1e3:.0f}k", ratio, _seconds(p["train"]["train_seconds"]),
                   f"{p['train']['final_train_loss']:.3f}"]
            for k, _ in cols:
                v = cell(p, k)
                bold = "**" if v is not None and v == best[k] and v >= floor else ""
                row.append(f"{bold}{_pct(v)}{bold}")
            if has_reach:
                row.append(recalls_to(p, task["train_length"]))
            lines.append("| " + " | ".join(row) + " |")
        guessing = at_chance(pairs, task)
        if guessing:
            lines += ["", f"At chance (final answer loss within 2% of ln(1/chance) = {-math.log(task['chance']):.3f}, "
                          f"i.e. not using the context): {', '.join(display(m) for m in guessing)}. Models that "
                          "guess identically score identically."]
        lines.append("")
    return "\n".join(lines)


def render(path: Path) -> str:
    """Rewrite ``synthetic.md`` and ``synthetic.png`` beside a saved ``synthetic.json``; returns the markdown."""
    import json

    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--report {path} does not exist: pass the synthetic.json of a run") from None
    except ValueError:
        raise ValueError(f"--report {path} is not JSON: pass the synthetic.json of a run") from None
    if not isinstance(payload, dict) or payload.get("benchmark") != "synthetic":
        raise ValueError(f"--report {path} is not a blockstate synthetic result (no benchmark: synthetic)")
    text = markdown(payload)
    path.with_suffix(".md").write_text(text, encoding="utf-8")
    plot(payload, path.with_suffix(".png"))
    return text


def plot(payload: dict[str, Any], path: Path) -> None:
    """One panel per task: accuracy against distance in blocks (solid: training length, dashed: longer), or
    against the test sets / distance bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in payload["tasks"] if any(p["task"] == t for p in payload["pairs"])]
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(6.5 * max(1, len(tasks)), 4.6), squeeze=False)
    for ax, name in zip(axes[0], tasks):
        pairs = [p for p in payload["pairs"] if p["task"] == name]
        task = payload["tasks"][name]
        for i, p in enumerate(pairs):
            color, style = plt.cm.tab10(i % 10), "-" if p["model"].startswith("bst-") else "--"
            by_distance = [r for r in p["results"] if "distance_blocks" in r]
            if by_distance:
                for length in sorted({r["length"] for r in by_distance}):
                    rs = sorted((r for r in by_distance if r["length"] == length), key=lambda r: r["distance_blocks"])
                    longer = length != task["train_length"]
                    ax.plot([r["distance_blocks"] for r in rs], [r["accuracy"] for r in rs], marker="o",
                            linestyle=":" if longer else style, color=color,
                            label=display(p["model"]) + (f" @ {length}" if longer else ""))
                ax.set_xscale("log", base=2)
                ax.set_xlabel(f"distance (blocks of W = {payload['settings']['block_size']}); dotted: longer test "
                              "length")
                continue
            cols = [k for k, _ in columns(pairs) if k.startswith("bin:")] or [k for k, _ in columns(pairs)]
            heads = dict(columns(pairs))
            ax.plot(range(len(cols)), [cell(p, k) for k in cols], marker="o", linestyle=style, color=color,
                    label=display(p["model"]))
            ax.set_xticks(range(len(cols)), [heads[k] for k in cols], fontsize=8)
            ax.set_xlabel("distance from the query back to its value (blocks)" if cols[0].startswith("bin:")
                          else "test set")
        if task.get("chance") == task.get("chance"):
            ax.axhline(task["chance"], color="gray", linewidth=0.8, linestyle="-.", label="chance")
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: {task['summary']}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    st = payload["settings"]
    fig.suptitle(f"synthetic tasks, size {st['size']}, W = {st['block_size']}, seed {st['seed']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
