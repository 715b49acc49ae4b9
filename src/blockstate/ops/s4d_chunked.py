"""S4D's convolution through its state, chunk by chunk: the fast path of the SH layer's SSM (issue 16), and
of MH's bank of filters per channel (``s4d_chunked_bank``), and MF's outputs at block ends only
(``s4d_block_ends``).

``s4d_chunked_conv`` equals ``fft_causal_conv(u, s4d_kernel(...))`` (its oracle, with ``causal_conv_reference``
behind that) up to fp32 rounding; both sit within the same distance of the exact kernel's convolution. Where
the FFT path makes three FFTs of 2L points per channel, this one makes three batched matmuls per channel over
chunks of T tokens and a scan over the L / T chunk states: linear in L and at matmul speed (1.8-4.2x faster
forward and backward on CPU at D = 256-512, 1k-16k tokens). It applies where the state is small (S4D's N = 16
here); GSS's DSS kernel with 512 states keeps the FFT.
"""

from __future__ import annotations

import math
from typing import NamedTuple

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


class _FiltersFirst(torch.autograd.Function):
    """C tensors (B, D, n, T) (filter f's output, channel-major, in chunks) -> (C, B, L, D), the first L tokens,
    as one 2-D transpose per (filter, row); the gradient goes back the same way."""

    @staticmethod
    def forward(ctx, length: int, *ys: torch.Tensor) -> torch.Tensor:
        bsz, dim, n, size = ys[0].shape
        ctx.chunks = (n, size)
        out = ys[0].new_empty(len(ys), bsz, length, dim)
        for f, y in enumerate(ys):
            for b in range(bsz):
                out[f, b].copy_(y[b].view(dim, n * size)[:, :length].t())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        filters, bsz, length, dim = grad.shape
        n, size = ctx.chunks
        grads = []
        for f in range(filters):
            g = grad.new_zeros(bsz, dim, n * size) if n * size > length else grad.new_empty(bsz, dim, length)
            for b in range(bsz):
                g[b, :, :length].copy_(grad[f, b].t())
            grads.append(g.view(bsz, dim, n, size))
        return (None, *grads)


def _rows_bmm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(B, h, r, k) @ (h, k, c) -> (B, h, r, c): one bmm per row (a broadcast matmul would copy w B times)."""
    if x.shape[0] == 1:
        return torch.bmm(x.view(x.shape[1:]), w).unsqueeze(0)
    return torch.stack([torch.bmm(row, w) for row in x.unbind(0)])


def _rows_baddbmm(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y + x @ w per row, as ``_rows_bmm``: (B, h, r, c) + (B, h, r, k) @ (h, k, c)."""
    if x.shape[0] == 1:
        return torch.baddbmm(y.view(y.shape[1:]), x.view(x.shape[1:]), w).unsqueeze(0)
    return torch.stack([torch.baddbmm(out, row, w) for out, row in zip(y.unbind(0), x.unbind(0))])


def _scan_in_place(x: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """x_j += decay x_(j-1) along dim 2, one chunk after another, in place: n - 1 fused multiply-adds over one
    chunk's states each, in cache. A log-depth (Hillis-Steele) scan made log2(n) passes over all the states; for
    MH's bank (16x SH's states) those passes went to memory, and for SH it was no faster (1 thread, 4k-64k)."""
    for j in range(1, x.shape[2]):
        x[:, :, j : j + 1].addcmul_(decay, x[:, :, j - 1 : j])
    return x


class _ChunkScan(torch.autograd.Function):
    """x_j = decay x_(j-1) + local_j over chunks (dim 2), complex, from x_(-1) = 0; ``decay`` broadcasts
    against one chunk's slice, (h, 1, m). Autograd through the slices would keep one graph node per chunk; the
    gradient is itself a scan, run backwards with conj(decay): G_j = g_j + conj(decay) G_(j+1), grad local = G,
    grad decay = sum_j G_j conj(x_(j-1))."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
        x = _scan_in_place(local.clone(), decay)
        ctx.save_for_backward(x, decay)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, decay = ctx.saved_tensors
        g, back = grad.clone(memory_format=torch.contiguous_format), decay.conj()
        want = ctx.needs_input_grad[1]
        acc = torch.zeros_like(g[:, :, :1]) if want else None
        for j in range(g.shape[2] - 2, -1, -1):  # G_j = g_j + conj(decay) G_(j+1), in place, last chunk first
            g[:, :, j : j + 1].addcmul_(back, g[:, :, j + 1 : j + 2])
            if want:  # grad decay gathers G_(j+1) conj(x_j) while both are in cache
                acc.addcmul_(g[:, :, j + 1 : j + 2], x[:, :, j : j + 1].conj())
        return g, (acc.sum(0) if want else None)


def _log_depth_scan(local: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """``_ChunkScan``'s result in log2(n) whole-tensor steps of plain autograd ops (Hillis-Steele; the decay is
    the same for every chunk, so step k adds decay^k x_(j-k)): the path under ``torch.compile``."""
    x, power, k = local, decay, 1
    while k < x.shape[2]:
        x = torch.cat([x[:, :, :k], x[:, :, k:] + power * x[:, :, :-k]], dim=2)
        power, k = power * power, 2 * k
    return x


def _chunk_scan(local: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """The chunk scan: eagerly ``_ChunkScan`` (n - 1 in-place steps, in cache). Traced by ``torch.compile`` its
    loops would unroll into n - 1 steps forward and backward (compiling one SH layer at 2k tokens took 111 s
    against 71 s at 512), so a compiled graph takes the log-depth scan instead: one graph, log2(n) steps."""
    if torch.compiler.is_compiling():
        return _log_depth_scan(local, decay)
    return _ChunkScan.apply(local, decay)


def s4d_chunk_size(length: int) -> int:
    """T for ``s4d_chunked_conv``: about sqrt(L) / 2 as a power of two in [16, 64] (measured on CPU, D = 256 and
    512, 512-16k tokens: the T x T Toeplitz per channel must stay small next to the input, the scan over L / T
    chunks short)."""
    return max(16, min(64, 1 << max(0, (math.isqrt(length) // 2).bit_length() - 1)))


class _ChunkWeights(NamedTuple):
    """What one chunk of T tokens does, per SSM (h of them, m modes): ``toeplitz`` (h, T, T), input s to output t
    (tap t - s, skip included); ``to_end`` (h, T, 2m), input s to the chunk's end state as (re, im) pairs;
    ``decay`` (h, 1, m) complex, Abar^T; ``response`` (h, 2m, T), the start state's (re, im) pairs to output t."""

    toeplitz: torch.Tensor
    to_end: torch.Tensor
    decay: torch.Tensor
    response: torch.Tensor


def _chunk_weights(log_dt: torch.Tensor, log_a_real: torch.Tensor, a_imag: torch.Tensor, c: torch.Tensor,
                   skip: torch.Tensor | None, size: int) -> _ChunkWeights:
    h = log_dt.shape[0]
    dta_re, dta_im = _dta(log_dt, log_a_real, a_imag)
    bb_re, bb_im = _bbar(dta_re, dta_im, log_dt)
    c_re, c_im = c[..., 0].float(), c[..., 1].float()
    taps = s4d_vandermonde(c_re * bb_re - c_im * bb_im, c_re * bb_im + c_im * bb_re, dta_re, dta_im, size)
    if skip is not None:  # skip * u is tap 0 of the convolution
        taps = taps + F.pad(skip.float().reshape(h, 1), (0, size - 1))
    # Toeplitz (h, s, t) = taps[t - s], 0 for t < s: windows of the left-padded taps, rows reversed
    toeplitz = F.pad(taps, (size - 1, 0)).unfold(-1, size, 1).flip(1)
    t = torch.arange(size, device=log_dt.device)
    mag, ang = (dta_re.unsqueeze(-1) * t).exp(), dta_im.unsqueeze(-1) * t  # Abar^t, (h, m, T)
    p_re, p_im = mag * ang.cos(), mag * ang.sin()
    # input s reaches the chunk's end state with Bbar Abar^(T-1-s): (h, m, s, 2), s reversed
    to_end = torch.stack([bb_re.unsqueeze(-1) * p_re - bb_im.unsqueeze(-1) * p_im,
                          bb_re.unsqueeze(-1) * p_im + bb_im.unsqueeze(-1) * p_re], dim=-1).flip(2)
    decay = torch.complex(dta_re * size, dta_im * size).exp().unsqueeze(1)  # Abar^T, (h, 1, m)
    # the state a chunk starts from reaches its output t with 2 C Abar^(t+1): Re(w x) = w_re x_re - w_im x_im
    a_re, a_im = dta_re.exp() * dta_im.cos(), dta_re.exp() * dta_im.sin()
    w_re, w_im = c_re * a_re - c_im * a_im, c_re * a_im + c_im * a_re  # C Abar
    response = torch.stack([w_re.unsqueeze(-1) * p_re - w_im.unsqueeze(-1) * p_im,
                            -(w_re.unsqueeze(-1) * p_im + w_im.unsqueeze(-1) * p_re)], dim=2)  # (h, m, 2, T)
    return _ChunkWeights(toeplitz, to_end.transpose(1, 2).flatten(2), decay, 2 * response.flatten(1, 2))


def _start_states(ends: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """(B, h, n, 2m) each chunk's end state from zero, (re, im) pairs -> the state each chunk starts from, same
    layout: x_j = sum_(i <= j) Abar^(T (j - i)) local_i, shifted one chunk, x_(-1) = 0."""
    bsz, h, n, pairs = ends.shape
    local = _chunk_scan(torch.view_as_complex(ends.view(bsz, h, n, pairs // 2, 2)), decay)
    return F.pad(torch.view_as_real(local[:, :, :-1]).flatten(3), (0, 0, 1, 0))


def _chunked_input(u: torch.Tensor, size: int) -> torch.Tensor:
    """u (B, L, h) -> (B, h, n, T) fp32, channel-major, zero-padded to whole chunks (zeros after the end change
    nothing before it)."""
    bsz, length, h = u.shape
    n = -(-length // size)
    x = u.float()
    if n * size > length:
        x = F.pad(x, (0, 0, 0, n * size - length))
    return _Transposed.apply(x).view(bsz, h, n, size)


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
        size = min(chunk or s4d_chunk_size(length), length)
        w = _chunk_weights(log_dt, log_a_real, a_imag, c, skip, size)
        x = _chunked_input(u, size)
        own = _rows_bmm(x, w.toeplitz)  # (B, h, n, T): each chunk's outputs from its own inputs
        start = _start_states(_rows_bmm(x, w.to_end), w.decay)  # (B, h, n, 2m)
        y = (own + _rows_bmm(start, w.response)).view(bsz, h, -1)
        return _Transposed.apply(y[..., :length].contiguous() if y.shape[-1] > length else y)


def s4d_chunked_bank(
    log_dt: torch.Tensor, log_a_real: torch.Tensor, a_imag: torch.Tensor, c: torch.Tensor, u: torch.Tensor,
    filters: int, skip: torch.Tensor | None = None, chunk: int | None = None,
) -> torch.Tensor:
    """``filters`` = C S4D kernels per channel of u (B, L, D), all reading that channel (SSM d * C + f is filter
    f of channel d, ``skip`` (D * C,)) -> (C, B, L, D) fp32, the layout MH's heads read: equal to
    ``s4d_chunked_conv`` of u repeated C times per channel, rearranged, without repeating u.

    Per channel, the C filters' Toeplitz and chunk-end weights sit side by side, so one matmul over the shared
    input chunks makes all C outputs (and a gradient summed over the filters). The chunk-end states are scanned
    in the (B, D, n, C * m) layout that matmul makes; each filter's start-state response and own-chunk product
    then make its (B, D, n, T) output, and per-row 2-D transposes take those to (C, B, L, D).
    ``chunk`` defaults to ``s4d_chunk_size(L)``.
    """
    with torch.autocast(device_type=u.device.type, enabled=False):
        bsz, length, dim = u.shape
        size = min(chunk or s4d_chunk_size(length), length)
        w = _chunk_weights(log_dt, log_a_real, a_imag, c, skip, size)
        x = _chunked_input(u, size)  # (B, D, n, T)
        n, pairs = x.shape[2], w.to_end.shape[-1]

        def side_by_side(weight: torch.Tensor) -> torch.Tensor:  # (D * C, T, k) -> (D, T, C * k)
            return weight.view(dim, filters, size, -1).transpose(1, 2).flatten(2)

        ends = _rows_bmm(x, side_by_side(w.to_end))  # (B, D, n, C * 2m): every filter's chunk-end state
        decay = w.decay.view(dim, 1, -1)  # (D, 1, C * m)
        local = torch.view_as_complex(ends.view(bsz, dim, n, decay.shape[-1], 2))
        start = F.pad(torch.view_as_real(_chunk_scan(local, decay)[:, :, :-1]).flatten(3), (0, 0, 1, 0))
        # unbind, not indexing: one gradient for all the filters, not a zero-filled full-size one per filter
        starts = start.view(bsz, dim, n, filters, pairs).unbind(3)
        toeplitz = w.toeplitz.view(dim, filters, size, size).unbind(1)
        response = w.response.view(dim, filters, pairs, size).unbind(1)
        ys = [_rows_baddbmm(_rows_bmm(s, r), x, t) for s, r, t in zip(starts, response, toeplitz)]
        return _FiltersFirst.apply(length, *ys)


def s4d_block_ends(
    log_dt: torch.Tensor, log_a_real: torch.Tensor, a_imag: torch.Tensor, c: torch.Tensor, u: torch.Tensor,
    block: int,
) -> torch.Tensor:
    """The convolution's output (without the skip term) at the last position of every block, computed through
    the state instead of the whole output: u (B, D, n * block) with ``h = D * F`` SSMs (F filters per channel,
    filter f of channel d at index d * F + f) -> (B, D, F, n).

    BST:MF keeps only these n outputs of its F filters. The FFT path would make (B, D, F, L) outputs (F = 32 in the
    paper) to throw all but 1/W of them away; here each block's input moves the state through one real matmul over
    the block (x_k = Abar^W x_(k-1) + sum_i Abar^(W-1-i) Bbar u_(kW+i)), about the cost of one D x D projection,
    then a scan over the n blocks (``_ChunkScan``, as for the chunk states of ``s4d_chunked_conv``). Equal to
    ``fft_causal_conv(u, s4d_kernel(...))[..., block-1::block]``.
    """
    with torch.autocast(device_type=log_dt.device.type, enabled=False):
        bsz, channels, total = u.shape
        n = total // block
        h, m = log_a_real.shape
        filters = h // channels
        dta_re, dta_im = _dta(log_dt, log_a_real, a_imag)
        bb_re, bb_im = _bbar(dta_re, dta_im, log_dt)
        # weights Bbar Abar^lag for lag = W-1-i of input i, laid out (D, lag, F, m): with lag = q c + r only
        # (h, m, W/c + c) exponentials, then one broadcast complex product (the costly part at short L)
        c_lo = 1 << max(0, (math.isqrt(block) - 1).bit_length())
        c_hi = -(-block // c_lo)

        def powers(lags: torch.Tensor) -> torch.Tensor:  # (h, m) -> (D, len(lags), F, m)
            mag, ang = (dta_re.unsqueeze(-1) * lags).exp(), dta_im.unsqueeze(-1) * lags
            z = torch.complex(mag * ang.cos(), mag * ang.sin())
            return z.view(channels, filters, m, -1).permute(0, 3, 1, 2).contiguous()  # so the product is too

        arange = torch.arange(max(c_lo, c_hi), device=u.device, dtype=torch.float32)
        bbar = torch.complex(bb_re, bb_im).view(channels, 1, filters, m)
        hi, lo = powers(arange[:c_hi] * c_lo) * bbar, powers(arange[:c_lo])
        weights = (hi.unsqueeze(2) * lo.unsqueeze(1)).flatten(1, 2)[:, :block]  # (D, W, F, m) complex
        weights = torch.view_as_real(weights).flatten(2)  # (D, W, F*m*2)
        # input i meets lag W-1-i: reverse each block's inputs (cheap) rather than the weights
        blocks = u[..., : n * block].float().reshape(bsz, channels, n, block).flip(-1).transpose(0, 1).flatten(1, 2)
        local = torch.bmm(blocks, weights).view(channels, bsz, n, filters * m, 2)  # (D, B*n, W) @ (D, W, F*m*2)
        local = torch.view_as_complex(local).transpose(0, 1)  # (B, D, n, F*m), stored (D, B, n, F*m)
        decay = torch.complex(dta_re * block, dta_im * block).exp().view(channels, 1, filters * m)  # Abar^W
        # x_k = Abar^W x_(k-1) + local_k, the hand-written scan: a loop of ``state = decay * state + local[:, :, k]``
        # under autograd made a zero-filled gradient of all of ``local`` per block (quadratic in L)
        states = _chunk_scan(local, decay).view(bsz, channels, n, filters, m)
        cc = 2 * torch.view_as_complex(c.float().contiguous()).view(channels, 1, filters, m)
        return (states * cc).real.sum(-1).transpose(2, 3)  # y = 2 Re(C x) at each block's end: (B, D, F, n)
