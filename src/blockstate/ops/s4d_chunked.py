"""S4D's convolution through its state, chunk by chunk: the fast path of the SH layer's SSM (issue 16).

``s4d_chunked_conv`` equals ``fft_causal_conv(u, s4d_kernel(...))`` (its oracle, with ``causal_conv_reference``
behind that) up to fp32 rounding; both sit within the same distance of the exact kernel's convolution. Where
the FFT path makes three FFTs of 2L points per channel, this one makes three batched matmuls per channel over
chunks of T tokens and a scan over the L / T chunk states: linear in L and at matmul speed (1.8-4.2x faster
forward and backward on CPU at D = 256-512, 1k-16k tokens). It applies where the state is small (S4D's N = 16
here); GSS's DSS kernel with 512 states keeps the FFT.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from blockstate.ops.s4d import _bbar, _dta, s4d_vandermonde


class _Transposed(torch.autograd.Function):
    """(B, L, h) <-> (B, h, L) as one 2-D transpose per row, which torch copies in cache-sized tiles (a batched
    transposed copy is not tiled: 2.3-4x slower here), with a contiguous gradient made the same way: CPU bmm
    copies every matrix of a batch on its own when an operand has no unit stride."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _transposed(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _transposed(grad.contiguous())


def _transposed(x: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(x.shape[0], x.shape[2], x.shape[1])
    for b in range(x.shape[0]):
        out[b].copy_(x[b].t())
    return out


def _rows_bmm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(B, h, r, k) @ (h, k, c) -> (B, h, r, c): one bmm per row (a broadcast matmul would copy w B times)."""
    if x.shape[0] == 1:
        return torch.bmm(x.view(x.shape[1:]), w).unsqueeze(0)
    return torch.stack([torch.bmm(row, w) for row in x.unbind(0)])


def _scan_in_place(x: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """x_j += sum_(i < j) decay^(j - i) x_i along dim 2, in log2(n) passes (Hillis-Steele), in place."""
    step, n = 1, x.shape[2]
    while step < n:
        x[:, :, step:] += decay * x[:, :, :-step]  # the product is made from the old values before the add
        decay, step = decay * decay, 2 * step
    return x


class _ChunkScan(torch.autograd.Function):
    """x_j = decay x_(j-1) + local_j over chunks (dim 2), complex, from x_(-1) = 0. Autograd through a
    log-depth scan of slices and concatenations made a zero-filled copy per pass each way (a third of the
    convolution's backward); the gradient is itself a scan, run backwards with conj(decay):
    G_j = g_j + conj(decay) G_(j+1), grad local = G, grad decay = sum_j G_j conj(x_(j-1))."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
        x = _scan_in_place(local.clone(), decay)
        ctx.save_for_backward(x, decay)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, decay = ctx.saved_tensors
        g = _scan_in_place(grad.flip(2).contiguous(), decay.conj()).flip(2)
        grad_decay = None
        if ctx.needs_input_grad[1]:
            grad_decay = (g[:, :, 1:] * x[:, :, :-1].conj()).sum(0).sum(1, keepdim=True)  # decay is (h, 1, m)
        return g, grad_decay


def s4d_chunk_size(length: int) -> int:
    """T for ``s4d_chunked_conv``: about sqrt(L) / 2 as a power of two in [16, 64] (measured on CPU, D = 256 and
    512, 512-16k tokens: the T x T Toeplitz per channel must stay small next to the input, the scan over L / T
    chunks short)."""
    return max(16, min(64, 1 << max(0, (math.isqrt(length) // 2).bit_length() - 1)))


def s4d_chunked_conv(
    log_dt: torch.Tensor, log_a_real: torch.Tensor, a_imag: torch.Tensor, c: torch.Tensor, u: torch.Tensor,
    skip: torch.Tensor | None = None, chunk: int | None = None,
) -> torch.Tensor:
    """The causal convolution of u (B, L, h) with the S4D kernel of each of its h channels, plus ``skip * u``,
    in the token-major layout and fp32: equal to ``fft_causal_conv(u.transpose(1, 2), s4d_kernel(..., L),
    skip).transpose(1, 2)``, computed through the state chunk by chunk instead of by FFT.

    With chunks of T tokens, the output at position t of chunk j is the chunk's own inputs convolved with the
    first T kernel taps (a T x T Toeplitz matrix per channel) plus the response to the state the chunk starts
    from, 2 Re(C Abar^(t+1) x_(j-1)). The states at chunk ends come from one weight matrix per channel
    (input s reaches the end with Bbar Abar^(T-1-s)) and a log-depth scan over chunks, x_j = Abar^T x_(j-1) +
    local_j. Batched matmuls over the channels do the work, 2 (T + 4m) multiply-adds per token and channel
    (m = N/2 modes), linear in L, where three FFTs of 2L points grow with log L and, on CPU, run far below
    matmul speed. Only T kernel taps are generated, not L. ``chunk`` defaults to ``s4d_chunk_size(L)``.
    """
    with torch.autocast(device_type=u.device.type, enabled=False):
        bsz, length, h = u.shape
        m = log_a_real.shape[-1]
        size = min(chunk or s4d_chunk_size(length), length)
        n = -(-length // size)
        dta_re, dta_im = _dta(log_dt, log_a_real, a_imag)
        bb_re, bb_im = _bbar(dta_re, dta_im, log_dt)
        c_re, c_im = c[..., 0].float(), c[..., 1].float()
        taps = s4d_vandermonde(c_re * bb_re - c_im * bb_im, c_re * bb_im + c_im * bb_re, dta_re, dta_im, size)
        if skip is not None:  # skip * u is tap 0 of the convolution
            taps = taps + F.pad(skip.float().reshape(h, 1), (0, size - 1))
        # Toeplitz (h, s, t) = taps[t - s], 0 for t < s: windows of the left-padded taps, rows reversed
        toeplitz = F.pad(taps, (size - 1, 0)).unfold(-1, size, 1).flip(1)
        t = torch.arange(size, device=u.device)
        mag, ang = (dta_re.unsqueeze(-1) * t).exp(), dta_im.unsqueeze(-1) * t  # Abar^t, (h, m, T)
        p_re, p_im = mag * ang.cos(), mag * ang.sin()
        # input s reaches the chunk's end state with Bbar Abar^(T-1-s): (h, s, m, 2) as (re, im) pairs
        to_end = torch.stack([bb_re.unsqueeze(-1) * p_re - bb_im.unsqueeze(-1) * p_im,
                              bb_re.unsqueeze(-1) * p_im + bb_im.unsqueeze(-1) * p_re], dim=-1).flip(2)
        x = u.float()
        if n * size > length:  # zeros after the end change nothing before it
            x = F.pad(x, (0, 0, 0, n * size - length))
        x = _Transposed.apply(x).view(bsz, h, n, size)
        own = _rows_bmm(x, toeplitz)  # (B, h, n, T): each chunk's outputs from its own inputs
        ends = _rows_bmm(x, to_end.transpose(1, 2).flatten(2))  # (B, h, n, 2m): its end state from zero
        local = torch.view_as_complex(ends.view(bsz, h, n, m, 2))
        decay = torch.complex(dta_re * size, dta_im * size).exp().view(h, 1, m)  # Abar^T
        local = _ChunkScan.apply(local, decay)  # x_j = sum_(i <= j) Abar^(T (j - i)) local_i
        start = F.pad(torch.view_as_real(local[:, :, :-1]).flatten(3), (0, 0, 1, 0))  # x_(j-1), x_(-1) = 0
        # the state a chunk starts from reaches its output t with 2 C Abar^(t+1): Re(w x) = w_re x_re - w_im x_im
        a_re, a_im = dta_re.exp() * dta_im.cos(), dta_re.exp() * dta_im.sin()
        w_re, w_im = c_re * a_re - c_im * a_im, c_re * a_im + c_im * a_re  # C Abar
        resp = torch.stack([w_re.unsqueeze(-1) * p_re - w_im.unsqueeze(-1) * p_im,
                            -(w_re.unsqueeze(-1) * p_im + w_im.unsqueeze(-1) * p_re)], dim=2)  # (h, m, 2, T)
        y = own + _rows_bmm(start, 2 * resp.flatten(1, 2))
        y = y.view(bsz, h, n * size)
        return _Transposed.apply(y[..., :length].contiguous() if n * size > length else y)
