"""One layer's forward and forward+backward time and peak memory versus sequence length (the paper's Figure 3).

Every contestant is one whole residual layer (attention + FFN D -> 4D -> D), built by the same code as the models:

- ``bst-{sh,mh,mf}-{s4,unstructured}``: BST layers (SSM over the whole sequence, every block in parallel);
- ``brect``: our Block-Recurrent layer (sliding window + recurrent states, blocks walked in sequence);
- ``peer-brect``: ``block-recurrent-transformer-pytorch`` (lucidrains) with depth 1, embedding and logits replaced
  by identities, when that package is installed;
- ``slide``: sliding-window attention (each token sees the previous W tokens);
- ``block``: block-local attention alone (the Block Transformer layer between BST layers);
- ``full``: full causal attention (SDPA; a flash kernel where torch has one).

The paper's setting by default: D = 512, 16 heads, W = 128, N = 16, batch 1. Layers are interleaved inside every
repeat, so machine drift hits all alike; CUDA is timed with events after synchronisation. A layer whose
forward+backward passes ``time_limit`` seconds at one length is not run at longer ones (the table says so).

Peak memory is the extra memory one forward+backward allocates above the inputs and parameters: on CUDA the
allocator's peak; elsewhere the peak of live tensor storage, tracked op by op (``PeakTensorMemory``). Both count
activations, saved tensors and gradients; neither counts scratch memory inside a kernel. The memory pass runs after
all timings, untimed, since tracking slows every op.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from blockstate.benchmarks.common import interleave, is_oom, machine, spread, timed, write_json
from blockstate.benchmarks.layers_report import goals, load, plot, ratio_rows, tables

BST = [f"bst-{v}-{k}" for k in ("s4", "unstructured") for v in ("sh", "mh", "mf")]
LAYERS = [*BST, "brect", "peer-brect", "slide", "block", "full"]
DEFAULT_LENGTHS = "1k,2k,4k,8k,16k,32k,65k"


@dataclass
class Setting:
    dim: int = 512
    heads: int = 16
    block: int = 128
    state: int = 16  # N, the S4D state size
    batch: int = 1
    states: int = 128  # Block-Recurrent state vectors (= W; BST:MF uses the paper's S = 32 context states)
    dtype: str = "float32"  # or bfloat16 / float16: autocast (SSM parameters and FFTs stay fp32)


def parse_length(text: str) -> int:
    """'4096', '4k' (4096) or '65k' (65536: a k is 1024, and 65k means 2**16)."""
    text = text.strip().lower()
    if text.endswith("k"):
        n = int(text[:-1]) * 1024
        return 1 << 16 if n == 65 * 1024 else n
    return int(text)


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [parse_length(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--lengths must be comma-separated lengths like 1k,4k,4096, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise ValueError("--lengths needs at least one positive length")
    return sorted(set(lengths))


# -- the contestants -----------------------------------------------------------------------------------------
def _ours(name: str, s: Setting, length: int) -> nn.Module:
    from blockstate.models.modeling_blockstate import build_layer
    from blockstate.registry import model_config

    common = dict(hidden_size=s.dim, num_attention_heads=s.heads, intermediate_size=4 * s.dim, num_hidden_layers=1,
                  block_size=s.block, max_train_length=max(length, s.block), vocab_size=256,
                  hidden_dropout=0.0, attention_dropout=0.0)  # the peer has no dropout; time the layer itself
    if name.startswith("bst-"):
        config = model_config(name, "paper", bst_layers=[0], ssm_state_size=s.state, num_context_states=32,
                              **common)
    elif name == "brect":
        config = model_config("brect", "paper", recurrent_layers=[0], num_state_vectors=s.states, **common)
    elif name == "slide":
        config = model_config("slide", "paper", **common)
    elif name == "block":
        config = model_config("gpt", "paper", **common)
    elif name == "full":
        config = model_config("gpt", "paper", **{**common, "block_size": length})
    else:
        raise ValueError(f"unknown layer {name!r}; choose from {LAYERS}")
    return build_layer(config, 0)


class PeerLayer(nn.Module):
    """``block-recurrent-transformer-pytorch`` at depth 1 as a (B, L, D) -> (B, L, D) layer."""

    def __init__(self, s: Setting, length: int):
        super().__init__()
        from block_recurrent_transformer_pytorch import BlockRecurrentTransformer

        self.net = BlockRecurrentTransformer(
            num_tokens=2, dim=s.dim, depth=1, dim_head=s.dim // s.heads, heads=s.heads, max_seq_len=max(length, s.dim),
            block_width=s.block, recurrent_layers=(1,), num_state_vectors=s.states)
        self.net.token_emb, self.net.to_logits = nn.Identity(), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, return_memories_and_states=False)[0]


def peer_available() -> bool:
    try:
        import block_recurrent_transformer_pytorch  # noqa: F401
    except Exception:  # missing, or a missing dependency of it
        return False
    return True


def build(name: str, s: Setting, length: int) -> nn.Module:
    return PeerLayer(s, length) if name == "peer-brect" else _ours(name, s, length)


def _call(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = layer(x)
    return out[0] if isinstance(out, tuple) else out  # our Block-Recurrent layer also returns state and keys


# -- measurement --------------------------------------------------------------------------------------------
def _autocast(s: Setting, device: torch.device):
    if s.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, s.dtype))


def make_step(layer: nn.Module, x: torch.Tensor, mode: str, s: Setting) -> Callable[[], None]:
    device = x.device
    if mode == "forward":
        def step() -> None:
            with torch.no_grad(), _autocast(s, device):
                _call(layer, x)
    else:
        x = x.detach().requires_grad_(True)

        def step() -> None:
            with _autocast(s, device):
                out = _call(layer, x)
            out.float().square().mean().backward()
            layer.zero_grad(set_to_none=True)
            x.grad = None
    return step


class PeakTensorMemory(TorchDispatchMode):
    """Bytes of tensor storage alive at the peak of a call on any device: every op's outputs are counted when
    created and uncounted when their storage is freed. Like CUDA's ``max_memory_allocated``, it sees what the
    model allocates (activations, saved tensors, gradients), not scratch memory inside a kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current)
        return out


def peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Extra memory at the peak of one call, above what was allocated before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    tracker = PeakTensorMemory()
    with tracker:
        step()
    return tracker.peak


def memory_pass(todo: dict[str, list[int]], s: Setting, device: torch.device) -> dict[str, dict[int, Any]]:
    """Peak extra memory of one forward+backward for each layer at each of its lengths (untimed)."""
    peaks: dict[str, dict[int, Any]] = {}
    for n, lengths in todo.items():
        peaks[n] = {}
        for length in lengths:
            torch.manual_seed(0)
            layer = build(n, s, length).to(device)
            x = torch.randn(s.batch, length, s.dim, device=device)
            step = make_step(layer, x, "backward", s)
            try:
                step()  # lazily created buffers (masks, rope tables) are not the layer's working memory
                peaks[n][length] = peak_bytes(step, device)
            except RuntimeError as exc:
                if not is_oom(exc):
                    raise
                peaks[n][length] = None
            del layer, x, step
    return peaks


def run_grid(names: list[str], lengths: list[int], s: Setting, device: torch.device, repeats: int = 3,
             warmup: int = 1, time_limit: float | None = 10.0, memory: bool = True,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time every layer at every length (forward and forward+backward), then measure peak memory."""
    results: dict[str, dict[str, dict[int, Any]]] = {n: {"forward": {}, "backward": {}, "memory": {}} for n in names}
    stopped: dict[str, str] = {}
    for length in lengths:
        active = [n for n in names if n not in stopped]
        if not active:
            break
        torch.manual_seed(0)
        x = torch.randn(s.batch, length, s.dim, device=device)
        layers = {}
        for n in active:
            torch.manual_seed(0)
            layers[n] = build(n, s, length).to(device)
        for mode in ("forward", "backward"):
            steps = {n: make_step(layers[n], x, mode, s) for n in active}
            cells = interleave(active, lambda n, steps=steps: timed(steps[n], device), repeats=repeats,
                               warm=lambda n, steps=steps: [steps[n]() for _ in range(warmup)])
            for n in cells.out_of_memory:
                stopped[n] = f"out of memory at {length}"
            for n, t in cells.times.items():
                results[n][mode][length] = spread(t)
        for n in active:
            r = results[n]["backward"].get(length)
            if n not in stopped and time_limit is not None and r and r["median"] > time_limit:
                stopped[n] = f"forward+backward {r['median']:.1f} s > {time_limit:g} s at {length}"
        log(f"  L={length}: " + ", ".join(f"{n} {1000 * results[n]['forward'][length]['median']:.0f} ms"
                                          for n in active if length in results[n]["forward"]))
        del layers, steps  # the step closures hold the layers too
    if memory:
        peaks = memory_pass({n: sorted(results[n]["backward"]) for n in names}, s, device)
        for n, per_length in peaks.items():
            results[n]["memory"] = per_length
    return {"results": results, "stopped": stopped}


def add_arguments(p: argparse.ArgumentParser) -> None:
    s = Setting()
    p.add_argument("--layers", default=",".join(LAYERS),
                   help="comma-separated, from: " + ", ".join(LAYERS) + " (peer-brect is skipped when the package "
                        "block-recurrent-transformer-pytorch is not installed)")
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help="sequence lengths, e.g. 1k,4k,65k (default %(default)s)")
    p.add_argument("--dim", type=int, default=s.dim, help="model width D (default %(default)s)")
    p.add_argument("--heads", type=int, default=s.heads, help="attention heads (default %(default)s)")
    p.add_argument("--block", type=int, default=s.block, help="block size W (default %(default)s)")
    p.add_argument("--state", type=int, default=s.state, help="S4D state size N (default %(default)s)")
    p.add_argument("--batch", type=int, default=s.batch, help="batch size (default %(default)s)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="float32, or autocast to bfloat16/float16 (SSM and FFT stay float32)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point after one warm-up (median, min, max)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="stop a layer at longer lengths once its forward+backward takes longer than this many seconds "
                        "(default: 10 on CPU, none on GPU)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                   help="directory for layers-<device>.json and .png (default %(default)s)")
    p.add_argument("--report", type=Path, default=None, metavar="JSON",
                   help="print the tables and goals of a saved result (and redraw its PNG beside it); runs nothing")


def report(payload: dict[str, Any]) -> str:
    return tables(payload) + "\n\n## goals\n\n" + "\n".join(goals(payload))


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.report is not None:
        payload = load(args.report)
        print(report(payload))
        plot(payload, args.report.with_suffix(".png"))
        return payload
    names = [n.strip() for n in args.layers.split(",") if n.strip()]
    unknown = [n for n in names if n not in LAYERS]
    if unknown or not names:
        raise ValueError(f"--layers: unknown {unknown or names}; choose from {', '.join(LAYERS)}")
    for flag in ("dim", "heads", "block", "state", "batch", "repeats"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    if args.dim % args.heads:
        raise ValueError(f"--dim ({args.dim}) must be divisible by --heads ({args.heads})")
    lengths = parse_lengths(args.lengths)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible; use --device cpu")
    notes = []
    if "peer-brect" in names and not peer_available():
        names.remove("peer-brect")
        notes.append("peer-brect skipped: pip install --no-deps block-recurrent-transformer-pytorch==0.4.4 "
                     "beartype einops packaging")
    s = Setting(dim=args.dim, heads=args.heads, block=args.block, state=args.state, batch=args.batch,
                states=args.block, dtype=args.dtype)
    limit = args.time_limit if args.time_limit is not None else (10.0 if device.type == "cpu" else None)
    info = machine()
    print(f"bench layers on {info['device']}, torch {info['torch']}, {info['threads']} threads: {', '.join(names)}")
    grid = run_grid(names, lengths, s, device, repeats=args.repeats, time_limit=limit, memory=not args.no_memory)
    payload = {"machine": info, "setting": asdict(s), "lengths": lengths, "repeats": args.repeats,
               "time_limit_s": limit, "notes": notes, **grid}
    payload["ratios"] = ratio_rows(payload)
    print(report(payload))
    for note in notes:
        print(note)
    # one file per device and precision, so an fp32 and a bf16 run can sit side by side (scripts/gpu-check.sh)
    suffix = {"float32": "", "bfloat16": "-bf16", "float16": "-fp16"}[args.dtype]
    stem = f"layers-{'gpu' if device.type == 'cuda' else 'cpu'}{suffix}"
    write_json(args.out / f"{stem}.json", payload)
    plot(payload, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json and .png")
    return payload
