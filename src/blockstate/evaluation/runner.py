"""``blockstate eval``'s work: load checkpoints, evaluate each at every length, write the report.

A checkpoint is a run directory (its newest checkpoint is used), a ``checkpoints/step-*`` directory, or any
``save_pretrained`` directory (then ``--tokenizer`` and ``--data`` must be given). Lengths are token counts or
multiples of the model's training length (``4x``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from blockstate.evaluation.evaluate import EvalResult, evaluate
from blockstate.evaluation.report import format_results, write_report
from blockstate.training.checkpoint import CONFIG_FILE, read_json, resolve_checkpoint, verify

DEFAULT_LENGTHS = "1x,4x,16x"


@dataclasses.dataclass
class LoadedModel:
    name: str
    path: Path
    model: torch.nn.Module
    tokenizer: Any
    train_length: int | None
    train_config: dict[str, Any]


def parse_lengths(spec: str, train_length: int | None) -> list[int]:
    """``"512,4096"`` or ``"1x,4x,16x"`` -> sorted distinct token counts."""
    out = []
    for part in str(spec).split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            if part.endswith("x"):
                if not train_length:
                    raise ValueError(f"--lengths {part!r} is relative to the training length, which this checkpoint "
                                     "does not record: give token counts, e.g. --lengths 512,2048")
                value = round(float(part[:-1]) * train_length)
            else:
                value = int(part)
        except ValueError as exc:
            if "relative" in str(exc):
                raise
            raise ValueError(f"--lengths: {part!r} is not a token count or a multiple like 4x: use e.g. "
                             "--lengths 512,4096,16384 or --lengths 1x,4x,16x") from None
        if value < 2:
            raise ValueError(f"--lengths: {part!r} gives {value} tokens; every length needs at least 2")
        out.append(value)
    if not out:
        raise ValueError("--lengths is empty: use e.g. --lengths 512,4096,16384 or --lengths 1x,4x,16x")
    return sorted(set(out))


def load_checkpoint(path: str | Path, tokenizer: str | None = None, device: torch.device | str = "cpu",
                    cache_dir: str | None = None, data: str | None = None) -> LoadedModel:
    """Model (``from_pretrained``) + tokenizer of a checkpoint; an explicit ``tokenizer`` must fit the model."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import blockstate  # noqa: F401 - registers the Auto classes
    from blockstate.data import build_tokenizer, load_corpus, load_tokenizer

    ckpt = resolve_checkpoint(path)
    verify(ckpt, action="use")  # a damaged checkpoint: one line naming the file, before anything is read
    train_cfg = read_json(ckpt / CONFIG_FILE) if (ckpt / CONFIG_FILE).is_file() else {}
    hf_logging.disable_progress_bar()
    try:
        # safetensors only (never a pickled .bin) and no code from the checkpoint directory
        model = AutoModelForCausalLM.from_pretrained(ckpt, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot load the model in {ckpt} ({str(exc).splitlines()[0]}): pass a directory written "
                         "by blockstate train or save_pretrained") from None
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
    elif (ckpt / "tokenizer").is_dir():
        tok = load_tokenizer(ckpt / "tokenizer")
    else:
        raise ValueError(f"checkpoint {ckpt} has no saved tokenizer: pass --tokenizer (e.g. bytes, or the "
                         "directory the tokenizer was saved to)")
    state = read_json(ckpt / "trainer_state.json") if (ckpt / "trainer_state.json").is_file() else {}
    train_length = state.get("seq_len") or train_cfg.get("seq_len") or getattr(model.config, "max_train_length", None)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    name = f"{train_cfg.get('model', _model_name(model.config))} ({run_dir.name})"
    return LoadedModel(name, ckpt, model.to(device).eval(), tok, train_length, train_cfg)


def _model_name(config: Any) -> str:
    try:
        from blockstate.registry import model_name
    except ImportError:  # no registry: BST names only
        from blockstate.training.model_factory import model_name_of as model_name
    return model_name(config) or "model"


def run_evaluation(checkpoints: list[str], *, data: str | None, lengths: str, split: str = "test",
                   tokenizer: str | None = None, output: str | None = None, batch_tokens: int = 16384,
                   device: str = "auto", precision: str = "auto", cache_dir: str | None = None,
                   progress: bool = True, log: Any = print, stream_chunk: int | None = None) -> dict[str, Path]:
    from blockstate.data import load_corpus, tokenize_split
    from blockstate.training.distributed import pick_device
    from blockstate.training.steps import autocast_factory

    dev = pick_device(device)
    autocast = autocast_factory(precision, dev)
    loaded = [load_checkpoint(c, tokenizer, dev, cache_dir, data) for c in checkpoints]
    names: dict[str, int] = {}
    models: dict[str, dict[str, Any]] = {}
    results: dict[str, list[EvalResult]] = {}
    corpora: dict[str, Any] = {}
    used_data = None
    for lm in loaded:
        data_spec = data or lm.train_config.get("data")
        if not data_spec:
            raise ValueError(f"{lm.path} does not record its training data: pass --data (a corpus name or path)")
        used_data = used_data or data_spec
        if data_spec not in corpora:
            corpora[data_spec] = load_corpus(data_spec)
        split_data = tokenize_split(corpora[data_spec], lm.tokenizer, split, cache_dir=cache_dir)
        key = lm.name if lm.name not in names else f"{lm.name} #{names[lm.name] + 1}"
        names[lm.name] = names.get(lm.name, 0) + 1
        res = []
        for length in parse_lengths(lengths, lm.train_length):
            t0 = time.perf_counter()
            r = evaluate(lm.model, split_data, length, batch_tokens=batch_tokens, device=dev, autocast=autocast,
                         progress=progress)
            res.append(r)
            log(format_results(key, [r], lm.train_length) + f" [{time.perf_counter() - t0:.1f}s]")
        results[key] = res
        stream = None
        if stream_chunk:  # whole documents, left context unbounded, state carried chunk to chunk
            from blockstate.evaluation.streaming import evaluate_streaming

            t0 = time.perf_counter()
            stream = evaluate_streaming(lm.model, split_data, stream_chunk)
            log(f"{key} streamed whole documents (chunks of {stream['chunk']}): ppl {stream['ppl']:.3f}, "
                f"{stream['bpb']:.4f} bits/byte over {stream['tokens']:,} tokens [{time.perf_counter() - t0:.1f}s]")
        models[key] = {"checkpoint": str(lm.path), "tokenizer": getattr(lm.tokenizer, "kind", "?"),
                       "vocab_size": lm.tokenizer.vocab_size, "train_length": lm.train_length, "data": data_spec,
                       "parameters": sum(p.numel() for p in lm.model.parameters())}
        if stream is not None:
            models[key]["stream"] = stream
    out = Path(output) if output else (loaded[0].path.parent.parent / "eval" if loaded[0].path.parent.name ==
                                      "checkpoints" else Path("eval"))
    return write_report(models, results, out, split, used_data or "?")
