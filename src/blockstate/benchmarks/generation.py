"""Per-token generation latency and cache memory versus context length: BST (S4D) against a full-attention
KV cache (the same code with no SSM layers and one block as long as the context, i.e. a plain GPT).

For each model and context c: prefill c tokens in parallel mode, then time single-token decoding steps. The
BST cache holds one block of keys/values and the SSM state, so its per-token cost should not grow with c; the
KV cache grows linearly and its per-token attention cost with it. ``static=True`` adds BST:SH decoding from a
static cache (``static_cache=True``: fixed buffers, the step captured as a CUDA graph on CUDA); ``compiled=True``
adds it with the step compiled too (``compile_decode=True``: torch.compile, inductor).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from blockstate.benchmarks.common import machine, pyplot, time_call, write_json
from blockstate.models import BlockStateForCausalLM, preset_config

STATIC = " static"  # suffix of a model decoded from a static cache (a CUDA graph on CUDA)
COMPILED = " compiled"  # ... from a static cache with the step compiled (torch.compile)


def bench_models(size: str, static: bool = False, compiled: bool = False) -> dict[str, BlockStateForCausalLM]:
    models = {f"bst-{v}-s4": BlockStateForCausalLM(preset_config(size, v, "s4d")) for v in ("sh", "mh", "mf")}
    if static:  # the same model, decoded from a static cache
        models["bst-sh-s4" + STATIC] = models["bst-sh-s4"]
    if compiled:
        models["bst-sh-s4" + STATIC + COMPILED] = models["bst-sh-s4"]
    models["gpt (KV cache)"] = BlockStateForCausalLM(preset_config(size, "sh", "s4d", bst_layers=[],
                                                                   block_size=1 << 30))
    return models


@torch.no_grad()
def measure(model: BlockStateForCausalLM, context: int, steps: int, repeats: int, device: torch.device,
            chunk: int = 4096, static: bool = False, compiled: bool = False) -> dict[str, Any]:
    model = model.to(device).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, context), device=device)
    cache = None
    # prefill in block-aligned chunks (segment streaming) so BST never holds more than `chunk` activations
    if model.config.bst_layers and context > chunk:
        chunk -= chunk % model.config.block_size
        for start in range(0, context, chunk):
            last = start + chunk >= context
            cache = model(ids[:, start : start + chunk], cache=cache, use_cache=True,
                          static_cache=static and last, compile_decode=compiled and last).cache
    else:
        cache = model(ids, use_cache=True, static_cache=static, compile_decode=compiled).cache
    token = torch.randint(0, vocab, (1, 1), device=device)

    def decode():
        for _ in range(steps):
            model(token, cache=cache)

    if compiled:
        model(token, cache=cache)  # the first step runs eagerly, the second compiles: neither is timed
    timing = time_call(decode, device, repeats=repeats, warmup=1)
    return {"context": context, "ms_per_token": 1000 * timing["median"] / steps,
            "ms_min": 1000 * timing["min"] / steps, "ms_max": 1000 * timing["max"] / steps,
            "cache_mib": cache.nbytes() / 2**20}


def run(contexts: list[int], size: str = "tiny", steps: int = 16, repeats: int = 3, device: str | None = None,
        out_dir: Path = Path("benchmarks/results"), static: bool = False, compiled: bool = False) -> dict[str, Any]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    models = bench_models(size, static, compiled)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
    for context in contexts:  # contexts outer, models inner: drift hits all models alike
        for name, model in models.items():
            results[name].append(measure(model, context, steps, repeats, dev, static=STATIC in name,
                                         compiled=name.endswith(COMPILED)))
    payload = {"benchmark": "generation", "size": size, "machine": machine(), "steps": steps, "results": results}
    print_table(payload)
    write_json(out_dir / "generation.json", payload)
    plot(payload, out_dir / "generation.png")
    return payload


def print_table(payload: dict[str, Any]) -> None:
    m = payload["machine"]
    print(f"# per-token generation latency, size={payload['size']}, {m['device']}, torch {m['torch']}, "
          f"{m['threads']} threads")
    contexts = [r["context"] for r in next(iter(payload["results"].values()))]
    print(f"{'model':26}" + "".join(f"{c:>12,}" for c in contexts) + f"{'growth':>9}   cache MiB at largest")
    for name, rows in payload["results"].items():
        growth = rows[-1]["ms_per_token"] / rows[0]["ms_per_token"]
        print(f"{name:26}" + "".join(f"{r['ms_per_token']:>10.2f}ms" for r in rows)
              + f"{growth:>8.2f}x   {rows[-1]['cache_mib']:.2f}")


def plot(payload: dict[str, Any], path: Path) -> None:
    plt = pyplot(path)
    if plt is None:
        return

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in payload["results"].items():
        ctx = [r["context"] for r in rows]
        ax1.plot(ctx, [r["ms_per_token"] for r in rows], marker="o", label=name)
        ax2.plot(ctx, [r["cache_mib"] for r in rows], marker="o", label=name)
    for ax, label in ((ax1, "ms per token"), (ax2, "cache MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend()
    fig.suptitle(f"generation, size={payload['size']}, {payload['machine']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--contexts", default="1024,16384,65536", help="comma-separated context lengths")
    p.add_argument("--size", default="tiny")
    p.add_argument("--steps", type=int, default=16, help="decoding steps per timed run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--static", action="store_true",
                   help="also BST:SH from a static cache (static_cache=True: a CUDA graph per token on CUDA)")
    p.add_argument("--compile", action="store_true",
                   help="also BST:SH from a static cache with the step compiled (compile_decode=True, torch.compile)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
