"""The run directory: choosing it, checking it is writable, and matching ``--resume`` to the right run.

A run directory holds ``run.json`` (a random run id and the start time), ``metrics.jsonl``, ``checkpoints/``,
the plots and ``results.json``. Every checkpoint records the run id, so a checkpoint copied into another run's
directory is refused instead of silently mixing two runs.

When training ends (or stops on SIGTERM / SIGINT) the last checkpoint's model, tokenizer, generation config
and training config are published at the root (:func:`publish_model`), as Hugging Face's Trainer does with its
``output_dir``: ``AutoModelForCausalLM.from_pretrained(run_dir)``, ``AutoTokenizer.from_pretrained(run_dir)``
and ``pipeline("text-generation", model=run_dir)`` take the run directory itself. ``published.json``, written
last, records the step and every published file's size and sha256 (``blockstate.runtime.loading.verify_published``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from blockstate.data.common import slug
from blockstate.runtime.checkpoint import (
    CHECKPOINTS,
    CONFIG_FILE,
    LATEST,
    STATE_FILE,
    atomic_write_text,
    fsync_path,
    is_checkpoint,
    latest_checkpoint,
    load_trainer_state,
    logger,
    output_error,
    read_json,
    tokenizer_dir,
    verify,
)
from blockstate.runtime.loading import PUBLISHED
from blockstate.runtime.manifest import MANIFEST, sha256_file
from blockstate.training.config import MUTABLE, TrainConfig, flag

RUN_FILE = "run.json"
# checkpoint files that are for resuming only, never published at the root
_RESUME_ONLY = ("optimizer.", "rng-rank", "carry-rank", STATE_FILE, MANIFEST)
RUN_FILES = (RUN_FILE, "metrics.jsonl", "results.json", "results.md", "loss_curve.png", "loss_by_position.png",
             "sample.txt", "train.log", PUBLISHED)


def holds_run(path: Path) -> bool:
    return (path / RUN_FILE).is_file() or (path / CHECKPOINTS).is_dir()


def default_output(cfg: TrainConfig, root: Path = Path("runs")) -> Path:
    """``runs/<model>-<size>-<data>``, numbered ``-2``, ``-3``... when taken, so a repeated bare command never
    touches an earlier run."""
    base = root / f"{cfg.model}-{cfg.size}-{slug(cfg.data)}"
    candidate, n = base, 1
    while holds_run(candidate):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def check_writable(path: Path, need_bytes: int = 0) -> None:
    """Create ``path`` and prove it takes a file, so a read-only or full disk fails now, not at step 500."""
    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"--output {path} is a file: pass a directory path")
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except NotADirectoryError:
        raise
    except OSError as exc:
        raise output_error(exc, path, "the run directory") from None
    free = shutil.disk_usage(path).free
    if need_bytes and free < need_bytes:
        raise output_error(OSError(errno.ENOSPC, "no space"), path,
                           f"checkpoints (about {need_bytes / 1e6:.0f} MB needed, {free / 1e6:.0f} MB free)")


def check_fresh(path: Path, overwrite: bool) -> None:
    """Refuse to start a new run where another one lives, unless ``overwrite``."""
    if holds_run(path) and not overwrite:
        ckpt = latest_checkpoint(path)
        where = f" (last checkpoint {ckpt.name})" if ckpt else ""
        raise ValueError(f"--output {path} already holds a training run{where}: pass --resume to continue it, "
                         "--overwrite to start again there, or another --output")


def start_run(path: Path, cfg: TrainConfig, overwrite: bool) -> dict[str, Any]:
    """Prepare a fresh run in ``path``; refuses to mix with an existing run unless ``overwrite``."""
    check_fresh(path, overwrite)
    if holds_run(path):
        # only our own files: a user who pointed --output at a directory of theirs keeps everything else
        shutil.rmtree(path / CHECKPOINTS, ignore_errors=True)
        shutil.rmtree(path / "tensorboard", ignore_errors=True)
        if (path / PUBLISHED).is_file():  # the earlier run's model at the root must not pass for this run's
            try:
                published = list(json.loads((path / PUBLISHED).read_text(encoding="utf-8")).get("files", {}))
            except (OSError, ValueError, AttributeError):
                published = []
            for name in published:
                if "/" not in str(name):
                    (path / str(name)).unlink(missing_ok=True)
        for name in RUN_FILES:
            (path / name).unlink(missing_ok=True)
    run = {"run_id": uuid.uuid4().hex, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": cfg.model,
           "size": cfg.size, "data": cfg.data}
    (path / RUN_FILE).write_text(json.dumps(run, indent=1) + "\n")
    return run


def find_resume(resume: str | Path) -> tuple[Path, Path]:
    """(run directory, newest checkpoint) from a run directory or a checkpoint directory."""
    path = Path(resume).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--resume {path} does not exist: pass the run directory of an earlier "
                                "blockstate train (e.g. runs/bst-sh-s4-tiny-python-stdlib)")
    if is_checkpoint(path) and path.parent.name == CHECKPOINTS:
        return path.parent.parent, path
    if not holds_run(path):
        raise ValueError(f"--resume {path} is not a blockstate run directory (no {RUN_FILE}, no {CHECKPOINTS}/): "
                         "pass the --output directory of an earlier blockstate train")
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"--resume {path}: the run has no complete checkpoint yet (it stopped before the "
                                "first save): start it again with --overwrite")
    return path, ckpt


def resume_config(run_dir: Path, ckpt: Path, explicit: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """The saved run's config, updated with the explicitly given settings that may change on resume.

    Raises ValueError when a given setting would make it another experiment, or when the checkpoint belongs
    to another run than the directory's.
    """
    verify(ckpt, action="resume from")
    state = load_trainer_state(ckpt)
    run = read_json(run_dir / RUN_FILE) if (run_dir / RUN_FILE).is_file() else {}
    if run.get("run_id") and state.get("run_id") and run["run_id"] != state["run_id"]:
        raise ValueError(f"checkpoint {ckpt} belongs to another run (run id {state['run_id'][:8]}) than {run_dir} "
                         f"(run id {run['run_id'][:8]}): resume the checkpoint's own run directory")
    saved = TrainConfig.from_dict(read_json(ckpt / CONFIG_FILE), str(ckpt / CONFIG_FILE))
    model_cfg = read_json(ckpt / "config.json") if (ckpt / "config.json").is_file() else {}
    bad = identity_mismatches(saved, explicit, resolved_settings(state, model_cfg))
    if bad:
        raise ValueError(f"--resume {run_dir}: {'; '.join(bad)} differ from the saved run: drop them to resume, "
                         "or start a new run with another --output")
    out = explicit.get("output")
    if out is not None and Path(out).resolve() != run_dir.resolve():
        raise ValueError(f"--output {out} and --resume {run_dir} name different runs: pass only --resume")
    values = saved.to_dict()
    values.update({k: v for k, v in explicit.items() if k in MUTABLE})
    values["output"] = str(run_dir)
    return TrainConfig(**values).validate(), state


def resolved_settings(state: dict[str, Any], model_config: dict[str, Any]) -> dict[str, Any]:
    """What a run really used for the settings saved as None (= the preset's value), from its checkpoint's
    trainer state and model config.json: so that --resume names 512, not None, and accepts an explicit 512."""
    values = {"seq_len": state.get("seq_len") or model_config.get("max_train_length"),
              "block_size": model_config.get("block_size"), "dropout": model_config.get("hidden_dropout")}
    return {k: v for k, v in values.items() if v is not None}


def identity_mismatches(saved: TrainConfig, explicit: dict[str, Any],
                        resolved: dict[str, Any] | None = None) -> list[str]:
    """Explicitly given identity settings that differ from the saved run's (for --resume); ``resolved``
    (:func:`resolved_settings`) stands in for saved values that are None."""
    bad = []
    for name, value in explicit.items():
        if name in MUTABLE:
            continue
        old = getattr(saved, name)
        if old is None and resolved and name in resolved:
            old = resolved[name]
        if isinstance(value, dict) and isinstance(old, dict):  # model_args: name the differing keys
            keys = sorted(k for k in set(value) | set(old) if _norm(value.get(k)) != _norm(old.get(k)))
            bad += [f"--model-arg {k}={value.get(k)!r} (the run used {k}={old.get(k)!r})" for k in keys]
        elif _norm(value) != _norm(old):
            bad.append(f"{flag(name)} {value!r} (the run used {old!r})")
    return bad


def _norm(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def set_aside_newer(run_dir: Path, ckpt: Path) -> list[Path]:
    """Resuming from an older checkpoint than the newest (the newest was damaged): rename the newer ones to
    ``checkpoints/abandoned-step-*`` so that the resumed run never mistakes them for its own saves, and point
    ``latest`` at ``ckpt``. They are kept, not deleted: the user decides."""
    root = run_dir / CHECKPOINTS
    moved = []
    for newer in sorted(p for p in root.glob("step-*") if p.is_dir() and p.name > ckpt.name):
        target = root / f"abandoned-{newer.name}"
        if target.exists():
            shutil.rmtree(target)
        os.replace(newer, target)
        moved.append(target)
    if moved:
        atomic_write_text(root / LATEST, ckpt.name + "\n")
        logger.warning("resuming from %s: the newer checkpoint(s) %s were moved aside (delete them when no longer "
                       "needed)", ckpt.name, ", ".join(p.name for p in moved))
    return moved


def check_same_tokenizer(ckpt: Path, tokenizer: Any) -> None:
    """Refuse to resume when the tokenizer built now differs from the checkpoint's (e.g. a BPE retrained on a
    corpus that changed since): the weights would read other token ids than they were trained on."""
    from blockstate.data import load_tokenizer

    if tokenizer_dir(ckpt) is None:
        return
    saved = load_tokenizer(tokenizer_dir(ckpt))
    if saved.fingerprint != tokenizer.fingerprint:
        raise ValueError(f"checkpoint {ckpt} was trained with the tokenizer {saved.kind} (vocab {saved.vocab_size}, "
                         f"{saved.fingerprint[:16]}), this run built {tokenizer.kind} (vocab {tokenizer.vocab_size}, "
                         f"{tokenizer.fingerprint[:16]}): the corpus or the tokenizer changed since; resume with "
                         "the same data, or start a new run")


# -- the model at the root ---------------------------------------------------------------------------------
def publish_model(run_dir: Path, ckpt: Path, tokenizer: Any = None) -> list[str]:
    """Publish checkpoint ``ckpt``'s model, tokenizer, generation and training config at ``run_dir``'s root.

    The files are hard links to the checkpoint's (copies where links are refused), made in a temporary
    directory and renamed into place one by one; the earlier ``published.json`` is removed first and the new
    one written last, so the record never describes files it does not match. A kill between two renames (a
    window of microseconds) leaves a root without a record; the checkpoints, which ``blockstate eval`` and
    ``generate`` prefer, are complete either way. ``tokenizer`` is saved at the root when ``ckpt`` has none at
    its own root (a checkpoint of the layout before, resumed). Returns the published names."""
    listed = (read_json(ckpt / MANIFEST).get("files", {}) if (ckpt / MANIFEST).is_file() else {})
    names = sorted(p.name for p in ckpt.iterdir() if p.is_file() and not p.name.startswith(_RESUME_ONLY))
    tmp = run_dir / f".tmp-publish-{os.getpid()}"
    try:
        for leftover in run_dir.glob(".tmp-publish-*"):  # this one, or one of a process killed while publishing
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir()
        files = {}
        for name in names:
            try:
                os.link(ckpt / name, tmp / name)
            except OSError:
                shutil.copy2(ckpt / name, tmp / name)
            entry = listed.get(name) or {"size": (ckpt / name).stat().st_size, "sha256": sha256_file(ckpt / name)}
            files[name] = {"size": int(entry["size"]), "sha256": str(entry["sha256"])}
        if tokenizer is not None and tokenizer_dir(ckpt) != ckpt:
            tokenizer.save(tmp)
            for f in sorted(p for p in tmp.iterdir() if p.name not in files):
                names.append(f.name)
                files[f.name] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
        # the earlier record goes first: a kill between the renames below must not leave the new files under a
        # record of the old ones (verify_published would blame a checkpoint that may be pruned by now)
        (run_dir / PUBLISHED).unlink(missing_ok=True)
        for old in run_dir.glob("model*.safetensors"):  # shards of an earlier publication that this one lacks
            if old.name not in files:
                old.unlink()
        for name in names:
            os.replace(tmp / name, run_dir / name)
        step = int(ckpt.name.rsplit("-", 1)[-1]) if ckpt.name.startswith("step-") else None
        atomic_write_text(run_dir / PUBLISHED, json.dumps({"format": "blockstate-published", "version": 1,
                                                           "step": step, "checkpoint": f"{CHECKPOINTS}/{ckpt.name}",
                                                           "files": files}, indent=1) + "\n")
        fsync_path(run_dir)
    except OSError as exc:
        raise output_error(exc, run_dir, f"the final model (from {ckpt.name}; the checkpoint itself is complete)"
                           ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return names
