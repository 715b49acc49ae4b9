"""Small models for the model tests: one setting per registered name (the harness's, shared by the baseline, compile
and fidelity tests) and the BST config of the layer and BST-only tests."""

from __future__ import annotations

import torch

from blockstate.layers import KERNELS, VARIANTS
from blockstate.layers.gss import GatedStateSpaceLayer
from blockstate.models import BlockStateConfig
from blockstate.registry import create_model, list_models

MODELS = list_models()
VOCAB = 61
VARIANT_KERNELS = [(v, k) for v in VARIANTS for k in KERNELS]

# Small enough to be fast on 2 cores, large enough that every architecture has several blocks and layers.
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
              block_size=8, max_train_length=32)
EXTRA = {
    "gpt": dict(block_size=None),  # keep the preset's full attention
    "transformer-xl": dict(block_size=None),  # the preset's window: max_train_length / 2 = 16
    "brect": dict(num_state_vectors=4, recurrent_layers=[1]),
    "gss-hybrid": dict(gss_hidden_size=64, gss_narrow_size=8, attention_layers=[1]),
}


def small_overrides(name: str) -> dict:
    """The config overrides of ``name``'s small test model (a ``None`` keeps the preset's value)."""
    extra = EXTRA.get(name, dict(num_context_states=4, bst_layers=[0, 2]) if name.startswith("bst-") else {})
    merged = {**COMMON, **extra}
    return {k: v for k, v in merged.items() if v is not None}


def build(name: str, **extra) -> torch.nn.Module:
    """``name``'s small test model in eval mode, seeded: the same weights on every call."""
    torch.manual_seed(0)
    return create_model(name, size="tiny", **{**small_overrides(name), **extra}).eval()


def live_gss_branch(model: torch.nn.Module) -> torch.nn.Module:
    """Scale GSS-Hybrid's gated SSM projections by 8, in place. At init that branch is three 0.02-std projections
    deep and barely moves the logits (~1e-5), so a wrong SSM state would pass a 1e-4 check; scaled, the SSM's share
    of the logits is O(1) (tests/models/test_gss_hybrid.py checks it)."""
    with torch.no_grad():
        for layer in model.model.layers:
            if isinstance(layer, GatedStateSpaceLayer):
                for proj in (layer.wide, layer.narrow, layer.expand, layer.out):
                    proj.weight.mul_(8)
    return model


def small_config(variant: str = "sh", kernel: str = "s4d", **overrides) -> BlockStateConfig:
    """A model small enough for exhaustive tests: 3 layers (BST at 0 and 2), W=8, trained length 32."""
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, block_size=8,
                max_train_length=32, num_context_states=4, bst_layers=[0, 2], variant=variant, kernel=kernel)
    return BlockStateConfig(**{**base, **overrides})


def decode_all(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """Logits of ``ids`` fed one token at a time through ``cache``."""
    return torch.cat([model(ids[:, t : t + 1], cache=cache).logits for t in range(ids.shape[1])], dim=1)


def assert_streams_like_parallel(model, length: int = 45, prefill: int = 13, block: int = 8) -> None:
    """Prefill then token-by-token decoding, and a block-aligned continuation run in parallel from a cache, each
    equal to the parallel forward of the whole sequence (``block``: the model's W)."""
    ids = torch.randint(0, VOCAB, (2, length))
    with torch.no_grad():
        ref = model(ids).logits
        pre = model(ids[:, :prefill], use_cache=True)
        assert (pre.logits - ref[:, :prefill]).abs().max() < 1e-4
        assert (decode_all(model, ids[:, prefill:], pre.cache) - ref[:, prefill:]).abs().max() < 1e-4
        first = model(ids[:, : 2 * block], use_cache=True)
        second = model(ids[:, 2 * block : 5 * block], cache=first.cache)
        assert (second.logits - ref[:, 2 * block : 5 * block]).abs().max() < 1e-4
