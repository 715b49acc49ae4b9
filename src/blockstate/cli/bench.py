"""``blockstate bench layers|generate``: benchmarks that print tables and write JSON/PNG."""

from __future__ import annotations

import argparse

from blockstate.cli.formatting import DefaultsFormatter


def register(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="speed and memory benchmarks (tables + JSON + PNG)")
    kinds = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    from blockstate.benchmarks import generation, layers

    lp = kinds.add_parser("layers", help="one layer's forward / forward+backward time and peak memory vs length")
    layers.add_arguments(lp)
    lp.set_defaults(run=run_layers)

    g = kinds.add_parser("generate", help="per-token generation latency and cache memory vs context length",
                         description="Per-token decoding latency (median of timed runs) and streaming-cache memory "
                         "after a prefill of each --contexts length, every model interleaved in one run; writes "
                         "benchmarks/results/generation.{json,png}.",
                         formatter_class=DefaultsFormatter)
    generation.add_arguments(g)
    g.set_defaults(run=run_generate)

    from blockstate.benchmarks import train

    t = kinds.add_parser("train", help="training tokens/s (forward+backward+optimizer) of every model vs length",
                         description=train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_arguments(t)
    t.set_defaults(run=run_train)


def run_layers(args: argparse.Namespace) -> int:
    from blockstate.benchmarks import layers

    layers.run(args)
    return 0


def run_train(args: argparse.Namespace) -> int:
    from blockstate.benchmarks import train

    train.run(args)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from blockstate.benchmarks import generation

    try:
        contexts = [int(c) for c in args.contexts.split(",") if c]
    except ValueError:
        raise ValueError(f"--contexts must be comma-separated integers, got {args.contexts!r}") from None
    if not contexts or min(contexts) < 1:
        raise ValueError("--contexts needs at least one positive length")
    generation.run(contexts, args.size, args.steps, args.repeats, args.device, args.out, args.static,
                   args.compile)
    return 0
