"""``blockstate synthetic``: what the context states recall. Each chosen model is trained from scratch on each
chosen synthetic task (``blockstate.data.synthetic``: fresh seeded batches every step, loss on the answer
positions only) and scored on the task's held-out sets; the result is a table of accuracy by model x length /
distance (markdown + JSON) and a plot.

Like for like: for one task every model gets the same vocabulary, width, depth, heads, block size W and training
length, and each baseline's budget knob is solved so its parameter count matches BST:SH:S4's
(``synthetic_models``); the same seed, batches, step count and recipe. The recipe is the project's optimiser
(AdamW with its three parameter groups: the SSM parameters at a lower learning rate and no weight decay), its
warmup + cosine schedule and gradient clipping; only the loop is here, because the trainer reads corpora of
text and scores every token, while these tasks score only their answers.

Each (task, model) pair writes ``<out>/pairs/<task>/<model>.json`` when it finishes; a rerun of the same command
skips finished pairs, and a pair trained with other settings is refused (``--overwrite`` retrains it). The
whole comparison is rewritten from the pair files each time (``synthetic.{md,json,png}``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from blockstate.benchmarks.common import machine, write_json
from blockstate.benchmarks.synthetic_models import model_overrides, parameters, shared_fields
from blockstate.data.segments import IGNORE_INDEX
from blockstate.data.synthetic import SyntheticSet, SyntheticTask, make_task

DEFAULT_TASKS = ["mqar", "passkey"]
DEFAULT_MODELS = ["bst-sh-s4", "bst-mf-s4", "bst-sh-unstructured", "slide", "gpt", "brect", "gss-hybrid"]
DEFAULT_BLOCK_SIZE = 16
# Per task: steps and batch of the default CPU run, and held-out examples per test set. Measured on 2 cores shared
# with other jobs (load ~4): a step of 4-5k tokens takes 0.1-0.4 s for these D = 64 models (GPT the fastest,
# Block-Recurrent the slowest), so 7 models x (200 MQAR + 400 passkey steps) take ~20 minutes with evaluation.
# Full attention learns the one-digit passkey in ~200 steps; no model learns MQAR in this budget (GPT stayed on
# the 1/num_kv_pairs plateau for 3000 steps at L = 64 here; Zoology trains for 64 epochs of 100k rows).
RECIPES: dict[str, dict[str, int]] = {
    "mqar": dict(steps=200, batch_size=16, test_examples=128),
    "passkey": dict(steps=400, batch_size=16, test_examples=64),
    "copy": dict(steps=400, batch_size=16, test_examples=256),
    "induction": dict(steps=400, batch_size=16, test_examples=256),
    "listops": dict(steps=400, batch_size=4, test_examples=256),
}
DEFAULT_LR = 3e-3
LOSS_POINTS = 20  # training-loss curve kept in each pair's JSON


@dataclasses.dataclass
class SyntheticSettings:
    tasks: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_TASKS))
    task_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # task -> option -> value
    models: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_MODELS))
    size: str = "tiny"
    block_size: int = DEFAULT_BLOCK_SIZE
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    steps: int | None = None  # None: RECIPES[task]["steps"]
    batch_size: int | None = None
    test_examples: int | None = None
    lr: float = DEFAULT_LR
    warmup_steps: int = 40
    seed: int = 0
    precision: str = "fp32"
    device: str = "auto"
    threads: int | None = 1
    out: Path = Path("benchmarks/results/synthetic")
    overwrite: bool = False
    command: str = ""

    def task(self, name: str) -> SyntheticTask:
        options = dict(self.task_options.get(name, {}))
        if name == "passkey":
            options.setdefault("block_size", self.block_size)  # distances are counted in the models' blocks
        return make_task(name, **options)

    def recipe(self, name: str) -> dict[str, int]:
        base = RECIPES[name]
        return {"steps": self.steps or base["steps"], "batch_size": self.batch_size or base["batch_size"],
                "test_examples": self.test_examples or base["test_examples"]}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible here; use --device cpu")
    return torch.device(device)


# -- one pair ------------------------------------------------------------------------------------------------------
def pair_identity(s: SyntheticSettings, task: SyntheticTask, model: str) -> dict[str, Any]:
    """Everything that decides a pair's result: a saved pair with another identity is another experiment."""
    fields = shared_fields(s.size, task.vocab_size, task.train_length, s.block_size, s.model_args)
    return {"task": task.name, "task_options": task.options(), "model": model, "size": s.size,
            "model_overrides": model_overrides(model, s.size, fields, set(s.model_args)),
            **s.recipe(task.name), "lr": s.lr, "warmup_steps": s.warmup_steps, "seed": s.seed,
            "precision": s.precision}


def train_config(s: SyntheticSettings, steps: int):
    from blockstate.training import TrainConfig

    return TrainConfig(lr=s.lr, warmup_steps=min(s.warmup_steps, max(0, steps // 5)), seed=s.seed)


def answer_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the scored positions (targets are aligned with the logits)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def _tensors(batch: SyntheticSet, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(batch.input_ids).to(device), torch.from_numpy(batch.targets).to(device))


def train(model: torch.nn.Module, task: SyntheticTask, s: SyntheticSettings, steps: int, batch_size: int,
          device: torch.device, log: Any = print) -> dict[str, Any]:
    """The short loop: the project's optimiser groups, schedule and clipping; non-finite steps are skipped."""
    from blockstate.runtime.device import autocast_factory
    from blockstate.training.optim import build_optimizer, group_of_parameters, lr_factor, set_lr
    from blockstate.training.steps import clip_gradients

    cfg = train_config(s, steps)
    optimizer = build_optimizer(model, group_of_parameters(model), cfg)
    autocast = autocast_factory(s.precision, device)
    model.train()
    losses: list[float] = []
    skipped = 0
    started = time.perf_counter()
    for step in range(steps):
        set_lr(optimizer, lr_factor(step, cfg, steps))
        ids, targets = _tensors(task.train_batch(s.seed, step, batch_size), device)
        with autocast():
            logits = model(input_ids=ids).logits
        loss = answer_loss(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm, value = float(clip_gradients(model, cfg.grad_clip)), float(loss.detach())  # host skip: 2 syncs
        if not (math.isfinite(norm) and math.isfinite(value)):
            skipped += 1
            continue
        optimizer.step()
        losses.append(value)
        if (step + 1) % max(1, steps // 4) == 0:
            log(f"      step {step + 1}/{steps}: answer loss {np.mean(losses[-max(1, steps // 20):]):.3f}")
    seconds = time.perf_counter() - started
    every = max(1, len(losses) // LOSS_POINTS)
    curve = [round(float(np.mean(losses[i:i + every])), 4) for i in range(0, len(losses), every)]
    tail = losses[-max(1, len(losses) // 10):] or [float("nan")]
    return {"steps": steps, "skipped_steps": skipped, "train_seconds": round(seconds, 1),
            "seconds_per_step": round(seconds / max(1, steps), 4), "final_train_loss": round(float(np.mean(tail)), 4),
            "loss_curve": curve}


def distance_bins(distance_blocks: np.ndarray) -> np.ndarray:
    """Bin index of a distance in blocks: 0 for [0, 1), then [1, 2), [2, 4), [4, 8), ... (bin b: [2^(b-1), 2^b))."""
    d = np.maximum(distance_blocks, 0)
    return np.where(d < 1, 0, np.floor(np.log2(np.maximum(d, 1))).astype(np.int64) + 1)


def bin_label(b: int) -> str:
    return "<1" if b == 0 else f"{2 ** (b - 1)}-{2 ** b}"


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: SyntheticTask, sets: list[SyntheticSet], block_size: int,
             device: torch.device, batch_tokens: int = 32768) -> list[dict[str, Any]]:
    """Accuracy on every test set: per scored token, per example (all its scored tokens right), and, for tasks
    that bin by distance, per distance bin in blocks (token accuracy)."""
    model.eval()
    out = []
    for data in sets:
        right = np.zeros(data.targets.shape, dtype=bool)
        batch = max(1, batch_tokens // data.length)
        for start, part in zip(range(0, len(data), batch), data.batches(batch)):
            ids, _ = _tensors(part, device)
            pred = model(input_ids=ids).logits.argmax(-1).cpu().numpy()
            right[start:start + len(part)] = pred == part.targets
        mask = data.mask
        token_acc = float(right[mask].mean()) if mask.any() else float("nan")
        example_acc = float(np.mean([right[i][mask[i]].all() for i in range(len(data))]))
        entry = {"name": data.name, **data.info, "examples": len(data), "scored_tokens": int(mask.sum()),
                 "token_accuracy": round(token_acc, 4), "example_accuracy": round(example_acc, 4),
                 "accuracy": round(example_acc if task.score == "sequence" else token_acc, 4)}
        if task.bin_by_distance:
            bins = distance_bins(data.distance[mask] / block_size)
            hits = right[mask]
            entry["by_distance_blocks"] = [
                {"blocks": bin_label(int(b)), "bin": int(b), "scored_tokens": int((bins == b).sum()),
                 "accuracy": round(float(hits[bins == b].mean()), 4)} for b in np.unique(bins)]
        out.append(entry)
    return out


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def pair_path(s: SyntheticSettings, task: str, model: str) -> Path:
    return Path(s.out) / "pairs" / task / f"{model}.json"


def run_pair(s: SyntheticSettings, task: SyntheticTask, model: str, device: torch.device,
             log: Any = print) -> dict[str, Any]:
    """Train and score one model on one task, or return the saved result of the same experiment."""
    from blockstate.registry import create_model

    path = pair_path(s, task.name, model)
    ident = pair_identity(s, task, model)
    saved = _read(path)
    if saved is not None and not s.overwrite:
        if saved.get("identity") == ident:
            log(f"   {task.name} / {model}: done before ({path}), skipped")
            return {**saved, "status": "skipped"}
        differs = sorted(k for k in ident if saved.get("identity", {}).get(k) != ident[k])
        raise ValueError(f"{path} holds {task.name} / {model} trained with other settings ({', '.join(differs)}): "
                         "pass --overwrite to retrain it, or another --out")
    recipe = s.recipe(task.name)
    overrides = ident["model_overrides"]
    torch.manual_seed(s.seed)
    net = create_model(model, s.size, **overrides).to(device)
    count = parameters(model, s.size, overrides)
    log(f"   {task.name} / {model}: {count / 1e3:.0f}k parameters, {recipe['steps']} steps of "
        f"{recipe['batch_size']} x {task.train_length}")
    machine_at_start = machine()
    trained = train(net, task, s, recipe["steps"], recipe["batch_size"], device, log)
    started = time.perf_counter()
    sets = task.test_sets(s.seed, recipe["test_examples"])
    results = evaluate(net, task, sets, s.block_size, device)
    eval_seconds = time.perf_counter() - started
    payload = {"identity": ident, "parameters": count, "train": trained, "eval_seconds": round(eval_seconds, 1),
               "results": results, "machine_at_start": machine_at_start}
    write_json(path, payload)
    summary = ", ".join(f"{r['name']}: {r['accuracy']:.2f}" for r in results)
    log(f"      {trained['train_seconds']:.0f} s training, {eval_seconds:.0f} s evaluation; accuracy {summary}")
    return {**payload, "status": "trained"}


def reference_parameters(s: SyntheticSettings, task: SyntheticTask) -> int:
    """BST:SH:S4's parameter count on ``task``: the budget the baselines are matched to."""
    from blockstate.benchmarks.synthetic_models import REFERENCE

    fields = shared_fields(s.size, task.vocab_size, task.train_length, s.block_size, s.model_args)
    return parameters(REFERENCE, s.size, model_overrides(REFERENCE, s.size, fields, set(s.model_args)))


# -- the comparison ------------------------------------------------------------------------------------------------
def run(s: SyntheticSettings, log: Any = print) -> dict[str, Any]:
    """Every model on every task; writes ``synthetic.{json,md,png}`` under ``s.out`` and returns the payload."""
    from blockstate.benchmarks import synthetic_report

    tasks = [s.task(name) for name in s.tasks]  # bad task options fail before any training
    for task in tasks:
        for model in s.models:  # and so does a config the models refuse (checked on the meta device)
            parameters(model, s.size, pair_identity(s, task, model)["model_overrides"])
    if s.threads:
        torch.set_num_threads(s.threads)
    device = resolve_device(s.device)
    info = machine()
    log(f"synthetic on {info['device']}, torch {info['torch']}, {info['threads']} threads, OMP_WAIT_POLICY "
        f"{info['omp_wait_policy']}, load {info.get('load_1min_at_start', '?')}: {len(s.models)} models x "
        f"{len(tasks)} tasks, size {s.size}, W = {s.block_size}; results in {s.out}")
    started = time.perf_counter()
    entries = []
    for task in tasks:
        log(f"{task.name}: {task.summary}; options {task.options()}")
        for model in s.models:
            result = run_pair(s, task, model, device, log)
            entries.append({"task": task.name, "model": model, **{k: result[k] for k in (
                "parameters", "train", "eval_seconds", "results", "machine_at_start")},
                "overrides": result["identity"]["model_overrides"], "status": result["status"]})
    payload = {"benchmark": "synthetic", "command": s.command, "machine": info,
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(s).items()
                            if k not in ("command", "overwrite")},
               "tasks": {t.name: {"options": t.options(), "score": t.score, "summary": t.summary, "chance": t.chance(),
                                  "vocab_size": t.vocab_size, "train_length": t.train_length, **s.recipe(t.name),
                                  "reference_parameters": reference_parameters(s, t)}
                         for t in tasks},
               "wall_seconds_this_invocation": round(time.perf_counter() - started, 1), "pairs": entries}
    out = Path(s.out)
    write_json(out / "synthetic.json", payload)
    text = synthetic_report.markdown(payload)
    (out / "synthetic.md").write_text(text, encoding="utf-8")
    synthetic_report.plot(payload, out / "synthetic.png")
    log(text)
    log(f"wrote {out / 'synthetic.md'}, synthetic.json and synthetic.png")
    return payload
