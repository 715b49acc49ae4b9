"""``s4d_chunked_conv`` (SH's S4D convolution through its state, chunk by chunk) and ``s4d_chunked_bank`` (MH's C
filters per channel) against their oracles: the FFT convolution with the generated kernel, and the direct
convolution with the kernel of the unrolled recurrence."""

import pytest
import torch

from blockstate.ops import (
    causal_conv_reference,
    fft_causal_conv,
    s4d_block_ends,
    s4d_chunk_size,
    s4d_chunked_bank,
    s4d_chunked_conv,
    s4d_init,
    s4d_kernel,
    s4d_kernel_reference,
)
from blockstate.ops.s4d_chunked import _ChunkScan, _log_depth_scan


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


@pytest.mark.parametrize("chunks", [1, 2, 7, 8, 33])
def test_log_depth_scan_equals_the_chunk_scan(chunks):
    """The scan a compiled graph takes (log2(n) steps) against the eager one, values and gradients."""
    g = torch.Generator().manual_seed(chunks)
    local = torch.randn(2, 3, chunks, 4, dtype=torch.complex128, generator=g).requires_grad_()
    decay = (0.9 * torch.exp(1j * torch.randn(3, 1, 4, dtype=torch.float64, generator=g))).requires_grad_()
    eager, fast = _ChunkScan.apply(local, decay), _log_depth_scan(local, decay)
    torch.testing.assert_close(fast, eager)
    w = torch.randn(eager.shape, dtype=torch.complex128, generator=g)
    want = torch.autograd.grad((eager * w).real.sum(), [local, decay])
    got = torch.autograd.grad((fast * w).real.sum(), [local, decay], materialize_grads=True)  # 1 chunk: no decay
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_compiled_chunked_conv_takes_the_log_depth_scan():
    """Under torch.compile (one graph) the chunked conv and MF's block ends equal their eager values."""
    p = s4d_init(6, 16, generator=torch.Generator().manual_seed(3))
    u = torch.randn(2, 96, 6, generator=torch.Generator().manual_seed(4))  # (B, L, h): 12 chunks of 8
    conv = torch.compile(s4d_chunked_conv, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(conv(**p, u=u, chunk=8), s4d_chunked_conv(**p, u=u, chunk=8))
    u = u[..., :3].transpose(1, 2)  # (B, D, L): 3 channels x 2 filters, 6 blocks of 16
    ends = torch.compile(s4d_block_ends, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(ends(**p, u=u, block=16), s4d_block_ends(**p, u=u, block=16))


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


# -- the filter bank (MH): C filters per channel, one shared input ---------------------------------------------
def _bank_oracle(p, u, filters, skip, exact=False):
    """(C, B, L, D) from the FFT convolution (or, ``exact``, the direct one) of each filter with its channel."""
    bsz, length, dim = u.shape
    x = u.transpose(1, 2).repeat_interleave(filters, dim=1)  # filter f of channel d reads channel d
    if exact:
        y = causal_conv_reference(x.double(), s4d_kernel_reference(*_args(p), length).double(),
                                  None if skip is None else skip.double())
    else:
        y = fft_causal_conv(x, s4d_kernel(*_args(p), length), skip)
    return y.view(bsz, dim, filters, length).permute(2, 0, 3, 1)


@pytest.mark.parametrize("bsz,length,filters,chunk", [(1, 1, 2, None), (2, 7, 3, 16), (1, 64, 4, 16),
                                                      (3, 100, 2, 16), (2, 300, 5, 32), (1, 1000, 16, None)])
@pytest.mark.parametrize("skip", [False, True])
def test_bank_equals_the_convolution_of_every_filter(bsz, length, filters, chunk, skip):
    dim = 3
    p = _params(dim * filters, seed=2)
    u = torch.randn(bsz, length, dim, generator=torch.Generator().manual_seed(3))
    d = torch.randn(dim * filters) if skip else None
    y = s4d_chunked_bank(*_args(p), u, filters, d, chunk=chunk)
    assert y.shape == (filters, bsz, length, dim) and y.dtype == torch.float32 and y.is_contiguous()
    exact = _bank_oracle(p, u, filters, d, exact=True)
    scale = exact.abs().max()
    assert (y.double() - exact).abs().max() <= 2e-5 * scale + 1e-6
    torch.testing.assert_close(y, _bank_oracle(p, u, filters, d), rtol=0, atol=float(2e-5 * scale + 1e-6))
    # and filter by filter, the single-filter fast path on the same channel
    per = p["log_dt"].view(dim, filters)
    f = filters - 1
    rows = torch.arange(dim) * filters + f
    one = s4d_chunked_conv(per[:, f], p["log_a_real"][rows], p["a_imag"][rows], p["c"][rows], u,
                           None if d is None else d[rows], chunk=chunk)
    torch.testing.assert_close(y[f], one, rtol=0, atol=float(2e-5 * scale + 1e-6))


def test_bank_is_causal_and_reaches_far_back():
    p, d = _params(2 * 4, seed=4), torch.randn(8)
    p["log_a_real"][:4].fill_(-9.0)  # slow modes for channel 0's filters: they carry across many chunks
    u = torch.randn(1, 512, 2)
    y = s4d_chunked_bank(*_args(p), u, 4, d, chunk=16)
    for t in (5, 16, 40, 300, 511):
        v = u.clone()
        v[:, t:] += torch.randn_like(v[:, t:])
        z = s4d_chunked_bank(*_args(p), v, 4, d, chunk=16)
        assert torch.equal(z[:, :, :t], y[:, :, :t])
        assert not torch.equal(z[:, :, t], y[:, :, t])
    v = u.clone()
    v[:, 3, 0] += 1.0  # an input in the first chunk moves channel 0's outputs 30 chunks on, in every filter
    z = s4d_chunked_bank(*_args(p), v, 4, d, chunk=16)
    assert (z - y)[:, 0, 500, 0].abs().min() > 1e-4
    assert torch.equal(z[..., 1], y[..., 1])  # and no other channel's


def test_bank_gradients_equal_the_fft_path():
    torch.manual_seed(0)
    dim, filters, length = 4, 3, 300
    base = _params(dim * filters)
    u0, d0 = torch.randn(2, length, dim), torch.randn(dim * filters)
    g = torch.randn(filters, 2, length, dim)
    grads = []
    for chunked in (True, False):
        p = {k: v.clone().requires_grad_() for k, v in base.items()}
        u, d = u0.clone().requires_grad_(), d0.clone().requires_grad_()
        y = s4d_chunked_bank(*_args(p), u, filters, d, chunk=32) if chunked else _bank_oracle(p, u, filters, d)
        (y * g).sum().backward()
        grads.append([u.grad, d.grad, *(p[k].grad for k in ("log_dt", "log_a_real", "a_imag", "c"))])
    for fast, oracle in zip(*grads):
        assert fast is not None and fast.abs().sum() > 0
        assert (fast - oracle).norm() <= 1e-4 * oracle.norm()
