"""Training throughput versus sequence length: tokens per second of one whole training step (forward, backward,
gradient clipping and the trainer's AdamW step) for every registered model at the same size preset (so the same
parameter budget: the registry matches every model to BST:SH:S4 within 5%) and the same sequence lengths.

Each step is the trainer's own ``train_step`` (``blockstate.training.trainer``: its parameter groups, optimiser,
precision policy, summed-NLL loss, clipping and finiteness checks, fused AdamW with its skip decided on the device),
on a synthetic batch handed over on the host as the data loader hands it; models that carry state across segments
(Slide, Transformer-XL, BRecT) get the previous step's carry, as in training. The step's metrics stay on the device
(the trainer reads them at log steps; the bench never does), so a step makes no host sync but a stateful model's
one skip-flag read, and the CUDA timing waits for the step's end itself. Only the schedule differs: a constant
learning rate (no warmup).
``max_train_length`` is set to the benchmarked length, as ``blockstate train --seq-len`` does: Transformer-XL's
window is half of it, the explicit kernels have one tap per position.

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
from pathlib import Path
from typing import Any

import torch

from blockstate.benchmarks.common import interleave, is_oom, machine, spread, write_json
from blockstate.benchmarks.common import timed as time_one
from blockstate.benchmarks.flops import mfu, peak_bf16_flops, step_flops
from blockstate.benchmarks.layers import parse_lengths, peak_bytes
from blockstate.benchmarks.train_contestants import Contestant, build, make_batch, make_step, state_bytes, visit
from blockstate.benchmarks.train_report import plot, table
from blockstate.training.config import CPU_MALLOC, PRECISIONS

DEFAULT_LENGTHS = "1k,4k,16k"
CPU_TIME_LIMIT = 30.0  # seconds per step; a model past it is not run at longer lengths


def _cuda_peak(step: Callable[[], None], device: torch.device) -> float:
    """Seconds of one step, and record its peak extra CUDA memory in ``_cuda_peak.last``."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    seconds = time_one(step, device)
    _cuda_peak.last = torch.cuda.max_memory_allocated(device) - before
    return seconds


_cuda_peak.last = 0


class _Length:
    """The contestants at one length for ``interleave``: built and warmed up, then timed in turn; on CUDA each
    visits the GPU for its turn only (moved outside the timed region) and its peak memory is recorded."""

    def __init__(self, length: int, *, size: str, batch: int, warmup: int, device: torch.device, precision: str,
                 flops: dict[tuple[str, int], int] | None):
        self.length, self.size, self.batch, self.warmup = length, size, batch, warmup
        self.device, self.precision, self.flops = device, precision, flops
        self.offload = device.type == "cuda"
        self.contestants: dict[str, Contestant] = {}
        self.steps: dict[str, Callable[[], None]] = {}
        self.peaks: dict[str, int] = {}

    def warm_up(self, n: str) -> float:
        """Seconds of the slowest warm-up step (the first out-of-memory shows here)."""
        c = self.contestants[n] = build(n, self.size, self.length)
        visit(c, self.device)
        batch = make_batch(int(c.model.config.vocab_size), self.batch, self.length)
        step = self.steps[n] = make_step(c, batch, self.device, self.precision)
        seconds = max(time_one(step, self.device) for _ in range(self.warmup))
        if self.flops is not None:
            self.flops[(n, self.length)] = step_flops(step)
        if self.offload:
            visit(c, torch.device("cpu"))
        self.peaks[n] = 0
        return seconds

    def run_one(self, n: str) -> float:
        if not self.offload:
            return time_one(self.steps[n], self.device)
        visit(self.contestants[n], self.device)
        seconds = _cuda_peak(self.steps[n], self.device)
        self.peaks[n] = max(self.peaks[n], _cuda_peak.last)
        visit(self.contestants[n], torch.device("cpu"))
        return seconds

    def release(self, n: str) -> None:
        """Out of memory: back to the host, and let go."""
        self.steps.pop(n, None)
        c = self.contestants.pop(n, None)
        if c is not None:
            visit(c, torch.device("cpu"))
        del c
        _release(self.device)


def run_grid(names: list[str], lengths: list[int], *, size: str = "tiny", batch: int = 1, steps: int = 3,
             warmup: int = 1, device: torch.device | None = None, precision: str = "auto",
             time_limit: float | None = CPU_TIME_LIMIT, memory: bool = True, checkpointing: bool = False,
             flops: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time every model at every length (models interleaved within a length); then the CPU memory pass."""
    device = device or torch.device("cpu")
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    stopped: dict[str, str] = {}
    flop_counts: dict[tuple[str, int], int] = {}
    peak_flops, _ = peak_bf16_flops(device)
    offload = device.type == "cuda"
    for length in lengths:
        active = [n for n in names if n not in stopped]
        if not active:
            break
        at = _Length(length, size=size, batch=batch, warmup=warmup, device=device, precision=precision,
                     flops=flop_counts if flops else None)
        cells = interleave(active, at.run_one, repeats=steps, warm=at.warm_up, on_oom=at.release)
        for n in cells.out_of_memory:
            stopped[n] = f"out of memory at {length:,}"
        contestants, peaks = at.contestants, at.peaks
        warm, times = cells.warm, cells.times
        for n, t in times.items():
            c = contestants[n]
            tokens = batch * length
            row = {"length": length, "tokens_per_s": tokens / statistics.median(t), "tokens_per_s_min": tokens / max(t),
                   "tokens_per_s_max": tokens / min(t), "step_s": {**spread(t), "warmup": warm[n]},
                   "parameters": c.parameters, "state_mib": state_bytes(c) / 2**20,
                   "peak_mib": peaks[n] / 2**20 if offload else None}
            if flops:
                row["flops_per_step"] = flop_counts.get((n, length))
                row["mfu"] = mfu(row["flops_per_step"], statistics.median(t), peak_flops)
            results[n].append(row)
            slowest = max(statistics.median(t), warm[n])  # a slow warm-up alone also stops it
            if time_limit is not None and slowest > time_limit and n not in stopped:
                stopped[n] = f"a step took {slowest:.1f} s > {time_limit:g} s at {length:,}"
        log(f"  L={length:,}: " + ", ".join(f"{n} {r[-1]['tokens_per_s']:,.0f} tok/s" for n, r in results.items()
                                           if r and r[-1]["length"] == length))
        del contestants, at
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
    if checkpointing:
        todo = {n: [r["length"] for r in rows] for n, rows in results.items()}
        saved = checkpointing_pass(todo, size, batch, precision, device)
        for n, rows in results.items():
            for r in rows:
                peak, seconds = saved[n].get(r["length"], (None, None))
                r["checkpointed_peak_mib"], r["checkpointed_step_s"] = peak, seconds
                r["checkpointing_saves_mib"] = (None if peak is None or r.get("peak_mib") is None
                                                else r["peak_mib"] - peak)
    return {"results": results, "stopped": stopped, "memory_note": memory_note,
            "peak_bf16_flops": peak_flops if flops else None}


def checkpointing_pass(todo: dict[str, list[int]], size: str, batch: int, precision: str, device: torch.device
                       ) -> dict[str, dict[int, tuple[float | None, float | None]]]:
    """Peak extra MiB and seconds of one step with gradient checkpointing on (after a warm-up step), measured as
    the plain step's peak is (CUDA allocator / live tensor storage), per model and length."""
    from blockstate.models.modeling_blockstate import enable_gradient_checkpointing

    out: dict[str, dict[int, tuple[float | None, float | None]]] = {}
    for n, lengths in todo.items():
        out[n] = {}
        for length in lengths:
            c = build(n, size, length)
            enable_gradient_checkpointing(c.model)
            visit(c, device)
            step = make_step(c, make_batch(int(c.model.config.vocab_size), batch, length), device, precision)
            try:
                seconds = time_one(step, device)  # also the warm-up: optimiser moments are state
                peak = peak_bytes(step, device)
                out[n][length] = (None if peak is None else peak / 2**20, seconds)
            except RuntimeError as exc:
                if not is_oom(exc):
                    raise
                out[n][length] = (None, None)
            del c, step
            _release(device)
    return out


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
    p.add_argument("--cpu-malloc", choices=CPU_MALLOC, default="keep",
                   help="as blockstate train: keep = glibc's malloc keeps freed memory for reuse (default keep)")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory pass")
    p.add_argument("--checkpointing", action="store_true",
                   help="also measure each point with gradient checkpointing: peak memory saved, step time")
    p.add_argument("--flops", action=argparse.BooleanOptionalAction, default=None,
                   help="count model FLOPs per step and report MFU against the GPU's bf16 peak (default: on CUDA)")
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
    if device.type == "cpu" and args.cpu_malloc == "keep":  # what blockstate train does on CPU
        from blockstate.runtime.device import keep_freed_memory

        keep_freed_memory()
    info = machine()
    print(f"bench train on {info['device']}, torch {info['torch']}, {info['threads']} threads, size {args.size}: "
          f"{', '.join(names)}")
    grid = run_grid(names, lengths, size=args.size, batch=args.batch_size, steps=args.steps,
                    warmup=max(1, args.warmup), device=device, precision=args.precision, time_limit=limit,
                    memory=not args.no_memory, checkpointing=args.checkpointing,
                    flops=args.flops if args.flops is not None else device.type == "cuda")
    from blockstate.runtime.device import use_bf16

    precision = f"{args.precision} ({'bf16 autocast' if use_bf16(args.precision, device) else 'fp32'})"
    payload = {"benchmark": "train", "size": args.size, "batch_size": args.batch_size, "lengths": lengths,
               "steps": args.steps, "warmup": max(1, args.warmup), "precision": precision, "device": device.type,
               "cpu_malloc": args.cpu_malloc if device.type == "cpu" else None,
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
