"""Checkpoints without pickle, written atomically.

Layout of ``<run>/checkpoints/step-0000500/``::

    config.json, model.safetensors   the model (``AutoModelForCausalLM.from_pretrained(dir)`` loads it)
    generation_config.json           EOS / BOS / PAD ids for ``generate()``
    tokenizer_config.json (+ tokenizer.json / spm.model)
                                     the tokenizer (``AutoTokenizer.from_pretrained(dir)``, ``load_tokenizer``)
    optimizer.safetensors            every optimiser state tensor, keyed ``<param name>::<state name>``
    optimizer.json                   param groups and non-tensor state (JSON)
    rng-rank<R>.safetensors / .json  torch / CUDA generator states (tensors), Python / numpy states (JSON)
    carry-rank<R>.safetensors        stateful models only: each row's state carried to its next segment
    trainer_state.json               step, token count, schedule, data-loader position, run id
    train_config.json                the TrainConfig
    manifest.json                    size and sha256 of every other file, written last (``manifest.py``)

Everything is written into ``checkpoints/.tmp-step-...`` and renamed into place only when complete (rename is
atomic on POSIX), then ``checkpoints/latest`` is replaced the same way: a kill at any moment leaves the last
good checkpoint intact and findable. Old checkpoints are renamed to ``.trash-*`` before deletion, so a half
deleted one is never mistaken for a checkpoint. Loading checks the manifest first, so a checkpoint damaged
after the save (a truncated copy, bit rot) is refused with a one-line error naming the file.

Checkpoints written before the tokenizer moved to the root keep it in ``tokenizer/`` (still read). At the end
of training the model, tokenizer and generation config are also published at the run directory's root
(``rundir.publish_model``), so the run directory itself is what ``from_pretrained`` takes.

Nothing here unpickles: weights and tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from blockstate.runtime.manifest import CheckpointError, check_model_config, verify_checkpoint, write_manifest

FORMAT = "blockstate-checkpoint"
VERSION = 2  # 2: manifest.json (version 1 checkpoints load, unverified)
CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "train_config.json"
SEP = "::"

logger = logging.getLogger("blockstate.train")


# -- atomic files ------------------------------------------------------------------------------------------
def fsync_path(path: Path) -> None:
    """Flush a file or directory to disk (directories: so a rename inside them survives a crash)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave a stray temporary file behind
        raise
    fsync_path(path.parent)


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1, default=_json_default) + "\n", encoding="utf-8")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer | np.floating):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in JSON")


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


# -- optimiser state as tensors + JSON -----------------------------------------------------------------------
def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()``-shaped state into tensors (safetensors) and JSON (everything else)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for key, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{key}{SEP}{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(key), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars,
                     "key_types": sorted({type(k).__name__ for k in state["state"]})}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                              current_groups: list[dict[str, Any]]) -> dict[str, Any]:
    int_keys = meta.get("key_types") == ["int"]
    state: dict[Any, dict[str, Any]] = {}
    for flat, value in tensors.items():
        key, name = flat.rsplit(SEP, 1)
        state.setdefault(int(key) if int_keys else key, {})[name] = value
    for key, entries in meta["scalars"].items():
        state.setdefault(int(key) if int_keys else key, {}).update(entries)
    groups = []
    for saved, current in zip(meta["param_groups"], current_groups, strict=False):
        # JSON turned tuples (betas, eps) into lists: restore the optimiser's own types
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) and isinstance(v, list) else v
                       for k, v in saved.items()})
    return {"state": state, "param_groups": groups}


# -- RNG -------------------------------------------------------------------------------------------------------
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), *[_plain(x) for x in np_state[2:]]]}
    return tensors, meta


def _plain(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))


# -- carried segment state (stateful models) ------------------------------------------------------------------
def flatten_carry(carry: Any) -> dict[str, torch.Tensor]:
    """A ``SegmentCarry`` (NamedTuple of tuples of tensors) as ``{"<field>.<i>": tensor}``."""
    return {f"{field}.{i}": t.detach().cpu().contiguous()
            for field in carry._fields for i, t in enumerate(getattr(carry, field))}


def load_carry(ckpt: Path, rank: int, device: torch.device | str = "cpu") -> Any:
    path = ckpt / f"carry-rank{rank}.safetensors"
    if not path.is_file():
        return None
    from blockstate.models.stateful import SegmentCarry

    tensors = safe_load(path)
    groups = {f: [] for f in SegmentCarry._fields}
    for key in sorted(tensors, key=lambda k: (k.split(".")[0], int(k.split(".")[1]))):
        groups[key.split(".")[0]].append(tensors[key].to(device))
    return SegmentCarry(**{f: tuple(v) for f, v in groups.items()})


# -- errors ------------------------------------------------------------------------------------------------
def output_error(exc: OSError, where: Path, what: str) -> OSError:
    """A one-line error for a full or read-only disk, naming the fix."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(f"no space left on the device of {where} while writing {what}: free some space or pass "
                       "another --output (the last complete checkpoint, if any, is intact)")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return OSError(f"output directory {where} is not writable ({os.strerror(exc.errno)}) while writing "
                       f"{what}: pass a writable --output")
    return OSError(f"cannot write {what} under {where}: {exc.strerror or exc}; check the --output directory")


# -- save ------------------------------------------------------------------------------------------------------
def save_checkpoint(run_dir: Path, step: int, *, model: Any, model_state: dict[str, torch.Tensor] | None,
                    optimizer_state: dict[str, Any] | None, trainer_state: dict[str, Any],
                    train_config: dict[str, Any], tokenizer: Any, keep: int,
                    rank_states: list[dict[str, Any]] | None = None) -> Path:
    """Write checkpoint ``step`` atomically (see module doc); called on rank 0 only. ``rank_states[r]`` holds
    rank r's ``rng`` (from :func:`rng_state`) and ``carry`` (:func:`flatten_carry`, or None), gathered to rank 0,
    so no other rank needs the output filesystem. An existing checkpoint of the same step is kept as it is (a
    signal right after a periodic save). Returns the final directory."""
    root = run_dir / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if final.is_dir():
        return final
    rank_states = rank_states or [{"rng": rng_state(), "carry": None}]
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for r, state in enumerate(rank_states):
            rng_tensors, rng_meta = state["rng"]
            save_file(rng_tensors, tmp / f"rng-rank{r}.safetensors")
            write_json(tmp / f"rng-rank{r}.json", rng_meta)
            if state.get("carry") is not None:  # a stateful model's per-row state between segments
                save_file(state["carry"], tmp / f"carry-rank{r}.safetensors")
        _save_model(model, model_state, tmp)
        if optimizer_state is not None:
            tensors, meta = flatten_optimizer_state(optimizer_state)
            save_file(tensors, tmp / "optimizer.safetensors")
            write_json(tmp / "optimizer.json", meta)
        if tokenizer is not None:  # at the root, beside config.json: AutoTokenizer.from_pretrained(ckpt) works
            tokenizer.save(tmp)
        write_json(tmp / CONFIG_FILE, train_config)
        write_json(tmp / STATE_FILE, {"format": FORMAT, "version": VERSION, **trainer_state})
        write_manifest(tmp)  # last: it describes every file above
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_path(f)
        os.replace(tmp, final)
        fsync_path(root)
        atomic_write_text(root / LATEST, final.name + "\n")
        prune(root, keep)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise output_error(exc, run_dir, f"checkpoint {final.name}") from exc
    return final


def _save_model(model: Any, state: dict[str, torch.Tensor] | None, directory: Path) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(directory, state_dict=state)


def prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        trash = root / f".trash-{old.name}"
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    for leftover in root.glob(".trash-*"):  # from a run killed while pruning
        shutil.rmtree(leftover, ignore_errors=True)


# -- find and load -----------------------------------------------------------------------------------------
def is_checkpoint(path: Path) -> bool:
    return (path / STATE_FILE).is_file() and (path / "config.json").is_file()


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory (``latest`` first, else the highest step)."""
    root = run_dir / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if is_checkpoint(candidate):
            return candidate
    steps = sorted((p for p in root.glob("step-*") if is_checkpoint(p)), reverse=True)
    return steps[0] if steps else None


def tokenizer_dir(ckpt: Path) -> Path | None:
    """Where a checkpoint (or a run directory, or a ``save_pretrained`` directory) keeps its tokenizer: the
    root, or ``tokenizer/`` in checkpoints written before the root layout; None when it has none."""
    from blockstate.data.tokenizers import is_tokenizer_dir

    for candidate in (ckpt, ckpt / "tokenizer"):
        if candidate.is_dir() and is_tokenizer_dir(candidate):
            return candidate
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A loadable directory from a checkpoint, a run directory or a plain ``save_pretrained`` directory.

    A run directory gives its newest complete checkpoint (the model at its root is the same weights once
    training ended, and may be older while a resumed run trains on); a run directory without checkpoints
    (pruned, or copied without them) gives its root model."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist: pass a run directory (runs/...) or one of its "
                                "checkpoints/step-* directories")
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} is a file: pass its directory (a run directory or a checkpoint)")
    if is_checkpoint(path):
        return path
    found = latest_checkpoint(path)
    if found is None and (path / "config.json").is_file():
        return path
    if found is None:
        raise FileNotFoundError(f"{path} holds no checkpoint (no {CHECKPOINTS}/step-* with {STATE_FILE}, no "
                                "config.json): pass a run directory written by blockstate train")
    return found


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is unreadable or not JSON ({exc}): the checkpoint is damaged; use an earlier "
                         "one") from None


def verify(ckpt: Path, action: str = "use") -> None:
    """Check ``ckpt`` against its manifest before loading anything from it (CheckpointError: one line naming
    the damaged file and an earlier checkpoint). Training checkpoints of version >= 2 must have a manifest;
    older ones and plain ``save_pretrained`` directories load unverified."""
    if verify_checkpoint(ckpt, action=action):
        return
    if (ckpt / STATE_FILE).is_file():
        state = read_json(ckpt / STATE_FILE)
        if state.get("format") == FORMAT and int(state.get("version", 1)) >= 2:
            verify_checkpoint(ckpt, required=True, action=action)
        logger.warning("checkpoint %s has no manifest (written by an older blockstate): its files are not verified",
                       ckpt)


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    state = read_json(ckpt / STATE_FILE)
    if state.get("format") != FORMAT:
        raise ValueError(f"{ckpt} is not a blockstate training checkpoint (format {state.get('format')!r})")
    if state.get("version", 0) > VERSION:
        raise ValueError(f"{ckpt} was written by a newer blockstate (checkpoint version {state['version']}): "
                         "upgrade blockstate to resume it")
    return state


def load_model_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load ``model.safetensors`` into a freshly built model of the same config; tied weights may be absent
    from the file (``save_pretrained`` stores a tied tensor once). A checkpoint of another model config is
    refused first, with the differing fields named."""
    if getattr(model, "config", None) is not None and hasattr(model.config, "to_dict"):
        check_model_config(ckpt, model.config)
    files = sorted(ckpt.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{ckpt} has no model.safetensors: the checkpoint is incomplete; use an earlier one")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(safe_load(f))
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (this model: {tuple(own[k].shape)})" for k, v in state.items()
             if k in own and own[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"checkpoint {ckpt} does not fit the model built from the settings: {wrong[0]}"
                              f"{f' and {len(wrong) - 1} more' if len(wrong) > 1 else ''}; resume with the run's own "
                              "settings")
    missing, unexpected = model.load_state_dict(state, strict=False)
    aliases: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), set()).add(name)
    tied = {n for names in aliases.values() if names & set(state) for n in names}
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise ValueError(f"checkpoint {ckpt} does not fit the model built from the flags (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}): resume with the run's own settings")


def safe_load(path: Path) -> dict[str, torch.Tensor]:
    """``safetensors.load_file`` with a one-line error for a damaged file (a checkpoint without a manifest)."""
    try:
        return load_file(path)
    except Exception as exc:  # noqa: BLE001 - SafetensorError and friends: report as a damaged file
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0][:120]}): the "
                              "checkpoint is damaged; use an earlier one") from None


def load_optimizer_state(ckpt: Path, current_groups: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not (ckpt / "optimizer.json").is_file():
        return None
    tensors = safe_load(ckpt / "optimizer.safetensors") if (ckpt / "optimizer.safetensors").is_file() else {}
    return unflatten_optimizer_state(tensors, read_json(ckpt / "optimizer.json"), current_groups)


def load_rng_state(ckpt: Path, rank: int) -> bool:
    """Restore this rank's generators; False when the checkpoint has none for it (another world size)."""
    if not (ckpt / f"rng-rank{rank}.safetensors").is_file():
        return False
    set_rng_state(safe_load(ckpt / f"rng-rank{rank}.safetensors"), read_json(ckpt / f"rng-rank{rank}.json"))
    return True
