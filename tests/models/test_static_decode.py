"""Static-cache decoding (``static_cache=True``, ``blockstate.models.static_decode``) equals the dynamic cache.

On CPU the static step runs eagerly over fixed buffers; with ``BLOCKSTATE_TEST_DEVICE=cuda`` (scripts/gpu-check.sh)
the same tests run the step as a captured CUDA graph, replayed per token, and check that a graph was captured.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers.models import VOCAB, build

from blockstate.generation import SamplingConfig, generate_ids
from blockstate.models import static_decode

DEVICE = torch.device(os.environ.get("BLOCKSTATE_TEST_DEVICE", "cpu"))
SUPPORTED = ["bst-sh-s4", "bst-mh-s4"]
REFUSED = ["bst-mf-s4", "bst-sh-unstructured", "bst-sh-s4-gated", "gpt", "slide", "transformer-xl", "brect",
           "gss-hybrid"]
TOL = 1e-5 if DEVICE.type == "cpu" else 1e-4


def model_for(name: str):
    return build(name).to(DEVICE)


def ids_for(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g).to(DEVICE)


@pytest.mark.parametrize("name", SUPPORTED)
def test_static_decode_equals_dynamic(name):
    """Prefill 13 tokens (mid-block, W = 8), then 30 tokens across several blocks: the same logits as the dynamic
    cache, on the same tensors every step (nothing reallocated), captured as a CUDA graph on CUDA."""
    model = model_for(name)
    prompt = ids_for(2, 13)
    with torch.no_grad():
        dynamic = model(prompt, use_cache=True).cache
        static = model(prompt, use_cache=True, static_cache=True).cache
        fixed = [(owner, field, t) for owner, field, t in static.static.fixed]
        worst = 0.0
        for token in ids_for(2, 30, seed=1).unbind(1):
            a = model(token[:, None], cache=dynamic).logits
            b = model(token[:, None], cache=static).logits
            worst = max(worst, float((a - b).abs().max()))
    assert worst < TOL
    assert all(getattr(owner, field) is t for owner, field, t in fixed)
    assert static.get_seq_length() == dynamic.get_seq_length() == 43
    assert torch.equal(static.position.cpu(), dynamic.position.cpu())
    assert (static.static.graph is not None) == (DEVICE.type == "cuda")


@pytest.mark.parametrize("name", SUPPORTED[:1])
def test_generate_with_static_cache(name, monkeypatch):
    """``generate(..., static_cache=True)``: greedy, beam search (the cache is reordered: copied back into the
    fixed tensors) and a left-padded batch give the dynamic cache's tokens, through the static step."""
    calls = []
    step = static_decode.StaticDecoder.step
    monkeypatch.setattr(static_decode.StaticDecoder, "step", lambda self, t: calls.append(1) or step(self, t))
    model = model_for(name)
    ids = ids_for(2, 11)
    padded = torch.ones_like(ids)
    padded[0, :4] = 0
    for extra in (dict(), dict(num_beams=3), dict(attention_mask=padded)):
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False, pad_token_id=0)
        kw.update(extra)
        calls.clear()
        expected = model.generate(ids, **kw)
        assert not calls
        assert torch.equal(model.generate(ids, static_cache=True, **kw), expected), extra
        assert len(calls) == 19  # every token after the prefill's


def test_generation_option_and_a_new_batch():
    """``SamplingConfig(static_cache=True)`` gives the same ids; a cache cut to fewer rows gets a new decoder."""
    model = model_for("bst-sh-s4")
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0)
    prompt = ids_for(1, 9)[0].tolist()
    assert generate_ids(model, prompt, SamplingConfig(**{**cfg.__dict__, "static_cache": True}), None) == \
        generate_ids(model, prompt, cfg, None)
    with torch.no_grad():
        dynamic = model(ids_for(3, 10), use_cache=True).cache
        static = model(ids_for(3, 10), use_cache=True, static_cache=True).cache
        keep = torch.tensor([2, 0], device=DEVICE)
        dynamic.index_select(keep)
        static.index_select(keep)
        token = ids_for(2, 1, seed=3)
        for _ in range(3):
            assert (model(token, cache=dynamic).logits - model(token, cache=static).logits).abs().max() < TOL
    assert static.static.batch == 2


@pytest.mark.parametrize("name", REFUSED)
def test_unsupported_models_are_refused_in_one_line(name):
    model = model_for(name)
    with pytest.raises(ValueError, match="static_cache=True needs") as err:
        model(ids_for(1, 9), use_cache=True, static_cache=True)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", SUPPORTED)
def test_compiled_static_decode_equals_dynamic(name):
    """``compile_decode=True``: the static step compiled with torch.compile (inductor) gives the dynamic cache's
    logits token by token, across block starts; a weight changed in place between tokens is read (the fused
    weights are refreshed eagerly, the compiled step keeps no stale copy); a new batch size recompiles."""
    torch._dynamo.reset()
    model = model_for(name)
    prompt = ids_for(2, 13)
    with torch.no_grad():
        dynamic = model(prompt, use_cache=True).cache
        static = model(prompt, use_cache=True, static_cache=True, compile_decode=True).cache
        assert static.static.compiled is not None
        worst = 0.0
        for t, token in enumerate(ids_for(2, 20, seed=1).unbind(1)):
            if t == 12:  # as an optimizer step would: in place, so the fused [q; q_cross; k; v] must be rebuilt
                model.model.layers[0].attention.qkv.weight.mul_(1.5)
                model.model.layers[0].ffn.up.weight.mul_(0.5)
                ssm = next(layer.context.ssm for layer in model.model.layers if layer.context is not None)
                ssm.kernel.c.mul_(2.0)  # and the SSM's discretised coefficients
            b = model(token[:, None], cache=static).logits  # first: the dynamic step would rebuild them itself
            a = model(token[:, None], cache=dynamic).logits
            worst = max(worst, float((a - b).abs().max()))
        assert worst < 10 * TOL
        assert static.static.steps == 20
        one = model(ids_for(1, 9), use_cache=True, static_cache=True, compile_decode=True).cache
        reference = model(ids_for(1, 9), use_cache=True).cache
        for token in ids_for(1, 4, seed=2).unbind(1):
            diff = model(token[:, None], cache=one).logits - model(token[:, None], cache=reference).logits
            assert float(diff.abs().max()) < 10 * TOL


def test_compiled_step_refreshes_every_step_constant():
    """Every method marked ``@step_constant`` in the model is found (the compiled step's eager refresh): each
    layer's fused attention weights and FFN up weight, and each SSM's coefficients, and nothing else."""
    from blockstate.layers.cache import step_constant_methods

    model = model_for("bst-sh-s4")
    layers = model.model.layers
    found = sorted((type(m.__self__).__name__, m.__name__) for m in step_constant_methods(model))
    attention, ffn = type(layers[0].attention).__name__, type(layers[0].ffn).__name__
    ssms = sum(layer.context is not None for layer in layers)
    assert ssms > 0
    expected = ([(attention, "_step_weights")] * len(layers) + [(ffn, "step_up_weight")] * len(layers)
                + [("LongConvSSM", "_step_coefficients")] * ssms)
    assert found == sorted(expected)


def test_compile_decode_needs_the_static_cache():
    model = model_for("bst-sh-s4")
    with pytest.raises(ValueError, match="pass static_cache=True with it"):
        model(ids_for(1, 9), use_cache=True, compile_decode=True)
    with pytest.raises(ValueError, match="--compile-decode compiles the static decode step"):
        SamplingConfig(compile_decode=True).validate()
