"""Checkpoint manifests: the size and sha256 of every file, written last, checked before anything is loaded.

The atomic rename in ``checkpoint.save_checkpoint`` guarantees a checkpoint directory is complete when it
appears; the manifest catches what happens to it afterwards: a copy cut short (``rsync`` / ``scp`` killed,
a full disk on the target), bit rot, a hand-edited file. ``manifest.json`` lists every file of the checkpoint
(tokenizer included); :func:`verify_checkpoint` refuses the checkpoint with a one-line error that names the
damaged file and the earlier checkpoints that could be used instead.

The manifest is an integrity check, not a signature: safety against hostile files comes from the formats
(safetensors and JSON only, never pickle), not from the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "blockstate-manifest"
_BLOCK = 1 << 20
# Files a loader reads by pattern (model*.safetensors) or name: one that the manifest does not list was added
# after the save, and would be loaded as if it were part of the checkpoint.
_LOADED_SUFFIXES = (".safetensors", ".json", ".bin", ".pt", ".pth", ".pkl", ".model")

logger = logging.getLogger("blockstate.train")


class CheckpointError(ValueError):
    """A damaged, incomplete or mismatched checkpoint; the message names the file and what to do."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def build_manifest(directory: Path) -> dict[str, Any]:
    files = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in _files(directory)}
    return {"format": MANIFEST_FORMAT, "version": 1, "files": files}


def write_manifest(directory: Path) -> Path:
    """Record every file of ``directory`` (call it last, before the directory is renamed into place)."""
    path = directory / MANIFEST
    path.write_text(json.dumps(build_manifest(directory), indent=1) + "\n", encoding="utf-8")
    return path


def earlier_checkpoints(ckpt: Path) -> list[Path]:
    """The other complete checkpoints of the same run, newest first (what to fall back to)."""
    if ckpt.parent.name != "checkpoints":
        return []
    return sorted((p for p in ckpt.parent.glob("step-*") if p.is_dir() and p.name < ckpt.name
                   and (p / "trainer_state.json").is_file()), reverse=True)


def _fix(ckpt: Path, action: str) -> str:
    earlier = earlier_checkpoints(ckpt)
    if earlier:
        return f"{action} an earlier checkpoint instead, e.g. {earlier[0]}"
    return f"no earlier checkpoint of this run is left: restore {ckpt.name} from a backup or train again"


def read_manifest(ckpt: Path, action: str = "use") -> dict[str, Any] | None:
    path = ckpt / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError("not a blockstate manifest")
        for entry in files.values():
            int(entry["size"]), str(entry["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt}: {MANIFEST} is damaged ({type(exc).__name__}): the checkpoint "
                              f"cannot be verified; {_fix(ckpt, action)}") from None
    return manifest


def verify_checkpoint(ckpt: Path, *, required: bool = False, action: str = "use") -> bool:
    """Check every file of ``ckpt`` against its manifest; CheckpointError on the first problem found.

    Returns False (nothing checked) for a directory without a manifest when ``required`` is False: a plain
    ``save_pretrained`` directory, or a checkpoint written before manifests existed. ``action`` is the verb of
    the advice ("resume from", "evaluate").
    """
    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt, action)
    if manifest is None:
        if required:
            raise CheckpointError(f"checkpoint {ckpt} has no {MANIFEST}: it is incomplete or was modified after "
                                  f"it was saved; {_fix(ckpt, action)}")
        return False
    listed: dict[str, dict[str, Any]] = manifest["files"]
    for rel, entry in sorted(listed.items()):
        path = ckpt / rel
        problem = None
        if not path.is_file():
            problem = "is missing"
        else:
            size = path.stat().st_size
            if size < entry["size"]:
                problem = f"is truncated ({size:,} of {entry['size']:,} bytes)"
            elif size > entry["size"]:
                problem = f"has {size:,} bytes, {entry['size']:,} when it was saved"
            elif sha256_file(path) != entry["sha256"]:
                problem = "is corrupted (its sha256 differs from the one recorded at save time)"
        if problem:
            raise CheckpointError(f"checkpoint {ckpt}: {rel} {problem}; {_fix(ckpt, action)}")
    extra = [p.relative_to(ckpt).as_posix() for p in _files(ckpt)
             if p.relative_to(ckpt).as_posix() not in listed and p.name.endswith(_LOADED_SUFFIXES)]
    if extra:
        raise CheckpointError(f"checkpoint {ckpt}: {extra[0]} was added after the checkpoint was saved (it is not "
                              f"in {MANIFEST}); remove it, or {_fix(ckpt, action)}")
    return True


# -- model configs ---------------------------------------------------------------------------------------------
# Keys of a transformers config that do not change the model's function or its weights' shapes.
_BOOKKEEPING = {"transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype", "auto_map",
                "_commit_hash", "_attn_implementation_autoset", "_attn_implementation", "use_cache",
                "output_attentions", "output_hidden_states", "return_dict"}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"hidden_size=48, this run has hidden_size=32"``-style differences between two model configs.

    Only keys both configs have are compared: ``save_pretrained`` leaves out values equal to the class
    defaults, and a field added to the config class since the save is not a difference of the model saved.
    """
    out = []
    for key in sorted(set(saved) & set(current)):
        if key in _BOOKKEEPING or key.startswith("_"):
            continue
        a, b = saved[key], current[key]
        if _plain(a) != _plain(b):
            out.append(f"{key}={a!r}, this run has {key}={b!r}")
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def check_model_config(ckpt: Path, config: Any) -> None:
    """Refuse a checkpoint whose ``config.json`` describes another model than ``config`` (naming the first
    differences), before any weight is copied."""
    path = ckpt / "config.json"
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {ckpt}: config.json is unreadable ({type(exc).__name__}); "
                              f"{_fix(ckpt, 'use')}") from None
    current = config.to_dict()
    if saved.get("model_type") == current.get("model_type"):
        try:  # what from_pretrained would build: the file leaves out values equal to the class defaults
            saved = type(config).from_dict(saved).to_dict()
        except Exception:  # noqa: BLE001 - a config the class refuses: compare the raw values instead
            pass
    diffs = config_differences(saved, current)
    if diffs:
        more = f" (and {len(diffs) - 2} more differences)" if len(diffs) > 2 else ""
        raise CheckpointError(f"checkpoint {ckpt} was trained with {'; with '.join(diffs[:2])}{more}: it belongs to "
                              "another model; resume it with its own settings, or start a new run with --output")
