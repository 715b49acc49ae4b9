"""GSS-Hybrid streams like every other model: its SSM (DSS-EXP, or the project's kernels) decodes as a recurrence or
an incremental convolution with a state of fixed size, its attention layers keep their blocks' keys/values, and
generate() (greedy, beam, sampling) runs through the cache. Every way of reading a stream (token by token, prefill
then decode, left-padded batches, block-aligned chunks) gives the parallel forward's logits for every gss_kernel:
tests/models/test_harness.py, which runs them over every registered model."""

import pytest
import torch
from helpers.models import build as small_model
from helpers.models import live_gss_branch

from blockstate.layers.gss import GSS_KERNELS, GatedStateSpaceLayer
from blockstate.registry import create_model

VOCAB, LENGTH = 61, 45  # crosses several blocks of W=8 and exceeds max_train_length=32


def build(kernel: str = "dss", state_size: int = 32, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("gss-hybrid", size="tiny", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3,
                         num_attention_heads=4, intermediate_size=64, block_size=8, max_train_length=32,
                         gss_hidden_size=64, gss_narrow_size=8, attention_layers=[1], gss_kernel=kernel,
                         gss_state_size=state_size, **overrides).eval()
    return live_gss_branch(model)


def ssm_share(model, ids) -> float:
    """How much the logits move when the GSS layers' SSM output is zeroed: the test's signal."""
    layers = [layer for layer in model.model.layers if isinstance(layer, GatedStateSpaceLayer)]
    with torch.no_grad():
        ref = model(ids).logits
        hooks = [layer.ssm.register_forward_hook(lambda module, args, out: out * 0) for layer in layers]
        try:
            off = model(ids).logits
        finally:
            for hook in hooks:
                hook.remove()
    return float((ref - off).abs().max())


@pytest.mark.parametrize("kernel", GSS_KERNELS)
@pytest.mark.parametrize("previous", [False, True])
def test_the_scaled_ssm_branch_moves_the_logits(kernel, previous):
    """The harness (tests/models/test_harness.py) checks GSS-Hybrid with this scaling, at its own small setting: there
    a wrong SSM state must show in the logits."""
    model = live_gss_branch(small_model("gss-hybrid", gss_kernel=kernel, attend_previous_block=previous))
    assert ssm_share(model, torch.randint(0, VOCAB, (2, LENGTH))) > 1e-2


@pytest.mark.parametrize("kernel", GSS_KERNELS)
def test_ssm_step_equals_convolution(kernel):
    """Layer level: the narrow branch's SSM one token at a time equals its causal convolution (512 shared DSS
    modes, the paper's setting, for dss)."""
    layer = build(kernel, state_size=512).model.layers[0]
    s = torch.randn(2, LENGTH, 8)
    with torch.no_grad():
        ref = layer.ssm(s)[:, :, 0]  # (B, H, L)
        cache = layer.allocate_inference_cache()
        out = torch.stack([layer.ssm.step(cache, s[:, t], torch.full((2,), t))[..., 0] for t in range(LENGTH)], -1)
    assert ref.abs().max() > 0.1
    assert (out - ref).abs().max() < 1e-4 * max(1.0, float(ref.abs().max()))
    if kernel in ("dss", "s4d"):  # a diagonal recurrence: a fixed-size complex state, no history
        assert cache.history is None and cache.ssm_state.shape[1] == 8 and cache.ssm_state.is_complex()


def test_dss_cache_memory_is_constant():
    model = build("dss", state_size=512)
    sizes = []
    with torch.no_grad():
        cache = model(torch.randint(0, VOCAB, (1, 3)), use_cache=True).cache
        for _ in range(40):
            model(torch.randint(0, VOCAB, (1, 1)), cache=cache)
            sizes.append(cache.nbytes())
    assert len(set(sizes[8:])) == 1  # after the first block nothing grows


def test_generate_greedy_beam_and_sampling():
    model = build("dss")
    ids = torch.randint(1, VOCAB, (2, 11))
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    x = ids
    with torch.no_grad():
        for _ in range(12):
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, x)
    beam = dict(max_new_tokens=7, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, use_cache=True, **beam), model.generate(ids, use_cache=False, **beam))
    sampled = model.generate(ids, max_new_tokens=5, do_sample=True, top_p=0.9, pad_token_id=0)
    assert sampled.shape == (2, 16)


def test_bf16_model_keeps_the_ssm_state_in_fp32():
    model = build("dss").to(torch.bfloat16)
    assert model.model.layers[0].ssm.kernel.w.dtype == torch.float32
    with torch.no_grad():
        cache = model(torch.randint(0, VOCAB, (2, 10)), use_cache=True).cache
        out = model(torch.randint(0, VOCAB, (2, 1)), cache=cache)
    assert cache.layers[0].ssm_state.dtype == torch.complex64
    assert torch.isfinite(out.logits).all()
