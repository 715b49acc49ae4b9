"""``blockstate eval CHECKPOINT [CHECKPOINT ...]``: token perplexity and bits per byte on a split at several
evaluation lengths (length generalisation), with a JSON file, a markdown table and two PNGs.

CHECKPOINT is a run directory (its newest checkpoint), a ``checkpoints/step-*`` directory or a
``save_pretrained`` directory. Lengths are token counts or multiples of the training length:
``--lengths 512,4096,16384`` or ``--lengths 1x,4x,16x`` (the default).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, name: str) -> None:
    from blockstate.evaluation.runner import DEFAULT_LENGTHS

    p = sub.add_parser(name, help="perplexity and bits per byte at several lengths",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="run or checkpoint directories")
    p.add_argument("--data", help="corpus (default: each checkpoint's training corpus)")
    p.add_argument("--suffixes", metavar=".EXT,...", help="file suffixes read from a --data folder, e.g. .py,.md "
                                                         "(default: what the checkpoint trained on, else .txt,.jsonl)")
    p.add_argument("--text-field", metavar="NAME", help="the field of each .jsonl record that holds the text "
                                                       "(default: the checkpoint's, else text)")
    p.add_argument("--split", default="test", help="train, validation or test (default test)")
    p.add_argument("--eval-tokens", type=_eval_tokens, default=0, metavar="N",
                   help="evaluate the first whole documents of the split up to N tokens (at least one document, "
                        "so the first may exceed N), as train and compare do; e.g. 65536 or 64k; 0 = the whole "
                        "split (default 0)")
    p.add_argument("--lengths", default=DEFAULT_LENGTHS,
                   help=f"evaluation lengths, tokens or multiples of the training length (default {DEFAULT_LENGTHS})")
    p.add_argument("--tokenizer", help="override the checkpoint's tokenizer (must have the model's vocabulary)")
    p.add_argument("--output", help="report directory (default <run>/eval)")
    p.add_argument("--batch-tokens", type=int, default=16384, help="tokens per forward batch (default 16384)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--cache-dir", help="token cache (default ~/.cache/blockstate)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--stream", nargs="?", type=int, const=4096, default=None, metavar="CHUNK",
                   help="also score every document with its whole left context, in chunks of CHUNK tokens "
                        "(default 4096) with the model's state carried between chunks (exact, constant memory "
                        "for S4D models)")
    p.set_defaults(run=run)


def _eval_tokens(text: str) -> int:
    """``0`` (the whole split) or a count like train's ``--eval-tokens`` (``65536``, ``64k``)."""
    from blockstate.cli.train import _count

    return 0 if text.strip() == "0" else _count(text)


def run(args: argparse.Namespace) -> int:
    from blockstate.data.corpora import normalise_suffixes
    from blockstate.evaluation.runner import run_evaluation

    if args.stream is not None and args.stream < 1:
        raise ValueError(f"--stream CHUNK must be a positive number of tokens, got {args.stream}")
    if args.batch_tokens < 1:
        raise ValueError(f"--batch-tokens must be a positive integer, got {args.batch_tokens}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from blockstate.cli.train import _setup_logging

    _setup_logging(False)
    paths = run_evaluation(args.checkpoints, data=args.data, lengths=args.lengths, split=args.split,
                           tokenizer=args.tokenizer, output=args.output, batch_tokens=args.batch_tokens,
                           device=args.device, precision=args.precision, cache_dir=args.cache_dir,
                           progress=not args.no_progress, stream_chunk=args.stream, eval_tokens=args.eval_tokens,
                           suffixes=normalise_suffixes(args.suffixes) if args.suffixes else None,
                           text_field=args.text_field)
    print(paths["markdown"].read_text(encoding="utf-8").split("\nProtocol:")[0].strip())
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
