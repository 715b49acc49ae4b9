"""Fidelity of the BST model to the paper, with tests that can fail: reach across blocks (the architecture's central
claim), the cross-attention's alignment and head wiring, the S4D initialisation, pinned paper-size counts."""

import math

import pytest
import torch
from helpers.models import VARIANT_KERNELS, small_config

from blockstate import BlockStateForCausalLM
from blockstate.layers import BlockAttention, ContextStates, LongConvSSM, S4DKernel
from blockstate.ops import s4d_init
from blockstate.registry import count_model_parameters, create_model

W = 8
# Noise floor of a logit change that cannot be information: the FFT spreads rounding over every position, measured
# <= 1.8e-7 on these models (a change of the last token, seen at earlier positions). Real reach across blocks
# measured >= 4e-5 (the implicit filter's tail at 60 lags) and ~2e-3 for S4D.
REACH_TOL = 1e-6


@pytest.mark.parametrize("variant,kernel", VARIANT_KERNELS)
def test_one_bst_layer_reaches_across_blocks(variant, kernel):
    """One BST layer with block-local attention only (W = 8, L = 64): token 0 must change the logits at every
    position >= 3W. Attention alone cannot carry it past block 0; only the SSM's context states can."""
    torch.manual_seed(0)
    config = small_config(variant, kernel, num_hidden_layers=1, bst_layers=[0], block_size=W, max_train_length=64)
    assert not config.attend_previous_block
    model = BlockStateForCausalLM(config).eval()
    x = torch.randint(0, 61, (2, 64))
    y = x.clone()
    y[:, 0] = (x[:, 0] + 1) % 61
    with torch.no_grad():
        change = (model(x).logits - model(y).logits).abs().amax(-1)  # (B, L)
    dead = [t for t in range(3 * W, 64) if not bool((change[:, t] > REACH_TOL).all())]
    assert not dead, f"token 0 does not reach positions {dead} (max change there {change[:, dead].max():.1e})"


# -- BlockAttention's cross-attention, directly -----------------------------------------------------------------
def attention_inputs(attn: BlockAttention, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """What the output projection reads: (B, L, 2 * H * d), self heads then cross heads if the code is right."""
    seen = []
    hook = attn.out.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            attn(h, context)
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("attend_previous_block", [False, True])
def test_aligned_context_of_token_i_is_the_state_at_i(attend_previous_block):
    """SH: perturbing the context at position j changes only tokens >= j of j's block; not earlier tokens of that
    block, not other blocks; and only the cross heads (the second half of what the projection reads)."""
    torch.manual_seed(0)
    dim, heads, length, j = 32, 4, 32, 11  # j: position 3 of block 1
    attn = BlockAttention(dim, heads, W, context="aligned", attend_previous_block=attend_previous_block).eval()
    h, ctx = torch.randn(2, length, dim), torch.randn(2, length, dim)
    ctx2 = ctx.clone()
    ctx2[:, j] += torch.randn(2, dim)
    a, b = attention_inputs(attn, h, ctx), attention_inputs(attn, h, ctx2)
    half = heads * (dim // heads)
    change = (a - b).abs().amax(0)  # (L, 2 * H * d)
    assert change[:, :half].max() == 0, "the self-attention heads read the context"
    cross = change[:, half:].amax(-1)
    block_end = (j // W + 1) * W
    assert cross[:j].max() < 1e-6, "tokens before j (its block's and earlier blocks') see the state at j"
    assert cross[block_end:].max() < 1e-6, "later blocks see a state of an earlier block"
    assert (cross[j:block_end] > 1e-4).all(), "tokens >= j of j's block ignore the state at j"


def test_mh_head_h_reads_filter_h():
    """MH: context (B, L, H, D), filter h's output for head h. Perturbing filter h changes cross head h only."""
    torch.manual_seed(0)
    dim, heads, length = 32, 4, 24
    d = dim // heads
    attn = BlockAttention(dim, heads, W, context="aligned", context_per_head=True).eval()
    h, ctx = torch.randn(2, length, dim), torch.randn(2, length, heads, dim)
    base = attention_inputs(attn, h, ctx)
    for head in range(heads):
        ctx2 = ctx.clone()
        ctx2[:, :, head] += torch.randn(2, length, dim)
        change = (attention_inputs(attn, h, ctx2) - base).abs().amax((0, 1)).view(2, heads, d).amax(-1)
        assert change[0].max() == 0, "self heads read the context"
        assert change[1, head] > 1e-4, f"cross head {head} ignores filter {head}"
        others = [g for g in range(heads) if g != head]
        assert change[1, others].max() == 0, f"filter {head} leaks into cross heads {others}"


def test_attention_concatenates_self_heads_then_cross_heads():
    """The projection expects [self heads; cross heads]: zeroing the first half of its input columns removes
    exactly the self-attention (context-free) part of the output."""
    torch.manual_seed(0)
    dim, heads = 32, 4
    attn = BlockAttention(dim, heads, W, context="aligned").eval()
    plain = BlockAttention(dim, heads, W).eval()
    with torch.no_grad():
        plain.qkv.weight.copy_(attn.qkv.weight)
        plain.out.weight.copy_(attn.out.weight[:, :dim])  # the self half of the projection
        attn.out.weight[:, dim:] = 0  # silence the cross heads: what remains must be plain self-attention
        h, ctx = torch.randn(2, 24, dim), torch.randn(2, 24, dim)
        assert torch.allclose(attn(h, ctx), plain(h), atol=1e-6)


@pytest.mark.parametrize("kernel", ["s4d", "unstructured", "explicit"])
def test_mf_block_k_states_depend_only_on_tokens_before_kW(kernel):
    """MF: block k's S context states summarise tokens < kW: a change at position p reaches the states of block
    p // W + 1 (whose summary ends at (p // W + 1) * W - 1 >= p) and no earlier block's. (How far it reaches is
    the reach test's business.)"""
    torch.manual_seed(0)
    states = ContextStates(small_config("mf", kernel, block_size=W)).eval()
    u = torch.randn(2, 32, 32)
    for p in (7, 11, 23):  # the last token of block 0, inside block 1, the last token of block 2
        u2 = u.clone()
        u2[:, p] += 1.0
        with torch.no_grad():
            change = (states(u) - states(u2)).abs().amax((0, 2, 3))  # per block
        first = p // W + 1
        assert change[:first].max() < 1e-5, (p, change)  # FFT rounding (~1e-6) is not information
        assert change[first] > 1e-3, (p, change)


def test_mf_attention_reads_only_its_own_blocks_states():
    torch.manual_seed(0)
    dim, heads, nb, s = 32, 4, 3, 5
    attn = BlockAttention(dim, heads, W, context="states").eval()
    h, ctx = torch.randn(2, nb * W, dim), torch.randn(2, nb, s, dim)
    ctx2 = ctx.clone()
    ctx2[:, 1] += torch.randn(2, s, dim)
    with torch.no_grad():
        change = (attn(h, ctx) - attn(h, ctx2)).abs().amax((0, 2))
    assert change[:W].max() == 0 and change[2 * W :].max() == 0
    assert (change[W : 2 * W] > 1e-4).all()


# -- S4D initialisation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("state_size", [2, 16, 64])
def test_s4d_init_values_follow_the_formulas(state_size):
    """S4D-Inv: A_n = -1/2 + i (N/pi) (N/(2n+1) - 1); S4D-Lin: A_n = -1/2 + i pi n, n = 0..N/2-1, N real states."""
    n = torch.arange(state_size // 2, dtype=torch.float64)
    for init, imag in (("inv", state_size / math.pi * (state_size / (2 * n + 1) - 1)), ("lin", math.pi * n)):
        values = s4d_init(3, state_size, init)
        assert torch.allclose(values["a_imag"].double(), imag.expand(3, -1), rtol=1e-6, atol=1e-4)  # fp32
        real = -values["log_a_real"].double().exp()
        assert torch.allclose(real, torch.full_like(real, -0.5))
        assert ((values["log_dt"] >= math.log(1e-3)) & (values["log_dt"] <= math.log(1e-1))).all()


def test_s4d_c_and_skip_have_the_s4d_variances_in_a_built_model():
    """S4D convention: C complex normal with variance 0.5 per real part (unit complex variance), skip D ~ N(0, 1).
    Checked through a model's own initialisation, which must not overwrite them with initializer_range."""
    torch.manual_seed(0)
    model = create_model("bst-mh-s4", "tiny")
    kernels = [m for m in model.modules() if isinstance(m, S4DKernel)]
    skips = [m.skip for m in model.modules() if isinstance(m, LongConvSSM)]
    c = torch.cat([k.c.detach().flatten() for k in kernels])
    skip = torch.cat([s.detach().flatten() for s in skips])
    assert c.numel() > 10000 and skip.numel() > 1000
    assert abs(c.var().item() - 0.5) < 0.03 and abs(c.mean().item()) < 0.02
    assert abs(skip.var().item() - 1.0) < 0.1 and abs(skip.mean().item()) < 0.1


# -- pinned parameter counts --------------------------------------------------------------------------------------
PAPER_COUNTS = {  # the exact counts at paper size today: a change to any layer's parameters shows up here
    ("sh", "s4d"): 196_478_976, ("sh", "unstructured"): 196_593_600, ("sh", "explicit"): 208_960_512,
    ("mh", "s4d"): 197_210_112, ("mh", "unstructured"): 197_991_360, ("mh", "explicit"): 297_062_400,
    ("mf", "s4d"): 199_913_472, ("mf", "unstructured"): 202_980_288, ("mf", "explicit"): 599_322_624,
}
PAPER_BASELINE_COUNTS = {"slide": 190_080_000, "brect": 196_373_504, "gss-hybrid": 202_677_248}


def test_paper_size_parameter_counts_are_pinned():
    got = {(v, k): count_model_parameters(f"bst-{v}-{k.replace('s4d', 's4')}", "paper") for v, k in PAPER_COUNTS}
    assert got == PAPER_COUNTS
    assert {name: count_model_parameters(name, "paper") for name in PAPER_BASELINE_COUNTS} == PAPER_BASELINE_COUNTS
