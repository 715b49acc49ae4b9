"""Causal depthwise long convolution: the FFT fast path and its direct O(L^2) reference.

Shapes (channels first, time last, so every FFT runs along the contiguous last axis):
    u    (B, H, L)       input, H channels
    k    (H, C, Lk)      C filters per channel (or (H, Lk) for one filter); only k[..., :L] is used
    skip (H, C) / (H,)   learned D term, ``y += skip * u``
    y    (B, H, C, L)    (or (B, H, L) when k is 2-D)

Users distrust FFT causality with reason: padding to fewer than 2L points wraps the future into the past.
``fft_causal_conv`` pads to a power of two >= 2L, so the circular convolution equals the linear one on the
first L outputs, and ``causal_conv_reference`` is the oracle the tests compare against.

``fft_causal_conv_tokens`` is the same convolution for the layers' token-major layout, u (B, L, D) in and
(C, B, L, D) out, run over groups of channels so that each group's FFTs, product and transposes stay in cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fft_size(length: int) -> int:
    """Smallest power of two >= 2 * length: circular convolution of that size has no wrap-around."""
    return 1 << max(1, (2 * length - 1).bit_length())


def _fit_kernel(k: torch.Tensor, length: int) -> torch.Tensor:
    if k.shape[-1] >= length:
        return k[..., :length]
    return F.pad(k, (0, length - k.shape[-1]))  # a shorter kernel is zero beyond its end


def fft_causal_conv(u: torch.Tensor, k: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
    """y[..., t] = sum_{s<=t} k[..., s] u[..., t-s] (+ skip * u[..., t]), computed in fp32 via rfft.

    The computation is forced to fp32 even under bf16/fp16 autocast (rfft has no bf16 on CPU, and
    long kernels lose their tail in half precision); the result is returned in fp32.
    """
    squeeze = k.dim() == 2
    if squeeze:
        k = k.unsqueeze(1)
        skip = None if skip is None else skip.unsqueeze(-1)
    length = u.shape[-1]
    n = fft_size(length)
    with torch.autocast(device_type=u.device.type, enabled=False):
        k32 = F.pad(_fit_kernel(k.float(), length), (0, n - length))  # the zero padding the FFT needs anyway
        if skip is not None:
            # skip * u is a convolution with skip at tap 0: folded into the kernel, it costs nothing, where adding
            # it to the (B, H, C, L) output took two passes over the largest tensor here (a third of BST:MH)
            k32[..., 0] += skip.float()
        u_f = torch.fft.rfft(u.float(), n=n)  # (B, H, n/2+1)
        k_f = torch.fft.rfft(k32)  # (H, C, n/2+1)
        y = torch.fft.irfft(u_f.unsqueeze(-2) * k_f, n=n)[..., :length]  # (B, H, C, L)
    return y.squeeze(-2) if squeeze else y


def causal_conv_reference(u: torch.Tensor, k: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
    """Direct O(L^2) causal convolution, the oracle for ``fft_causal_conv`` (same shapes, fp32)."""
    squeeze = k.dim() == 2
    if squeeze:
        k = k.unsqueeze(1)
        skip = None if skip is None else skip.unsqueeze(-1)
    length = u.shape[-1]
    u32, k32 = u.float(), _fit_kernel(k.float(), length)
    t = torch.arange(length, device=u.device)
    lag = t[:, None] - t[None, :]  # (t, s): output t reads input s with kernel tap t - s
    toeplitz = torch.where(lag >= 0, k32[..., lag.clamp(min=0)], torch.zeros((), device=u.device))  # (H,C,L,L)
    y = torch.einsum("hcts,bhs->bhct", toeplitz, u32)
    if skip is not None:
        y = y + skip.float().unsqueeze(-1) * u32.unsqueeze(-2)
    return y.squeeze(-2) if squeeze else y


def channel_group(filters: int, n: int) -> int:
    """Channels per group for ``fft_causal_conv_tokens`` with ``filters`` per channel and FFT size n: about 2^20
    spectrum points per group (a few MiB: the group's kernels, spectra and outputs stay in cache), but at least
    4 channels, so the transposes into the token-major output move 16 contiguous bytes at a time, at most 32."""
    return max(4, min(32, (1 << 20) // (filters * n)))


def fft_causal_conv_tokens(
    u: torch.Tensor, kernel: torch.Tensor, skip: torch.Tensor | None = None, group: int | None = None
) -> torch.Tensor:
    """``fft_causal_conv`` in the token-major layout: u (B, L, D) -> y (C, B, L, D) fp32, contiguous, equal to
    ``fft_causal_conv(u.transpose(1, 2), k, skip).permute(2, 0, 3, 1)``.

    ``kernel`` is the (D, C, Lk) bank (or (D, Lk)). The whole-tensor form made (B, D, C, n) spectra and padded
    outputs far larger than the cache (at 16k, D = 512, every pass over them went to memory) and then transposed
    the (B, D, C, L) result for the layers; here every group of ``group`` channels goes through its rfft,
    product and irfft while it is in cache, and lands in the output's layout.
    """
    length, channels = u.shape[1], u.shape[2]
    n = fft_size(length)
    if group is None:
        group = channel_group(kernel.shape[1] if kernel.dim() == 3 else 1, n)
    with torch.autocast(device_type=u.device.type, enabled=False):
        pieces, out = [], None
        for c0 in range(0, channels, group):
            c1 = min(channels, c0 + group)
            k = kernel[c0:c1]
            k = k.unsqueeze(1) if k.dim() == 2 else k  # (c, C, Lk)
            k32 = F.pad(_fit_kernel(k.float(), length), (0, n - length))
            if skip is not None:  # skip * u as tap 0 of the kernel, as in fft_causal_conv
                s = skip[c0:c1].float()
                k32[..., 0] += s.unsqueeze(-1) if s.dim() == 1 else s
            u_f = torch.fft.rfft(u[:, :, c0:c1].float().transpose(1, 2).contiguous(), n=n)  # (B, c, n/2+1)
            y = torch.fft.irfft(u_f.unsqueeze(-2) * torch.fft.rfft(k32), n=n)[..., :length]  # (B, c, C, L)
            y = y.permute(2, 0, 3, 1)  # (C, B, L, c)
            if torch.is_grad_enabled():  # autograd: one cat at the end
                pieces.append(y)
                continue
            if out is None:  # no graph to keep: write each group in place, one pass less over the output
                out = y.new_empty(y.shape[:-1] + (channels,))
            out[..., c0:c1] = y
        if out is not None:
            return out
        return torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0].contiguous()
