"""Loading what training wrote: a run directory, a checkpoint, or any ``save_pretrained`` directory.

A run directory's newest checkpoint is used (without checkpoints, the model published at its root, checked
against ``published.json``); a ``checkpoints/step-*`` directory is checked against its manifest; a
``save_pretrained`` directory uses its tokenizer files when it has some (a 257-id model is a bytes model).
Every problem found is one ValueError / CheckpointError line naming the file and the fix. Training
(``blockstate.training``) writes these directories; evaluation, generation and the benchmarks read them here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from blockstate.runtime.checkpoint import (
    CHECKPOINTS,
    CONFIG_FILE,
    STATE_FILE,
    read_json,
    resolve_checkpoint,
    tokenizer_dir,
    verify,
)
from blockstate.runtime.manifest import CheckpointError, sha256_file

PUBLISHED = "published.json"  # sizes and sha256 of the model published at a run directory's root, written last


@dataclasses.dataclass
class LoadedModel:
    name: str
    path: Path
    model: torch.nn.Module
    tokenizer: Any
    train_length: int | None
    train_config: dict[str, Any]


def load_checkpoint(path: str | Path, tokenizer: str | None = None, device: torch.device | str = "cpu",
                    cache_dir: str | None = None, data: str | None = None) -> LoadedModel:
    """Model (``from_pretrained``) + tokenizer of a run, checkpoint or ``save_pretrained`` directory; an explicit
    ``tokenizer`` must fit the model. Every problem found in the directory is one ValueError line."""
    import blockstate  # noqa: F401 - registers the Auto classes
    from blockstate.data import build_tokenizer, load_corpus, load_tokenizer
    from blockstate.generation import set_token_ids

    ckpt = resolve_checkpoint(path)
    if not verify_published(ckpt):  # the root of a run directory is checked against published.json
        verify(ckpt, action="use")  # a damaged checkpoint: one line naming the file, before anything is read
    train_cfg = read_json(ckpt / CONFIG_FILE) if (ckpt / CONFIG_FILE).is_file() else {}
    model = load_model(ckpt)
    vocab = int(model.config.vocab_size)
    if tokenizer is not None:
        corpus = None
        if str(tokenizer).startswith("bpe"):
            corpus = load_corpus(data or train_cfg.get("data", "python-stdlib"))
        tok = build_tokenizer(tokenizer, corpus, cache_dir=cache_dir)
        if tok.vocab_size != vocab:
            saved = f" (it was trained with --tokenizer {train_cfg['tokenizer']})" if "tokenizer" in train_cfg else ""
            raise ValueError(f"--tokenizer {tokenizer} has {tok.vocab_size} ids but checkpoint {ckpt} has "
                             f"vocab_size {vocab}{saved}: drop --tokenizer to use the checkpoint's own")
    elif tokenizer_dir(ckpt) is not None:
        tok = load_tokenizer(tokenizer_dir(ckpt))
    elif train_cfg.get("tokenizer") == "bytes" or vocab == 257:
        from blockstate.data import BytesTokenizer

        tok = BytesTokenizer()  # the one tokenizer with 257 ids (a BPE needs more, and records its files)
    else:
        raise ValueError(f"{ckpt} has no saved tokenizer (no tokenizer_config.json) and its vocab_size {vocab} is not "
                         "the bytes tokenizer's 257: pass --tokenizer (the directory or .model file it was trained "
                         "with)")
    if tok.vocab_size > vocab:  # fewer is fine (an embedding padded to a round size); more would index past it
        raise ValueError(f"the tokenizer saved in {ckpt} has {tok.vocab_size} ids but the model has vocab_size "
                         f"{vocab}: "
                         "the directory mixes two runs; pass --tokenizer, or use a checkpoint of one run")
    set_token_ids(model, tok.eos_id)  # directories saved before the ids were recorded stop at EOS too
    state = read_json(ckpt / "trainer_state.json") if (ckpt / "trainer_state.json").is_file() else {}
    train_length = state.get("seq_len") or train_cfg.get("seq_len") or getattr(model.config, "max_train_length", None)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    name = f"{train_cfg.get('model', _model_name(model.config))} ({run_dir.name})"
    return LoadedModel(name, ckpt, model.to(device).eval(), tok, train_length, train_cfg)


def check_weight_files(directory: Path) -> None:
    """Refuse a ``model*.safetensors`` that is cut short or not safetensors, in one line, before loading: a
    ``save_pretrained`` directory has no manifest, and the library's own error is a raw traceback."""
    for f in sorted(directory.glob("model*.safetensors")):
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n)) if 0 < n <= min(size - 8, 100_000_000) else None
            ends = [int(v["data_offsets"][1]) for k, v in (header or {}).items() if k != "__metadata__"]
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            header = None
        if header is None:
            raise ValueError(f"{f} is not a safetensors file (its header is unreadable; {size:,} bytes): the "
                             "directory is damaged; save the model again, or use another checkpoint")
        expected = 8 + n + max(ends, default=0)
        if size != expected:
            what = "truncated" if size < expected else "longer than its header says"
            raise ValueError(f"{f} is {what} ({size:,} of {expected:,} bytes): the directory is damaged; save the "
                             "model again, or use another checkpoint")


def load_model(directory: Path) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with one-line errors: safetensors only (never a pickled .bin), no
    code from the directory, and weights that do not fit ``config.json`` named, not a load report."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    check_weight_files(directory)
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report of a mismatch is dozens of lines; the error below is one
    try:
        return AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot load the model in {directory} ({str(exc).splitlines()[0]}): pass a directory "
                         "written by blockstate train or save_pretrained") from None
    except RuntimeError as exc:
        if "mismatch" not in str(exc):
            raise
        raise ValueError(f"the weights in {directory} do not fit its config.json{_first_mismatch(directory)}: "
                         "config.json was edited or belongs to another model; restore the saved one") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _first_mismatch(directory: Path) -> str:
    """`` (model.x.weight is (64, 32) in the file, (128, 64) from the config)``, or '' when not found."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(directory)).state_dict().items()}
        for f in sorted(directory.glob("model*.safetensors")):
            with safe_open(str(f), "pt") as st:
                for key in st.keys():
                    saved = tuple(st.get_slice(key).get_shape())
                    if key in shapes and shapes[key] != saved:
                        return f" ({key} is {saved} in {f.name}, {shapes[key]} from config.json)"
    except Exception:  # noqa: BLE001 - the example is a courtesy; the error stands without it
        return ""
    return ""


def _model_name(config: Any) -> str:
    from blockstate.registry import model_name

    return model_name(config) or "model"


def verify_published(run_dir: Path) -> bool:
    """Check the model at a run directory's root against ``published.json`` (CheckpointError: one line naming
    the file and the checkpoint with the same weights). False when the directory has no ``published.json``."""
    path = run_dir / PUBLISHED
    if not path.is_file():
        return False
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        files = {str(k): (int(v["size"]), str(v["sha256"])) for k, v in record["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path} is damaged ({type(exc).__name__}): load {run_dir / CHECKPOINTS} instead, or "
                              "train again") from None
    ckpt = run_dir / str(record.get("checkpoint") or CHECKPOINTS)
    fix = (f"use {ckpt} (the same weights)" if (ckpt / STATE_FILE).is_file()
           else "its checkpoint is gone: restore the directory from a backup or train again")
    for name, (size, digest) in sorted(files.items()):
        f = run_dir / name
        problem = None
        if not f.is_file():
            problem = "is missing"
        elif f.stat().st_size < size:
            problem = f"is truncated ({f.stat().st_size:,} of {size:,} bytes)"
        elif f.stat().st_size > size:
            problem = f"has {f.stat().st_size:,} bytes, {size:,} when it was saved"
        elif sha256_file(f) != digest:
            problem = "is corrupted (its sha256 differs from the one recorded at save time)"
        if problem:
            raise CheckpointError(f"the model at the root of {run_dir}: {name} {problem}; {fix}")
    return True
