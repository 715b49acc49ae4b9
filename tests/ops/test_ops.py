"""ops against their plain references."""

import pytest
import torch

from blockstate.ops import (
    causal_conv_reference,
    fft_causal_conv,
    fft_size,
    s4d_discretize,
    s4d_init,
    s4d_kernel,
    s4d_kernel_reference,
    s4d_step,
    squash_smooth,
)


@pytest.mark.parametrize("length", [1, 2, 7, 64, 127, 300, 1000])
@pytest.mark.parametrize("filters", [None, 3])
def test_fft_conv_equals_direct_convolution(length, filters):
    g = torch.Generator().manual_seed(length)
    u = torch.randn(2, 5, length, generator=g)
    k_shape = (5, length) if filters is None else (5, filters, length)
    k = torch.randn(*k_shape, generator=g) / length**0.5
    skip = torch.randn(*k_shape[:-1], generator=g)
    fast, ref = fft_causal_conv(u, k, skip), causal_conv_reference(u, k, skip)
    assert fast.shape == ref.shape
    assert torch.allclose(fast, ref, atol=2e-5, rtol=1e-5), (fast - ref).abs().max()


def test_fft_conv_pads_to_avoid_wraparound():
    assert all(fft_size(n) >= 2 * n for n in range(1, 3000))
    # a kernel tap at lag L-1 applied to an impulse at the end must not wrap into the start
    length = 50
    u = torch.zeros(1, 1, length)
    u[..., -1] = 1.0
    k = torch.zeros(1, length)
    k[:, -1] = 1.0
    assert fft_causal_conv(u, k).abs().max() < 1e-6


def test_fft_conv_shorter_kernel_is_zero_extended():
    u = torch.randn(1, 2, 40)
    k = torch.randn(2, 10)
    assert torch.allclose(fft_causal_conv(u, k), causal_conv_reference(u, k), atol=1e-5)


def test_fft_conv_stays_fp32_under_autocast():
    u, k = torch.randn(1, 4, 33), torch.randn(4, 33)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fft_causal_conv(u.bfloat16(), k)
    assert y.dtype == torch.float32
    assert torch.allclose(y, causal_conv_reference(u.bfloat16().float(), k), atol=1e-4)


@pytest.mark.parametrize("init", ["lin", "inv"])
@pytest.mark.parametrize("length", [1, 17, 256, 1000])
@pytest.mark.parametrize("state_size", [2, 16, 64])
def test_s4d_kernel_equals_unrolled_recurrence(init, length, state_size):
    p = s4d_init(6, state_size, init, generator=torch.Generator().manual_seed(1))
    fast, ref = s4d_kernel(**p, length=length), s4d_kernel_reference(**p, length=length)
    assert fast.shape == (6, length)
    scale = ref.abs().max()
    assert (fast - ref).abs().max() <= 2e-5 * max(1.0, scale)


def test_s4d_init_matches_s4d_definitions():
    lin = s4d_init(1, 8, "lin")
    assert torch.allclose(-lin["log_a_real"].exp(), torch.full((1, 4), -0.5))
    assert torch.allclose(lin["a_imag"][0], torch.pi * torch.arange(4.0))
    dt = s4d_init(1000, 16)["log_dt"].exp()
    assert dt.min() >= 1e-3 and dt.max() <= 1e-1
    with pytest.raises(ValueError, match="state_size"):
        s4d_init(1, 3)
    with pytest.raises(ValueError, match="init"):
        s4d_init(1, 4, "bogus")


def test_s4d_step_reproduces_convolution():
    p = s4d_init(3, 8, generator=torch.Generator().manual_seed(0))
    u = torch.randn(2, 3, 40)
    skip = torch.zeros(3)
    conv = fft_causal_conv(u, s4d_kernel(**p, length=40), skip)
    abar, bbar, c = s4d_discretize(**p)
    state = torch.zeros(2, 3, 4, dtype=torch.complex64)
    ys = []
    for t in range(40):
        state, y = s4d_step(state, u[..., t], abar, bbar, c)
        ys.append(y)
    assert torch.allclose(torch.stack(ys, -1), conv, atol=1e-5)


def test_s4d_update_in_place_equals_the_reference_step_eager_and_compiled():
    """``s4d_update_`` (in place; on (re, im) pairs under torch.compile) = ``s4d_step``'s state update."""
    from blockstate.ops import s4d_update_

    p = s4d_init(3, 8, generator=torch.Generator().manual_seed(1))
    abar, bbar, c = s4d_discretize(**p)
    start = torch.randn(2, 3, 4, dtype=torch.complex64)
    u = torch.randn(2, 3)
    expected, _ = s4d_step(start, u, abar, bbar, c)
    eager = start.clone()
    assert s4d_update_(eager, abar, bbar, u.unsqueeze(-1)) is eager
    assert torch.allclose(eager, expected, atol=1e-6)
    compiled = start.clone()
    torch.compile(s4d_update_, fullgraph=True, dynamic=False)(compiled, abar, bbar, u.unsqueeze(-1))
    assert torch.allclose(compiled, expected, atol=1e-6)


def test_squash_smooth():
    k = torch.tensor([[0.001, -0.5, 0.002, 1.0]])
    squashed = squash_smooth(k, squash=0.01)
    assert squashed[0, 0] == 0 and squashed[0, 2] == 0 and squashed[0, 3] == pytest.approx(0.99)
    smoothed = squash_smooth(torch.tensor([[0.0, 3.0, 0.0]]), smooth_width=3)
    assert torch.allclose(smoothed, torch.tensor([[1.5, 1.0, 1.5]]))


def test_s4d_final_state_and_state_response_continue_the_recurrence():
    """Split a stream at T: (final state after part 1) + (its response over part 2) + conv(part 2) == conv(all)."""
    from blockstate.ops import s4d_final_state, s4d_state_response

    p = s4d_init(4, 8, generator=torch.Generator().manual_seed(3))
    u = torch.randn(2, 4, 70)
    abar, bbar, c = s4d_discretize(**p)
    state = torch.zeros(2, 4, 4, dtype=torch.complex64)
    for t in range(45):
        state, _ = s4d_step(state, u[..., t], abar, bbar, c)
    fast = s4d_final_state(p["log_dt"], p["log_a_real"], p["a_imag"], u[..., :45], chunk=16)
    assert torch.allclose(fast, state, atol=1e-5)
    # from a non-zero start
    again = s4d_final_state(p["log_dt"], p["log_a_real"], p["a_imag"], u[..., 45:], x0=fast, chunk=7)
    for t in range(45, 70):
        state, _ = s4d_step(state, u[..., t], abar, bbar, c)
    assert torch.allclose(again, state, atol=1e-5)
    k = s4d_kernel(**p, length=70)
    whole = fft_causal_conv(u, k)
    tail = fft_causal_conv(u[..., 45:], k) + s4d_state_response(**p, x0=fast, length=25)
    assert torch.allclose(tail, whole[..., 45:], atol=1e-5)


@pytest.mark.parametrize("block,blocks,filters", [(1, 5, 2), (8, 6, 3), (16, 3, 1), (7, 9, 4)])
def test_s4d_block_ends_equal_the_convolution_at_block_ends(block, blocks, filters):
    """BST:MF's fast path (the state moved block by block) against the FFT convolution sampled at block ends,
    values and gradients."""
    from blockstate.ops import s4d_block_ends

    channels = 5
    p = s4d_init(channels * filters, 16, generator=torch.Generator().manual_seed(block))
    p = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    u = torch.randn(2, channels, blocks * block, requires_grad=True)
    k = s4d_kernel(**p, length=u.shape[-1]).view(channels, filters, -1)
    ref = fft_causal_conv(u, k)[..., block - 1 :: block]
    got = s4d_block_ends(**p, u=u, block=block)
    assert got.shape == (2, channels, filters, blocks)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4)
    w = torch.randn_like(ref)
    grads_ref = torch.autograd.grad((ref * w).sum(), [u, *p.values()])
    grads_got = torch.autograd.grad((got * w).sum(), [u, *p.values()])
    for a, b in zip(grads_got, grads_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)
