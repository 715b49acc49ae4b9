"""Metrics: ``metrics.jsonl`` (one JSON object per line), TensorBoard when installed, the progress display
and the loss-curve PNG.

Each line of ``metrics.jsonl`` has ``kind`` (``train``, ``eval`` or ``final``) and ``step``. On resume the file
is cut back to the checkpoint's step, so it never holds the lost tail of a killed run twice.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from blockstate.runtime.checkpoint import atomic_write_text, output_error

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Append-only JSON lines (flushed per line: a kill loses nothing) plus optional TensorBoard scalars."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.path = run_dir / METRICS_FILE
        self.enabled = enabled
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None  # noqa: SIM115 - closed in close()
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard missing or broken: JSON lines are enough
                self._tb = None

    def log(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled or self._file is None:
            return
        record = {"kind": kind, "step": step, **{k: _clean(v) for k, v in values.items()}}
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as exc:  # a full disk: say so in one line instead of a bare errno
            raise output_error(exc, self.path.parent, METRICS_FILE) from exc
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _clean(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 6) if math.isfinite(v) else None
    return v


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics file, skipping a torn last line (a kill mid-write)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only records up to ``step`` (the checkpoint being resumed)."""
    if path.is_file():
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= step and r.get("kind") != "final"]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


class Progress:
    """A tqdm bar (loss, tokens/s, ETA) on a terminal; elsewhere (logs, nohup) a plain line every ~30 s."""

    def __init__(self, total: int | None, initial: int, enabled: bool):
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar = None
        self._last_line = time.monotonic()
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=0.5,
                            file=sys.stderr, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}"
                                                        "{postfix}]")

    def set_total(self, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def update(self, step: int, total: int | None, loss: float, tok_s: float, lr: float, eta_s: float | None) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss={loss:.3f} tok/s={tok_s:,.0f} lr={lr:.2e}", refresh=False)
            self.bar.update(step - self.bar.n)
            return
        now = time.monotonic()
        if now - self._last_line >= 30 or (total is not None and step >= total):
            self._last_line = now
            eta = f" eta {format_seconds(eta_s)}" if eta_s is not None else ""
            print(f"step {step}/{total or '?'} loss {loss:.4f} tok/s {tok_s:,.0f} lr {lr:.2e}{eta}", flush=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


SPEED_STEPS = 20  # the speed line is printed after this many steps (the first ones include warm-up costs)


class TrainLog:
    """What the loop reports: a ``train`` line of metrics.jsonl every ``log_every`` steps (the loss over the
    window since the last one, tokens/s), the progress bar, and once, early, the speed line (what this machine
    does). ``state`` is the loop's ``TrainState``, ``m`` the last step's ``StepMetrics``, read on the host by then
    (``steps.resolve``); ``add`` is called, in order, for each step that updated the weights."""

    def __init__(self, metrics: MetricsLogger, progress: Progress, tokens: int, *, precision: str,
                 budget_s: float | None, say: Any, quiet: bool):
        self.metrics, self.progress, self.say = metrics, progress, say
        self.precision, self.budget_s = precision, budget_s
        self.nll = self.count = 0.0
        self.last_loss: float | None = None
        self.t_rate = self.t_speed = time.perf_counter()
        self.tokens_rate = self.tokens_speed = tokens
        self.speed_said = quiet

    def add(self, loss_sum: float, count: float) -> None:
        """A step that updated the weights (skipped steps do not count in the window's loss)."""
        self.nll += loss_sum
        self.count += count

    def write(self, state: Any, m: Any, done: bool) -> None:
        total, budget_s, progress = state.total_steps, self.budget_s, self.progress
        now = time.perf_counter()
        tok_s = (state.tokens - self.tokens_rate) / max(1e-9, now - self.t_rate)
        self.t_rate, self.tokens_rate = now, state.tokens
        window_loss = self.nll / self.count if self.count else None  # None: all skipped
        self.last_loss = window_loss if window_loss is not None else self.last_loss
        self.metrics.log("train", state.step, loss=window_loss, lr=m.lr, tokens=state.tokens, tok_s=tok_s,
                         seconds=round(state.train_seconds, 2), grad_norm=m.grad_norm,
                         skipped_steps=state.skipped_steps)
        self.nll = self.count = 0.0
        eta = eta_seconds(state.step, total, state.train_seconds, budget_s)
        if total is None and budget_s and state.step > 0:
            progress.set_total(max(state.step, int(state.step * budget_s / max(state.train_seconds, 1e-9))))
        progress.update(state.step, total, self.last_loss if self.last_loss is not None else math.nan, tok_s, m.lr,
                        eta)
        if not self.speed_said and (state.step >= SPEED_STEPS or done):
            self.speed_said = True
            rate = (state.tokens - self.tokens_speed) / max(1e-9, now - self.t_speed)
            need = total * state.global_batch * state.seq_len / rate if total and rate > 0 else None
            left = f"; {total:,} steps take about {format_seconds(need)} at this rate" if need else ""
            (progress.write if progress.enabled else self.say)(
                f"speed: {rate:,.0f} tokens/s in {self.precision} over the first {state.step} steps{left}")


def eta_seconds(step: int, total: int | None, elapsed: float, budget_s: float | None) -> float | None:
    candidates = []
    if total is not None and step > 0:
        candidates.append((total - step) * elapsed / step)
    if budget_s is not None:
        candidates.append(max(0.0, budget_s - elapsed))
    return min(candidates) if candidates else None


def format_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def plot_loss_curve(metrics_path: Path, out: Path, title: str = "") -> Path | None:
    """Training loss (raw and smoothed) and validation loss against tokens seen, in nats per token."""
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    evals = [r for r in records if r.get("kind") == "eval" and r.get("val_loss") is not None]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    x = [r.get("tokens", r["step"]) for r in train]
    y = [r["loss"] for r in train]
    ax.plot(x, y, color="tab:blue", alpha=0.25, linewidth=0.8)
    ax.plot(x, _ema(y, 0.9), color="tab:blue", label="train (EMA 0.9)")
    if evals:
        ax.plot([r.get("tokens", r["step"]) for r in evals], [r["val_loss"] for r in evals], "o-",
                color="tab:orange", label="validation")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if evals and "val_bpb" in evals[-1]:
        right = ax.secondary_yaxis("right", functions=(lambda v: v / math.log(2), lambda v: v * math.log(2)))
        right.set_ylabel("bits / token")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _ema(values: list[float], beta: float) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else beta * avg + (1 - beta) * v
        out.append(avg)
    return out
