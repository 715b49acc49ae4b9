"""Property tests (hypothesis) over random valid configurations: every BST variant x kernel and every baseline
runs, is causal and finite; streaming equals the parallel forward. Invalid configurations and bad forward inputs:
tests/models/test_properties_invalid.py.

Every test here is derandomized (the same examples on every run, no example database) with a fixed, bounded
number of examples, so CI is reproducible. Models are tiny (D <= 32, <= 3 layers, L <= ~80).
"""

from __future__ import annotations

import pytest
import torch
from helpers.properties import BASELINES, bst_fields, chooser, examples
from hypothesis import event, given
from hypothesis import strategies as st

from blockstate.layers import KERNELS, VARIANTS
from blockstate.layers.gss import GSS_KERNELS
from blockstate.models import BlockStateConfig, BlockStateForCausalLM
from blockstate.registry import create_model, model_config

LENGTH_KINDS = ("1", "W-1", "W", "W+1", "past_train_length", "any")


def draw_length_and_cut(draw, block: int, train_length: int) -> tuple[int, int]:
    """A sequence length at the edges (1, W-1, W, W+1, beyond the training length, or anything up to 64) and where
    its future starts (at or next to a block boundary, or anywhere; never 0 when length > 1: a cut at 0 checks
    nothing before it)."""
    rng = chooser(draw)
    kind = rng.choice(LENGTH_KINDS)
    length = {"1": 1, "W-1": block - 1, "W": block, "W+1": block + 1, "any": rng.randint(1, 64),
              "past_train_length": train_length + rng.randint(1, 2 * block + 5)}[kind]
    length = max(1, length)
    event(f"length {kind}")  # pytest --hypothesis-show-statistics: what the examples covered
    if length == 1:
        return 1, 0
    edges = sorted({min(max(1, c), length - 1) for c in (block - 1, block, block + 1, length - 1)})
    return length, rng.choice(edges + [rng.randint(1, length - 1)] * 2)


def random_ids(vocab: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randint(0, vocab, shape)


def check_forward_and_causality(model: torch.nn.Module, vocab: int, batch: int, length: int, cut: int) -> None:
    """Shapes, dtype, finiteness of the logits and the loss; causality: changing tokens at positions >= cut
    leaves the logits before cut unchanged and changes them at cut; the prefix alone gives the same logits."""
    x = random_ids(vocab, (batch, length))
    y = x.clone()
    y[:, cut:] = (x[:, cut:] + torch.randint(1, vocab, y[:, cut:].shape)) % vocab  # every future token differs
    with torch.no_grad():
        out = model(x, labels=x)
        a, b = out.logits, model(y).logits
    assert a.shape == (batch, length, vocab) and a.dtype == torch.float32
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    if length > 1:
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    # The FFT spreads rounding (not information) over all positions: measured <= 2e-7 relative over these
    # examples; a leak through attention or a wrapped FFT measured >= 4e-5 (3e-6 in the weakest example).
    tol = 3e-6 * max(1.0, float(a.abs().max()))
    if cut > 0:
        assert (a[:, :cut] - b[:, :cut]).abs().max() <= tol, "earlier logits depend on future tokens"
    assert not torch.equal(a[:, cut], b[:, cut]), "the logits at the cut ignore the token there"
    if cut > 0:
        with torch.no_grad():
            prefix = model(x[:, :cut]).logits
        assert (prefix - a[:, :cut]).abs().max() <= tol, "a prefix alone differs from the same prefix in context"


@pytest.mark.parametrize("variant,kernel", [(v, k) for v in VARIANTS for k in KERNELS])
@examples(30)
@given(data=st.data())
def test_valid_bst_configs_run_finite_and_causal(variant, kernel, data):
    fields = data.draw(bst_fields(variant, kernel), label="config")
    length, cut = draw_length_and_cut(data.draw, fields["block_size"], fields["max_train_length"])
    batch = data.draw(st.integers(1, 3), label="batch")
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    config = BlockStateConfig(**fields)
    layers = config.num_hidden_layers
    event("bst layers " + ("none" if not config.bst_layers else "all" if len(config.bst_layers) == layers else "some"))
    assert config.bst_layers == fields["bst_layers"]
    model = BlockStateForCausalLM(config).eval()
    kinds = [type(layer).__name__ for layer in model.model.layers]
    assert [i for i, kind in enumerate(kinds) if kind == "BSTLayer"] == fields["bst_layers"]
    check_forward_and_causality(model, fields["vocab_size"], batch, length, cut)


@st.composite
def baseline_overrides(draw, name: str) -> dict:
    """Small valid overrides for a registry baseline."""
    rng = chooser(draw)
    heads = draw(st.integers(1, 3))
    layers = draw(st.integers(1, 3))
    overrides = dict(vocab_size=draw(st.integers(2, 40)), hidden_size=heads * rng.choice([2, 4, 8]),
                     num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=draw(st.integers(1, 32)),
                     max_train_length=draw(st.integers(2, 40)))
    if name not in ("gpt", "transformer-xl"):  # gpt: full attention; transformer-xl: W = max_train_length / 2
        overrides["block_size"] = draw(st.integers(1, 10))
    if name == "brect":
        overrides.update(num_state_vectors=draw(st.integers(1, 6)),
                         recurrent_layers=sorted(rng.sample(range(layers), rng.randint(1, layers))),
                         state_gate=rng.choice(["fixed", "lstm"]))
    if name == "gss-hybrid":
        overrides.update(gss_hidden_size=draw(st.integers(2, 32)), gss_narrow_size=draw(st.integers(1, 8)),
                         attention_layers=sorted(rng.sample(range(layers), rng.randint(0, layers))),
                         gss_kernel=rng.choice(GSS_KERNELS), gss_state_size=draw(st.integers(1, 8)))
    return overrides


@pytest.mark.parametrize("name", BASELINES)
@examples(20)
@given(data=st.data())
def test_valid_baseline_configs_run_finite_and_causal(name, data):
    overrides = data.draw(baseline_overrides(name), label="overrides")
    config = model_config(name, "tiny", **overrides)
    block = min(config.block_size, 64)  # gpt: one block of any length
    length, cut = draw_length_and_cut(data.draw, block, config.max_train_length)
    batch = data.draw(st.integers(1, 3), label="batch")
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    model = create_model(name, "tiny", **overrides).eval()
    check_forward_and_causality(model, overrides["vocab_size"], batch, length, cut)


@pytest.mark.parametrize("variant", VARIANTS)
@examples(10)
@given(data=st.data())
def test_streaming_equals_parallel_on_random_configs(variant, data):
    """Prefill of any length, then token-by-token decoding, reproduces the parallel forward."""
    fields = data.draw(bst_fields(variant), label="config")
    event(f"kernel {fields['kernel']}")
    length = data.draw(st.integers(2, 3 * fields["block_size"] + 4), label="length")
    prefill = data.draw(st.integers(1, length - 1), label="prefill")
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    model = BlockStateForCausalLM(BlockStateConfig(**fields)).eval()
    ids = random_ids(fields["vocab_size"], (2, length))
    with torch.no_grad():
        ref = model(ids).logits
        pre = model(ids[:, :prefill], use_cache=True)
        rest = [model(ids[:, t : t + 1], cache=pre.cache).logits for t in range(prefill, length)]
    out = torch.cat([pre.logits, *rest], dim=1)
    assert (out - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))
