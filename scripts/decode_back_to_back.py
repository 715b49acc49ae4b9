"""Per-token decoding latency of two source trees, back to back (issue 16 item 6: "measure today's commit and
yours back to back").

    git worktree add /tmp/before REV
    OMP_WAIT_POLICY=PASSIVE python scripts/decode_back_to_back.py /tmp/before/src src --variant sh \
        --context 1024 --threads 1 [--rounds 15 --steps 32 --size tiny --static | --compile] [--json FILE]

Two worker processes, each importing the ``blockstate`` of its own tree, build the same model (seed 0), prefill
``--context`` random tokens and then take turns: one block of ``--steps`` decoding steps each, the order
alternating every round, so both see the same machine load. Prints the medians and their ratio (first / second);
a ratio above 1 means the second tree decodes faster. ``--static`` decodes both trees from a static cache;
``--compile`` decodes the first tree as it decodes by default and the second from a static cache with the step
compiled (``compile_decode=True``; the warm-up steps include the compilation). Times are wall clock on a shared
machine: compare ratios from one run, never absolute figures across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from blockstate.models import BlockStateForCausalLM, preset_config
size, variant, context, steps, threads, mode = sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7]), sys.argv[7]
torch.set_num_threads(threads)
torch.manual_seed(0)
model = BlockStateForCausalLM(preset_config(size, variant, "s4d")).eval()
ids = torch.randint(0, model.config.vocab_size, (1, context))
with torch.no_grad():
    extra = {"static": {"static_cache": True}, "compiled": {"static_cache": True, "compile_decode": True}}
    cache = model(ids, use_cache=True, **extra.get(mode, {})).cache
    token = torch.randint(0, model.config.vocab_size, (1, 1))
    for _ in range(8):  # warm-up: fused weights, tables, allocator
        model(token, cache=cache)
    print("ready", flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        for _ in range(steps):
            model(token, cache=cache)
        print(json.dumps((time.perf_counter() - start) / steps * 1000), flush=True)
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path, help="the src/ folder of the first tree (e.g. the commit before)")
    parser.add_argument("second", type=Path, help="the src/ folder of the second tree (e.g. this one)")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--variant", default="sh", choices=("sh", "mh", "mf"))
    parser.add_argument("--context", type=int, default=1024, help="tokens prefilled before decoding")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=32, help="decoding steps per block")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--static", action="store_true", help="decode from a static cache (static_cache=True)")
    how.add_argument("--compile", action="store_true",
                     help="the second tree from a static cache with the step compiled (compile_decode=True)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    for tree in (args.first, args.second):
        if not (tree / "blockstate" / "__init__.py").is_file():
            parser.error(f"{tree} holds no blockstate package: pass a tree's src/ folder")
    return args


def run(args: argparse.Namespace) -> dict:
    numbers = [str(n) for n in (args.context, args.steps, args.threads)]
    modes = ["static"] * 2 if args.static else ["dynamic", "compiled" if args.compile else "dynamic"]
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(tree.resolve()), args.size, args.variant,
                                 *numbers, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for tree, mode in zip((args.first, args.second), modes)]
    try:
        for worker, tree in zip(workers, (args.first, args.second)):
            if worker.stdout.readline().strip() != "ready":
                raise SystemExit(f"error: the worker for {tree} failed before decoding (its traceback is above)")
        times: list[list[float]] = [[], []]
        for r in range(args.rounds):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                workers[i].stdin.write("go\n")
                workers[i].stdin.flush()
                times[i].append(json.loads(workers[i].stdout.readline()))
    finally:
        for worker in workers:
            worker.stdin.close()
            worker.wait()
    first, second = (statistics.median(t) for t in times)
    return {"size": args.size, "variant": args.variant, "context": args.context, "threads": args.threads,
            "static": args.static, "modes": modes, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
            "rounds": args.rounds, "steps": args.steps, "first": str(args.first), "second": str(args.second),
            "first_ms": first, "second_ms": second, "first_over_second": first / second, "times_ms": times}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    print(f"{result['variant']} {result['size']}, context {result['context']}, {result['threads']} thread(s), "
          f"OMP_WAIT_POLICY={result['omp_wait_policy']}{', static cache' if args.static else ''}"
          f"{', second compiled' if args.compile else ''}: "
          f"first {result['first_ms']:.3f} ms, second {result['second_ms']:.3f} ms per token, "
          f"first / second {result['first_over_second']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
