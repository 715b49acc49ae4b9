"""``blockstate generate CHECKPOINT --prompt "..."``: stream sampled text to stdout as it is produced."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="generate text from a checkpoint, streamed (constant memory for S4D models)")
    p.add_argument("checkpoint", help="a run directory or checkpoint directory written by blockstate train")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="", help="prompt text (default: start of a new document)")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from this file (long prompts)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40, help="0 = off")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from blockstate.evaluation.runner import load_checkpoint
    from blockstate.generation import SamplingConfig, stream_text

    prompt = args.prompt
    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise FileNotFoundError(f"--prompt-file {args.prompt_file} does not exist: pass an existing text file")
        prompt = args.prompt_file.read_text(encoding="utf-8", errors="replace")
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k or None, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                         seed=args.seed)
    cfg.validate()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_checkpoint(args.checkpoint, device=device)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    for piece in stream_text(loaded.model, loaded.tokenizer, prompt, cfg):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
