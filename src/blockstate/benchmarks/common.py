"""Shared benchmark plumbing: machine description, timing (one call, or contestants interleaved), result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def machine() -> dict[str, Any]:
    """What the numbers were measured on: printed in every table header and saved with every result."""
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "threads": torch.get_num_threads(),
                            # shared machines: OpenMP threads that spin while another process holds the core slow
                            # small-op layers down 10-50x; OMP_WAIT_POLICY=PASSIVE avoids that (set before start)
                            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset")}
    if hasattr(os, "getloadavg"):
        info["load_1min_at_start"] = round(os.getloadavg()[0], 2)
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    else:
        cpu = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        info["device"] = f"CPU {cpu} ({os.cpu_count()} cores)"
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], Any], device: torch.device) -> float:
    """Seconds for one call: CUDA events around it on a GPU, perf_counter on a CPU."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError | torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


@dataclass
class Cells:
    """What ``interleave`` measured: each contestant's warm-up result and timed seconds, and those that ran out of
    memory (in order; they have no times)."""

    warm: dict[str, Any] = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=dict)
    out_of_memory: list[str] = field(default_factory=list)


def interleave(names: Iterable[str], run_one: Callable[[str], float], *, repeats: int,
               warm: Callable[[str], Any] | None = None, on_oom: Callable[[str], None] | None = None) -> Cells:
    """The benchmark harness: ``warm(name)`` once per contestant (building it, untimed warm-up steps: the first
    out-of-memory shows here), then ``repeats`` rounds of ``run_one(name)`` (seconds) over every contestant in turn,
    so machine drift hits all alike. An out-of-memory error drops the contestant (``on_oom(name)`` cleans up) and
    is recorded as its cell; any other error propagates."""
    cells = Cells()
    for name in names:
        try:
            cells.warm[name] = warm(name) if warm is not None else None
            cells.times[name] = []
        except RuntimeError as exc:
            _out_of_memory(exc, name, cells, on_oom)
    for _ in range(repeats):
        for name in list(cells.times):
            try:
                cells.times[name].append(run_one(name))
            except RuntimeError as exc:
                cells.times.pop(name)
                _out_of_memory(exc, name, cells, on_oom)
    return cells


def _out_of_memory(exc: RuntimeError, name: str, cells: Cells, on_oom: Callable[[str], None] | None) -> None:
    if not is_oom(exc):
        raise exc
    cells.out_of_memory.append(name)
    if on_oom is not None:
        on_oom(name)


def spread(times: list[float]) -> dict[str, float]:
    """Median, min and max of a contestant's seconds."""
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median, min and max wall seconds over ``repeats`` runs after ``warmup`` runs of one call (synchronised on
    CUDA); ``interleave`` for several contestants."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return spread(times)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


def pyplot(path: Path) -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or None (with a note) where matplotlib is not installed: a bare GPU
    machine has torch and transformers only, and the JSON beside the plot holds every number."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: {path.name} not drawn")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
