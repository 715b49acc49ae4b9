"""The device subset of the suite (scripts/gpu-check.sh runs it with BLOCKSTATE_TEST_DEVICE=cuda): streaming
equals the parallel forward, bf16 autocast keeps the SSM in fp32, a whole-model bf16 cast runs, save/load
round-trips, every registered model trains a few steps, and torch.compile gives the eager logits. On CPU (the
default device) the same tests run at tiny sizes, so they cannot rot; the compile test runs on CUDA only (or with
BLOCKSTATE_TEST_COMPILE=1), since inductor on a small shared CPU takes minutes.
"""

from __future__ import annotations

import os

import pytest
import torch

from blockstate.layers.ssm import LongConvSSM
from blockstate.registry import create_model, list_models

DEVICE = torch.device(os.environ.get("BLOCKSTATE_TEST_DEVICE", "cpu"))
STREAMERS = ["bst-sh-s4", "bst-mh-unstructured", "bst-mf-s4", "bst-sh-s4-gated", "gpt", "slide", "gss-hybrid"]


def model_on_device(name: str, **overrides):
    torch.manual_seed(0)
    # W = 16: inputs of 40-64 tokens span several blocks (streaming across block boundaries, MF summaries)
    return create_model(name, "tiny", max_train_length=64, block_size=16, **overrides).to(DEVICE)


def ids_for(model, length: int = 48, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=g).to(DEVICE)


@pytest.mark.parametrize("name", STREAMERS)
@torch.no_grad()
def test_streaming_equals_parallel(name):
    model = model_on_device(name).eval()
    ids = ids_for(model, 40)
    full = model(ids).logits
    out = model(ids[:, :19], use_cache=True)  # a prefill that ends inside a block, then one token at a time
    steps = [out.logits]
    cache = out.cache
    for t in range(19, ids.shape[1]):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        cache = out.cache
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("name", ["bst-sh-s4", "bst-mh-unstructured", "bst-mf-explicit", "gss-hybrid"])
def test_bf16_autocast_keeps_the_ssm_in_fp32(name):
    model = model_on_device(name).eval()
    ids = ids_for(model)
    dtypes = []

    def record(module, args, output):
        dtypes.append(output.dtype)

    # the kernels, and the SSM outputs they make (by FFT, or chunk by chunk for SH's S4D), come out fp32
    ssms = [m for m in model.modules() if isinstance(m, LongConvSSM)]
    hooks = [h.register_forward_hook(record) for m in ssms for h in (m, m.kernel)]
    with torch.no_grad():
        reference = model(ids).logits
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            mixed = model(ids).logits
    for h in hooks:
        h.remove()
    if name != "gss-hybrid":  # gss runs its own DSS kernel (ops/dss.py), not LongConvSSM
        assert dtypes and all(d == torch.float32 for d in dtypes), dtypes
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed).all()
    # bf16 has 8 mantissa bits: the logits agree to a few percent of their spread, not to fp32 precision
    assert (mixed - reference).abs().max() <= 0.05 * reference.abs().max() + 0.05


@pytest.mark.parametrize("name", ["bst-sh-s4", "bst-mf-unstructured", "slide", "gss-hybrid"])
def test_whole_model_bf16(name):
    model = model_on_device(name)
    ids = ids_for(model)
    with torch.no_grad():
        reference = model(ids).logits
    model = model.to(torch.bfloat16)
    ssm = [p for n, p in model.named_parameters() if ".ssm." in n]
    assert all(p.dtype == torch.float32 for p in ssm)  # kept fp32 under .to(bf16)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    assert (out.logits.float() - reference).abs().max() <= 0.1 * reference.abs().max() + 0.1


@pytest.mark.parametrize("name", ["bst-mh-s4", "brect", "gss-hybrid"])
def test_save_load_round_trip(name, tmp_path):
    from transformers import AutoModelForCausalLM

    model = model_on_device(name).eval()
    ids = ids_for(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).to(DEVICE).eval()
    with torch.no_grad():
        exact = DEVICE.type == "cpu"  # same weights, same kernels: bit-equal on CPU, to rounding elsewhere
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0 if exact else 1e-5,
                                   atol=0 if exact else 1e-5)


@pytest.mark.parametrize("name", list_models())
def test_a_few_training_steps(name):
    """Every registered model learns a repeated batch on the device: the loss falls and stays finite."""
    model = model_on_device(name).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = ids_for(model, 64)
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    losses = torch.stack(losses).cpu()
    assert torch.isfinite(losses).all() and losses[-1] < losses[0], losses


@pytest.mark.skipif(DEVICE.type != "cuda" and not os.environ.get("BLOCKSTATE_TEST_COMPILE"),
                    reason="inductor on CPU takes minutes here; runs on CUDA (gpu-check.sh)")
@pytest.mark.parametrize("name", ["bst-sh-s4", "gpt"])
def test_compile_equals_eager(name):
    model = model_on_device(name).eval()
    ids = ids_for(model, 64)
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model)(ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)
