"""Causal depthwise long convolution: the FFT fast path and its direct O(L^2) reference.

Shapes (channels first, time last, so every FFT runs along the contiguous last axis):
    u    (B, H, L)       input, H channels
    k    (H, C, Lk)      C filters per channel (or (H, Lk) for one filter); only k[..., :L] is used
    skip (H, C) / (H,)   learned D term, ``y += skip * u``
    y    (B, H, C, L)    (or (B, H, L) when k is 2-D)

Users distrust FFT causality with reason: padding to fewer than 2L points wraps the future into the past.
``fft_causal_conv`` pads to a power of two >= 2L, so the circular convolution equals the linear one on the
first L outputs, and ``causal_conv_reference`` is the oracle the tests compare against.
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
