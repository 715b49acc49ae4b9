"""``s4d_chunked_conv`` (SH's S4D convolution through its state, chunk by chunk) against its oracles: the FFT
convolution with the generated kernel, and the direct convolution with the kernel of the unrolled recurrence."""

import pytest
import torch

from blockstate.ops import (
    causal_conv_reference,
    fft_causal_conv,
    s4d_chunk_size,
    s4d_chunked_conv,
    s4d_init,
    s4d_kernel,
    s4d_kernel_reference,
)
from blockstate.ops.s4d_chunked import _ChunkScan


def _params(h: int, state_size: int = 16, init: str = "lin", seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = s4d_init(h, state_size, init, generator=g)
    # spread Re(A) over four decades so that some modes remember far beyond a chunk (the scan carries them)
    p["log_a_real"] = p["log_a_real"] + 4 * torch.rand(p["log_a_real"].shape, generator=g) - 3
    return p


def _args(p):
    return p["log_dt"], p["log_a_real"], p["a_imag"], p["c"]


@pytest.mark.parametrize("bsz,length,chunk", [(1, 1, None), (2, 7, 16), (1, 64, 16), (3, 100, 16), (2, 300, 32),
                                              (1, 1000, None), (2, 513, 64)])
@pytest.mark.parametrize("skip", [False, True])
def test_chunked_conv_equals_the_convolution_with_the_exact_kernel(bsz, length, chunk, skip):
    h = 6
    p = _params(h)
    u = torch.randn(bsz, length, h, generator=torch.Generator().manual_seed(1))
    d = torch.randn(h) if skip else None
    exact = causal_conv_reference(u.transpose(1, 2).double(), s4d_kernel_reference(*_args(p), length).double(),
                                  None if d is None else d.double()).transpose(1, 2)
    fft = fft_causal_conv(u.transpose(1, 2), s4d_kernel(*_args(p), length), d).transpose(1, 2)
    y = s4d_chunked_conv(*_args(p), u, d, chunk=chunk)
    assert y.shape == (bsz, length, h) and y.dtype == torch.float32 and y.is_contiguous()
    scale = exact.abs().max()
    # both fast paths sit within fp32 rounding of the exact result, and of each other
    assert (y.double() - exact).abs().max() <= 2e-5 * scale + 1e-6
    torch.testing.assert_close(y, fft, rtol=0, atol=float(2e-5 * scale + 1e-6))


@pytest.mark.parametrize("init,state_size", [("lin", 16), ("inv", 64), ("lin", 2)])
def test_chunked_conv_for_other_state_sizes(init, state_size):
    p = _params(5, state_size, init)
    u = torch.randn(2, 200, 5)
    fft = fft_causal_conv(u.transpose(1, 2), s4d_kernel(*_args(p), 200)).transpose(1, 2)
    torch.testing.assert_close(s4d_chunked_conv(*_args(p), u, chunk=16), fft, rtol=1e-4, atol=1e-4)


def test_chunked_conv_is_causal():
    """Changing inputs from position t on leaves every output before t bit-identical (in and across chunks)."""
    p, d = _params(4), torch.randn(4)
    u = torch.randn(1, 96, 4)
    y = s4d_chunked_conv(*_args(p), u, d, chunk=16)
    for t in (5, 16, 40, 95):
        v = u.clone()
        v[:, t:] += torch.randn_like(v[:, t:])
        z = s4d_chunked_conv(*_args(p), v, d, chunk=16)
        assert torch.equal(z[:, :t], y[:, :t])
        assert not torch.equal(z[:, t], y[:, t])


def test_chunked_conv_reaches_far_back():
    """An input in the first chunk still moves outputs 30 chunks later through the scanned states."""
    p = _params(3)
    p["log_a_real"].fill_(-9.0)  # Re(A) = -1.2e-4: a slow mode
    u = torch.zeros(1, 512, 3)
    u[0, 3] = 1.0
    y = s4d_chunked_conv(*_args(p), u, chunk=16)
    k = s4d_kernel_reference(*_args(p), 512)  # the impulse response
    torch.testing.assert_close(y[0, 3:, :].T, k[:, :509], rtol=1e-4, atol=1e-5)
    assert y[0, 500].abs().min() > 1e-3


def test_chunked_conv_gradients_equal_the_fft_path():
    torch.manual_seed(0)
    base = _params(8)
    u0, d0, g = torch.randn(2, 300, 8), torch.randn(8), torch.randn(2, 300, 8)
    grads = []
    for chunked in (True, False):
        p = {k: v.clone().requires_grad_() for k, v in base.items()}
        u, d = u0.clone().requires_grad_(), d0.clone().requires_grad_()
        if chunked:
            y = s4d_chunked_conv(*_args(p), u, d, chunk=32)
        else:
            y = fft_causal_conv(u.transpose(1, 2), s4d_kernel(*_args(p), 300), d).transpose(1, 2)
        (y * g).sum().backward()
        grads.append([u.grad, d.grad, *(p[k].grad for k in ("log_dt", "log_a_real", "a_imag", "c"))])
    for fast, oracle in zip(*grads):
        assert fast is not None and fast.abs().sum() > 0
        assert (fast - oracle).norm() <= 1e-4 * oracle.norm()


def test_chunk_scan_gradient():
    """The scan's hand-written backward (a reverse scan with conj(decay)) against finite differences."""
    g = torch.Generator().manual_seed(0)
    local = torch.randn(2, 3, 9, 4, dtype=torch.complex128, generator=g).requires_grad_()
    decay = (0.95 * torch.exp(1j * torch.randn(3, 1, 4, dtype=torch.float64, generator=g))).requires_grad_()
    assert torch.autograd.gradcheck(_ChunkScan.apply, (local, decay))
    x, state = [], torch.zeros_like(local[:, :, 0])
    for j in range(9):  # the recurrence it stands for
        state = decay[:, 0] * state + local[:, :, j]
        x.append(state)
    torch.testing.assert_close(_ChunkScan.apply(local, decay), torch.stack(x, 2))


def test_chunk_size_grows_with_length():
    sizes = [s4d_chunk_size(n) for n in (1, 100, 1024, 2048, 4096, 8192, 16384, 1 << 20)]
    assert sizes == [16, 16, 16, 16, 32, 32, 64, 64]


def test_chunked_conv_stays_fp32_under_autocast():
    p = _params(4)
    u = torch.randn(1, 50, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = s4d_chunked_conv(*_args(p), u)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, s4d_chunked_conv(*_args(p), u.float()))
