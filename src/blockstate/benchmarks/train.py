"""Training throughput versus sequence length: tokens per second of one whole training step (forward, backward,
gradient clipping and the trainer's AdamW step) for every registered model at the same size preset (so the same
parameter budget: the registry matches every model to BST:SH:S4 within 5%) and the same sequence lengths.

Each step is the trainer's own step (``blockstate.training``: its parameter groups, optimiser, precision policy
and summed-NLL loss); models that carry state across segments (Slide, Transformer-XL, BRecT) get the previous
step's carry, as in training. ``max_train_length`` is set to the benchmarked length, as ``blockstate train
--seq-len`` does: Transformer-XL's window is half of it, the explicit kernels have one tap per position.

Per length, every model is built and warmed up (one step), then the timed steps run round robin, so machine drift
hits every model alike. The table reports the median tokens/s with its min and max. A model whose warm-up or
median step passes ``--time-limit`` seconds (or that runs out of memory) is not run at longer lengths; the table
says so.

Peak memory: on CUDA, the allocator's peak during a timed step above the memory held before it (parameters and
optimiser state), i.e. activations, gradients and temporaries. Elsewhere the same quantity as live tensor
storage tracked op by op, after all timings (``blockstate.benchmarks.layers.PeakTensorMemory``).
``state_mib`` (parameters + AdamW moments) is counted from tensor sizes.

On CUDA the models wait on the host and visit the GPU for their turn (moved outside the timed region), so fourteen
paper-size models with their optimiser state need not fit at once.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blockstate.benchmarks.common import machine, write_json
from blockstate.benchmarks.layers import is_oom, parse_lengths, peak_bytes
from blockstate.benchmarks.layers import timed as time_one

DEFAULT_LENGTHS = "1k,4k,16k"
PRECISIONS = ("auto", "fp32", "bf16")
CPU_TIME_LIMIT = 30.0  # seconds per step; a model past it is not run at longer lengths


@dataclass
class Contestant:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    stateful: bool
    parameters: int
    carry: Any = None


def build(name: str, size: str, length: int, seed: int = 0) -> Contestant:
    """The model at ``size`` trained on segments of ``length``, with the trainer's optimiser (on the host)."""
    from blockstate.registry import carries_state, create_model
    from blockstate.training import TrainConfig, build_optimizer, group_of_parameters

    torch.manual_seed(seed)
    model = create_model(name, size, max_train_length=length)
    optimizer = build_optimizer(model, group_of_parameters(model), TrainConfig())
    return Contestant(name, model, optimizer, carries_state(model), sum(p.numel() for p in model.parameters()))


def visit(c: Contestant, device: torch.device) -> None:
    """Move a model, its optimiser moments and its carry to ``device`` (AdamW's step counters stay on the host)."""
    c.model.to(device)
    for state in c.optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                state[key] = value.to(device)
    if c.carry is not None:
        from blockstate.registry import map_carry

        c.carry = map_carry(lambda t: t.to(device), c.carry)


def state_bytes(c: Contestant) -> int:
    params = sum(p.numel() * p.element_size() for p in c.model.parameters())
    moments = sum(v.numel() * v.element_size() for s in c.optimizer.state.values() for k, v in s.items()
                  if torch.is_tensor(v) and k != "step")
    return params + moments


def make_batch(vocab: int, batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "reset": torch.zeros(batch, dtype=torch.bool)}


def make_step(c: Contestant, batch: dict[str, torch.Tensor], device: torch.device, precision: str,
              grad_clip: float = 1.0) -> Callable[[], None]:
    """One training step as ``blockstate train`` runs it: summed NLL / target count, backward, clip, AdamW."""
    from blockstate.training.steps import autocast_factory, step_nll

    autocast = autocast_factory(precision, device)
    batch = {k: v.to(device) for k, v in batch.items()}
    count = max(1, batch["input_ids"].numel() - batch["input_ids"].shape[0])

    def step() -> None:
        c.model.train()
        nll, carry = step_nll(c.model, batch, device, autocast, c.carry, c.stateful)
        (nll / count).backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(c.model.parameters(), grad_clip)
        c.optimizer.step()
        c.optimizer.zero_grad(set_to_none=True)
        c.carry = carry

    return step


def _cuda_peak(step: Callable[[], None], device: torch.device) -> float:
    """Seconds of one step, and record its peak extra CUDA memory in ``_cuda_peak.last``."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    seconds = time_one(step, device)
    _cuda_peak.last = torch.cuda.max_memory_allocated(device) - before
    return seconds


_cuda_peak.last = 0


def run_grid(names: list[str], lengths: list[int], *, size: str = "tiny", batch: int = 1, steps: int = 3,
             warmup: int = 1, device: torch.device | None = None, precision: str = "auto",
             time_limit: float | None = CPU_TIME_LIMIT, memory: bool = True,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time every model at every length (models interleaved within a length); then the CPU memory pass."""
    device = device or torch.device("cpu")
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    stopped: dict[str, str] = {}
    offload = device.type == "cuda"
    for length in lengths:
        active = [n for n in names if n not in stopped]
        if not active:
            break
        contestants: dict[str, Contestant] = {}
        steps_of: dict[str, Callable[[], None]] = {}
        warm: dict[str, float] = {}
        for n in active:  # build and warm up; the first out-of-memory shows here
            try:
                c = build(n, size, length)
                vocab = int(c.model.config.vocab_size)
                visit(c, device)
                step = make_step(c, make_batch(vocab, batch, length), device, precision)
                warm[n] = max(time_one(step, device) for _ in range(warmup))
                if offload:
                    visit(c, torch.device("cpu"))
                contestants[n], steps_of[n] = c, step
            except RuntimeError as exc:
                if not is_oom(exc):
                    raise
                stopped[n] = f"out of memory at {length:,}"
                _release(device)
        times: dict[str, list[float]] = {n: [] for n in contestants}
        peaks: dict[str, int] = {n: 0 for n in contestants}
        for _ in range(steps):  # round robin: drift hits every model alike
            for n in list(times):
                c = contestants[n]
                try:
                    if offload:
                        visit(c, device)
                        times[n].append(_cuda_peak(steps_of[n], device))
                        peaks[n] = max(peaks[n], _cuda_peak.last)
                        visit(c, torch.device("cpu"))
                    else:
                        times[n].append(time_one(steps_of[n], device))
                except RuntimeError as exc:
                    if not is_oom(exc):
                        raise
                    stopped[n] = f"out of memory at {length:,}"
                    times.pop(n)
                    visit(c, torch.device("cpu"))
                    _release(device)
        for n, t in times.items():
            c = contestants[n]
            tokens = batch * length
            row = {"length": length, "tokens_per_s": tokens / statistics.median(t), "tokens_per_s_min": tokens / max(t),
                   "tokens_per_s_max": tokens / min(t), "step_s": {"median": statistics.median(t), "min": min(t),
                                                                   "max": max(t), "warmup": warm[n]},
                   "parameters": c.parameters, "state_mib": state_bytes(c) / 2**20,
                   "peak_mib": peaks[n] / 2**20 if offload else None}
            results[n].append(row)
            slowest = max(statistics.median(t), warm[n])  # a slow warm-up alone also stops it
            if time_limit is not None and slowest > time_limit and n not in stopped:
                stopped[n] = f"a step took {slowest:.1f} s > {time_limit:g} s at {length:,}"
        log(f"  L={length:,}: " + ", ".join(f"{n} {r[-1]['tokens_per_s']:,.0f} tok/s" for n, r in results.items()
                                           if r and r[-1]["length"] == length))
        del contestants, steps_of
        _release(device)
    memory_note = "CUDA allocator peak above parameters + optimiser state, during a timed step"
    if device.type == "cpu":
        if memory:
            todo = {n: [r["length"] for r in rows] for n, rows in results.items()}
            cpu_peaks = memory_pass(todo, size, batch, precision, torch.get_num_threads())
            for n, rows in results.items():
                for r in rows:
                    r["peak_mib"] = cpu_peaks[n].get(r["length"])
            memory_note = ("peak live tensor storage of one step above parameters + optimiser state, tracked op by "
                           "op after all timings")
        else:
            memory_note = "not measured (--no-memory)"
    return {"results": results, "stopped": stopped, "memory_note": memory_note}


def memory_pass(todo: dict[str, list[int]], size: str, batch: int, precision: str, threads: int
                ) -> dict[str, dict[int, float | None]]:
    """Peak extra resident MiB of one training step (after one warm-up step) per model and length (CPU)."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    out: dict[str, dict[int, float | None]] = {}
    for n, lengths in todo.items():
        out[n] = {}
        for length in lengths:
            c = build(n, size, length)
            step = make_step(c, make_batch(int(c.model.config.vocab_size), batch, length), device, precision)
            try:
                step()  # optimiser moments and lazily built buffers are state, not a step's working memory
                peak = peak_bytes(step, device)
                out[n][length] = None if peak is None else peak / 2**20
            except RuntimeError as exc:
                if not is_oom(exc):
                    raise
                out[n][length] = None
            del c, step
            gc.collect()
    return out


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
    return "\n".join(lines + mem + ([""] + notes if notes else []))


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


# -- command line ------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="all", help="comma-separated registered names, or all (default)")
    p.add_argument("--size", default="tiny", help="size preset for every model: tiny, small, paper (default tiny)")
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help="sequence lengths, e.g. 1k,4k,16k (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per point (median, min, max; default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help=f"stop a model at longer lengths once a step takes longer than S seconds "
                        f"(default {CPU_TIME_LIMIT:g} on CPU, none on GPU)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="as blockstate train: auto = bf16 autocast where bf16 is native (default auto)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory pass")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                   help="directory for train.json / train.png (train-gpu.* on CUDA; default %(default)s)")
    p.add_argument("--report", type=Path, default=None, metavar="JSON",
                   help="print the table of a saved result (and redraw its PNG beside it); runs nothing")


def parse_models(text: str) -> list[str]:
    from blockstate.registry import get_model_entry, list_models

    if text.strip().lower() == "all":
        return list_models()
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError("--models is empty: name registered models (blockstate models lists them) or all")
    out = []
    for n in names:
        name = get_model_entry(n).name  # ValueError naming the known models
        if name not in out:
            out.append(name)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from blockstate.models import SIZES

    if args.report is not None:
        if not args.report.is_file():
            raise FileNotFoundError(f"--report {args.report} does not exist: pass a train.json written by bench train")
        try:
            payload = json.loads(args.report.read_text(encoding="utf-8"))
            text = table(payload)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"--report {args.report} is not a bench train result ({exc!r})") from None
        print(text)
        plot(payload, args.report.with_suffix(".png"))
        return payload

    names = parse_models(args.models)
    if args.size not in SIZES:
        raise ValueError(f"--size must be one of {', '.join(SIZES)}, got {args.size!r}")
    lengths = parse_lengths(args.lengths)
    if min(lengths) < 2:
        raise ValueError("--lengths: every length needs at least 2 tokens")
    for flag in ("batch_size", "steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.time_limit is not None and not args.time_limit > 0:
        raise ValueError(f"--time-limit must be a positive number of seconds, got {args.time_limit}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.device not in (None, "cpu", "cuda") and not str(args.device).startswith("cuda:"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible; use --device cpu")
    limit = args.time_limit if args.time_limit is not None else (CPU_TIME_LIMIT if device.type == "cpu" else None)
    info = machine()
    print(f"bench train on {info['device']}, torch {info['torch']}, {info['threads']} threads, size {args.size}: "
          f"{', '.join(names)}")
    grid = run_grid(names, lengths, size=args.size, batch=args.batch_size, steps=args.steps,
                    warmup=max(1, args.warmup), device=device, precision=args.precision, time_limit=limit,
                    memory=not args.no_memory)
    from blockstate.training.steps import use_bf16

    precision = f"{args.precision} ({'bf16 autocast' if use_bf16(args.precision, device) else 'fp32'})"
    payload = {"benchmark": "train", "size": args.size, "batch_size": args.batch_size, "lengths": lengths,
               "steps": args.steps, "warmup": max(1, args.warmup), "precision": precision, "device": device.type,
               "time_limit_s": limit, "machine": info,
               "parameters": {n: rows[0]["parameters"] for n, rows in grid["results"].items() if rows},
               "command": command_line(args), **grid}
    print(table(payload))
    stem = "train" if device.type == "cpu" else "train-gpu"
    write_json(args.out / f"{stem}.json", payload)
    plot(payload, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json and .png")
    return payload


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (with the OpenMP wait policy, which changes CPU times several-fold)."""
    import os

    env = f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} " if "OMP_WAIT_POLICY" in os.environ else ""
    return " ".join([env + "blockstate bench train", *_argv(args)])


def _argv(args: argparse.Namespace) -> list[str]:
    """The flags that differ from the defaults."""
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    base = vars(defaults.parse_args([]))
    out = []
    for key, value in vars(args).items():
        if key in base and value != base[key]:
            flag = "--" + key.replace("_", "-")
            out += [flag] if value is True else [flag, str(value)]
    return out
