"""``blockstate demo``: build a preset, report its size, run a forward pass and one training step."""

from __future__ import annotations

import argparse
import time

from blockstate.cli.formatting import DefaultsFormatter


def register(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="build a BST model and run a forward/backward pass",
                       description="Build a BST preset on random ids, report its size, and run one forward pass and "
                       "one training step (a smoke test of the installation; no data, nothing written).",
                       formatter_class=DefaultsFormatter)
    p.add_argument("--size", default="tiny")
    p.add_argument("--variant", default="sh", help="sh | mh | mf")
    p.add_argument("--kernel", default="s4d", help="s4d | unstructured | explicit")
    p.add_argument("--length", type=int, default=1000, help="sequence length (any, also past the block grid)")
    p.add_argument("--batch", type=int, default=2)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from blockstate.models import BlockStateForCausalLM, preset_config

    if args.length < 1 or args.batch < 1:
        raise ValueError("--length and --batch must be positive integers")
    torch.manual_seed(0)
    config = preset_config(args.size, args.variant, args.kernel)
    model = BlockStateForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    print(f"BST:{args.variant.upper()}:{args.kernel} size={args.size}: {n:,} parameters, "
          f"{config.num_hidden_layers} layers (BST layers {config.bst_layers}), D={config.hidden_size}, "
          f"W={config.block_size}")
    ids = torch.randint(0, config.vocab_size, (args.batch, args.length))
    start = time.perf_counter()
    out = model(ids, labels=ids)
    out.loss.backward()
    elapsed = time.perf_counter() - start
    print(f"forward+backward on ({args.batch}, {args.length}) tokens: loss {out.loss.item():.3f} "
          f"(uniform = {torch.log(torch.tensor(float(config.vocab_size))).item():.3f}), {elapsed:.2f} s")
    return 0
