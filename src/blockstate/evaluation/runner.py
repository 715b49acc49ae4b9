"""``blockstate eval``'s work: load checkpoints, evaluate each at every length, write the report.

A checkpoint is a run directory (its newest checkpoint is used; without checkpoints, the model published at its
root), a ``checkpoints/step-*`` directory, or any ``save_pretrained`` directory (its tokenizer files are used when
there are some; a 257-id model is a bytes model; ``--data`` must be given when no ``train_config.json`` says it).
Lengths are token counts or multiples of the model's training length (``4x``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from blockstate.evaluation.evaluate import EvalResult, evaluate
from blockstate.evaluation.report import format_results, write_report
from blockstate.runtime.loading import load_checkpoint

DEFAULT_LENGTHS = "1x,4x,16x"


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
    from blockstate.runtime.device import autocast_factory, pick_device

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
