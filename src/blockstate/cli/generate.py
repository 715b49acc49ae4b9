"""``blockstate generate RUN --prompt "..."``: stream generated text to stdout as it is produced.

RUN is a run directory (its newest checkpoint), one of its ``checkpoints/step-*`` directories, or any directory
written by ``save_pretrained``. Generation is Hugging Face ``generate()`` through the model's streaming cache
(constant memory per token for S4D models); the prompt follows a document separator, as every training
document does, and generation stops at the next one. Multi-byte characters are printed once complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from blockstate.cli.formatting import RawDefaultsFormatter


def register(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="generate text from a run or checkpoint, streamed (constant memory for S4D models)",
                       description=__doc__, formatter_class=RawDefaultsFormatter)
    p.add_argument("checkpoint", help="a run directory, a checkpoint directory or a save_pretrained directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="", help="prompt text (default: empty, the start of a new document)")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from this file (long prompts; raw bytes are "
                     "kept for a bytes model)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]; off by default")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats; 1 = off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto = cuda when a GPU is visible, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--static-cache", action="store_true",
                   help="decode from fixed buffers, as a CUDA graph on CUDA (BST SH/MH with S4D kernels)")
    p.add_argument("--compile-decode", action="store_true",
                   help="with --static-cache: compile the decode step with torch.compile (a few seconds once)")
    p.add_argument("--tokenizer", default=None,
                   help="use this tokenizer instead of the run's own (bytes, a directory...)")
    p.set_defaults(run=run)


def read_prompt(args: argparse.Namespace, accepts_bytes: bool) -> str | bytes:
    """The prompt as text, or as raw bytes from --prompt-file for a bytes model (invalid UTF-8 kept)."""
    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise FileNotFoundError(f"--prompt-file {args.prompt_file} does not exist: pass an existing text file")
        try:
            raw = args.prompt_file.read_bytes()
        except OSError as exc:
            raise OSError(f"--prompt-file {args.prompt_file} cannot be read ({exc.strerror}): pass a readable "
                          "file") from None
        return raw if accepts_bytes else raw.decode("utf-8", errors="replace")
    check_prompt(args.prompt)
    return args.prompt


def check_prompt(prompt: str) -> None:
    """Refuse a --prompt that is not UTF-8 (argv bytes that are not UTF-8 arrive as lone surrogates)."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = prompt[exc.start].encode("utf-8", "surrogateescape")
        raise ValueError(f"--prompt is not valid UTF-8 (byte 0x{bad.hex()} at character {exc.start}): pass UTF-8 "
                         "text, or put raw bytes in a file and pass --prompt-file") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from blockstate.generation import SamplingConfig, generate_text
    from blockstate.runtime.device import pick_device
    from blockstate.runtime.loading import load_checkpoint

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k or None, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                         seed=args.seed, static_cache=args.static_cache,
                         compile_decode=args.compile_decode)
    cfg.validate()
    check_prompt(args.prompt)  # before the model loads: a bad flag fails at once
    device = pick_device(args.device)  # --device cuda without a GPU: one line naming the flag
    loaded = load_checkpoint(args.checkpoint, tokenizer=args.tokenizer, device=device)
    prompt = read_prompt(args, bool(getattr(loaded.tokenizer, "accepts_bytes", False)))
    out = sys.stdout
    if hasattr(out, "reconfigure"):
        out.reconfigure(errors="replace")  # a terminal that cannot show a character gets '?', not a crash
    out.write(prompt if isinstance(prompt, str) else prompt.decode("utf-8", errors="replace"))
    out.flush()

    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    generate_text(loaded.model, loaded.tokenizer, prompt, cfg, write=write)
    out.write("\n")
    return 0
