"""``blockstate eval``'s work: load checkpoints, evaluate each at every length, write the report.

A checkpoint is a run directory (its newest checkpoint is used; without checkpoints, the model published at its
root), a ``checkpoints/step-*`` directory, or any ``save_pretrained`` directory (its tokenizer files are used when
there are some; a 257-id model is a bytes model; ``--data`` must be given when no ``train_config.json`` says it).
Lengths are token counts or multiples of the model's training length (``4x``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from blockstate.evaluation.evaluate import EvalResult, evaluate
from blockstate.evaluation.report import format_results, write_report
from blockstate.training.checkpoint import CONFIG_FILE, read_json, resolve_checkpoint, tokenizer_dir, verify

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
    """Model (``from_pretrained``) + tokenizer of a run, checkpoint or ``save_pretrained`` directory; an explicit
    ``tokenizer`` must fit the model. Every problem found in the directory is one ValueError line."""
    import blockstate  # noqa: F401 - registers the Auto classes
    from blockstate.data import build_tokenizer, load_corpus, load_tokenizer
    from blockstate.generation import set_token_ids
    from blockstate.training.rundir import verify_published

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
    try:
        from blockstate.registry import model_name
    except ImportError:  # no registry: BST names only
        from blockstate.training.model_factory import model_name_of as model_name
    return model_name(config) or "model"


def run_evaluation(checkpoints: list[str], *, data: str | None, lengths: str, split: str = "test",
                   tokenizer: str | None = None, output: str | None = None, batch_tokens: int = 16384,
                   device: str = "auto", precision: str = "auto", cache_dir: str | None = None,
                   progress: bool = True, log: Any = print, stream_chunk: int | None = None,
                   eval_tokens: int = 0, suffixes: tuple[str, ...] | None = None,
                   text_field: str | None = None) -> dict[str, Path]:
    """Evaluate every checkpoint at every length and write the report.

    ``eval_tokens`` > 0 keeps the first whole documents of the split up to that many tokens (at least one
    document, so the first may exceed it), as ``train --eval-tokens`` and ``compare --eval-tokens`` do; 0 = the
    whole split. ``suffixes`` / ``text_field`` read a folder corpus (default: what the checkpoint trained with).
    The JSON and markdown report is rewritten after every finished length, so an interrupted evaluation keeps
    the lengths it finished (``"complete": false``); the plots are drawn at the end.
    """
    from blockstate.data import load_corpus, tokenize_split
    from blockstate.evaluation.evaluate import head_documents
    from blockstate.training.distributed import pick_device
    from blockstate.training.steps import autocast_factory

    if isinstance(eval_tokens, bool) or not isinstance(eval_tokens, int) or eval_tokens < 0:
        raise ValueError(f"--eval-tokens must be >= 0 (0 = the whole split), got {eval_tokens!r}")
    dev = pick_device(device)
    autocast = autocast_factory(precision, dev)
    loaded = [load_checkpoint(c, tokenizer, dev, cache_dir, data) for c in checkpoints]
    plans = [parse_lengths(lengths, lm.train_length) for lm in loaded]  # bad --lengths fail before any work
    out = Path(output) if output else (loaded[0].path.parent.parent / "eval" if loaded[0].path.parent.name ==
                                      "checkpoints" else Path("eval"))
    names: dict[str, int] = {}
    models: dict[str, dict[str, Any]] = {}
    results: dict[str, list[EvalResult]] = {}
    corpora: dict[str, Any] = {}
    used_data = None
    for lm, plan in zip(loaded, plans, strict=True):
        data_spec = data or lm.train_config.get("data")
        if not data_spec:
            raise ValueError(f"{lm.path} does not record its training data: pass --data (a corpus name or path)")
        used_data = used_data or data_spec
        options: dict[str, Any] = {"text_field": text_field or lm.train_config.get("text_field") or "text"}
        if suffixes or lm.train_config.get("suffixes"):
            options["suffixes"] = tuple(suffixes or lm.train_config["suffixes"])
        corpus_key = repr((data_spec, sorted(options.items())))
        if corpus_key not in corpora:
            corpora[corpus_key] = load_corpus(data_spec, **options)
        split_data = tokenize_split(corpora[corpus_key], lm.tokenizer, split, cache_dir=cache_dir)
        if eval_tokens:
            split_data = head_documents(split_data, eval_tokens)
        key = lm.name if lm.name not in names else f"{lm.name} #{names[lm.name] + 1}"
        names[lm.name] = names.get(lm.name, 0) + 1
        models[key] = {"checkpoint": str(lm.path), "tokenizer": getattr(lm.tokenizer, "kind", "?"),
                       "vocab_size": lm.tokenizer.vocab_size, "train_length": lm.train_length, "data": data_spec,
                       "documents": split_data.num_documents, "eval_tokens": eval_tokens,
                       "parameters": sum(p.numel() for p in lm.model.parameters())}
        results[key] = res = []
        for length in plan:
            t0 = time.perf_counter()
            r = evaluate(lm.model, split_data, length, batch_tokens=batch_tokens, device=dev, autocast=autocast,
                         progress=progress)
            res.append(r)
            log(format_results(key, [r], lm.train_length) + f" [{time.perf_counter() - t0:.1f}s]")
            write_report(models, results, out, split, used_data, complete=False)  # a Ctrl-C keeps this length
        if stream_chunk:  # whole documents, left context unbounded, state carried chunk to chunk
            from blockstate.evaluation.streaming import evaluate_streaming

            t0 = time.perf_counter()
            stream = evaluate_streaming(lm.model, split_data, stream_chunk)
            log(f"{key} streamed whole documents (chunks of {stream['chunk']}): ppl {stream['ppl']:.3f}, "
                f"{stream['bpb']:.4f} bits/byte over {stream['tokens']:,} tokens [{time.perf_counter() - t0:.1f}s]")
            models[key]["stream"] = stream
    return write_report(models, results, out, split, used_data or "?")
