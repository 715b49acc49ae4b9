"""Pieces of the unstructured kernels: an implicit (Hyena-style) filter and an explicit regularised one.

Implicit filter (Poli et al. 2023, without Hyena's gating): k(t) = exp(-alpha t) * MLP(features(t)).
*Decision* (spec section 4): t is measured in units of the training length, t = l / L_train, so on a longer
input the filter extends past t = 1 under its decay rather than being stretched to fit.

Explicit kernel (Fu et al. 2023, "Simple Hardware-Efficient Long Convolutions"): a free (h, L_train) tensor,
regularised in their order: smooth (a short moving average), then squash (soft-thresholding small taps to zero).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def positional_features(length: int, max_train_length: int, num_bands: int, device=None) -> torch.Tensor:
    """(length, 1 + 2*num_bands) features of t = l / max_train_length: [t, cos(2 pi f t), sin(2 pi f t)].

    Frequencies f = 1..num_bands are integers, so every feature is defined for any t >= 0.
    """
    t = torch.arange(length, device=device, dtype=torch.float32) / max_train_length
    f = torch.arange(1, num_bands + 1, device=device, dtype=torch.float32)
    angle = 2 * math.pi * t[:, None] * f[None, :]
    return torch.cat([t[:, None], angle.cos(), angle.sin()], dim=-1)


def decay_rates(h: int, fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5, target: float = 1e-2,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Per-filter rates alpha: the slowest filter falls to ``target`` at t = slow_decay_pct, the fastest at
    t = fast_decay_pct (Hyena's exponential modulation); spread linearly between. Made on ``device``."""
    slow = -math.log(target) / slow_decay_pct
    fast = -math.log(target) / fast_decay_pct
    return torch.linspace(slow, fast, h, device=device)


def exponential_decay(length: int, max_train_length: int, rates: torch.Tensor) -> torch.Tensor:
    """(h, length) window exp(-alpha_h t) with t = l / max_train_length."""
    t = torch.arange(length, device=rates.device, dtype=torch.float32) / max_train_length
    return torch.exp(-rates.float()[:, None] * t[None, :])


def squash_smooth(k: torch.Tensor, squash: float = 0.0, smooth_width: int = 1,
                  straight_through: bool = True) -> torch.Tensor:
    """Explicit-kernel regularisation in Fu et al.'s order: average over ``smooth_width`` taps, then soft-threshold
    by ``squash`` (taps with |k| <= squash become exactly 0 in the forward).

    ``straight_through``: the threshold's backward is the identity. A soft threshold's own derivative is 0 on its
    zero region, so a tap that starts (or lands) there never gets a gradient again: with a decaying init that was
    every long tap. Passing the gradient through keeps Fu et al.'s forward (the kernel used is still sparse) and
    makes the weight behind each tap a running sum of its gradients, which the threshold reads: the "lazy" form
    of the L1 proximal step (regularised dual averaging), where a zeroed tap can come back once its gradients
    say so. ``straight_through=False`` is the plain soft threshold.
    """
    if smooth_width > 1:
        shape = k.shape
        k = F.avg_pool1d(k.reshape(-1, 1, shape[-1]), smooth_width, stride=1, padding=smooth_width // 2,
                         count_include_pad=False)[..., : shape[-1]].reshape(shape)
    if squash > 0:
        squashed = torch.sign(k) * F.relu(k.abs() - squash)
        k = k + (squashed - k).detach() if straight_through else squashed
    return k
