"""Diagonal state space kernels (S4D, Gu et al. 2022) with zero-order-hold discretisation.

A bank of ``h`` independent SSMs (one per channel and filter), each with ``m = N/2`` complex modes standing for
N real states (conjugate pairs, hence the factor 2 and the real part):

    x_t = Abar x_{t-1} + Bbar u_t,   y_t = 2 Re(C x_t)        Abar = exp(dt A), Bbar = (Abar - 1) / A  (B = 1)
    K_l = 2 Re( sum_n C_n Bbar_n Abar_n^l )                   the convolution kernel of that recurrence

Parameters are real tensors (safetensors, optimisers and FSDP handle them everywhere):
    log_dt      (h,)      dt = exp(log_dt), initialised log-uniform in [dt_min, dt_max]
    log_a_real  (h, m)    Re(A) = -exp(log_a_real) < 0 keeps every mode stable
    a_imag      (h, m)    Im(A)
    c           (h, m, 2) real and imaginary parts of C

``s4d_kernel`` builds K without materialising complex (h, m, L) tensors: complex exp over (h, m, L) is not
vectorised on CPU and took most of a forward pass in a prototype. With l = q*c + r it needs Abar^(q c) and
Abar^r only, (h, m, L/c + c) transcendentals, and one real batched matmul does the sum over modes.
``s4d_kernel_reference`` unrolls the recurrence on an impulse: the test oracle, and the form streaming uses.
"""

from __future__ import annotations

import math

import torch


def s4d_init(
    h: int,
    state_size: int,
    init: str = "lin",
    dt_min: float = 1e-3,
    dt_max: float = 1e-1,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Initial S4D parameters for ``h`` SSMs of ``state_size`` real states (``state_size/2`` complex modes).

    ``init='lin'``: A_n = -1/2 + i pi n (S4D-Lin). ``init='inv'``: A_n = -1/2 + i N/pi (N/(2n+1) - 1) (S4D-Inv).
    """
    if state_size < 2 or state_size % 2:
        raise ValueError(f"state_size must be an even number >= 2 (N/2 conjugate-pair modes), got {state_size}")
    m = state_size // 2
    n = torch.arange(m, dtype=torch.float32)
    if init == "lin":
        imag = math.pi * n
    elif init == "inv":
        imag = state_size / math.pi * (state_size / (2 * n + 1) - 1)
    else:
        raise ValueError(f"s4d init must be one of ['lin', 'inv'], got {init!r}")
    u = torch.rand(h, generator=generator)
    log_dt = math.log(dt_min) + u * (math.log(dt_max) - math.log(dt_min))
    return {
        "log_dt": log_dt,
        "log_a_real": torch.full((h, m), math.log(0.5)),
        "a_imag": imag.expand(h, m).clone(),
        "c": torch.randn(h, m, 2, generator=generator) * math.sqrt(0.5),  # complex normal, unit variance
    }


def s4d_discretize(
    log_dt: torch.Tensor, log_a_real: torch.Tensor, a_imag: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ZOH discretisation in fp32: returns complex (Abar, Bbar, C), each (h, m)."""
    with torch.autocast(device_type=log_dt.device.type, enabled=False):
        dt = log_dt.float().exp().unsqueeze(-1)
        a = torch.complex(-log_a_real.float().exp(), a_imag.float())
        dta = dt * a
        abar = dta.exp()
        bbar = (abar - 1) / a
        return abar, bbar, torch.view_as_complex(c.float().contiguous())


def _chunk(length: int) -> int:
    return 1 << max(0, (math.isqrt(max(length, 1)) - 1).bit_length())  # power of two near sqrt(L)


def s4d_kernel(
    log_dt: torch.Tensor, log_a_real: torch.Tensor, a_imag: torch.Tensor, c: torch.Tensor, length: int
) -> torch.Tensor:
    """The (h, length) convolution kernel K_l = 2 Re(sum_n C_n Bbar_n Abar_n^l), fp32 (see module doc)."""
    with torch.autocast(device_type=log_dt.device.type, enabled=False):
        dt = log_dt.float().exp().unsqueeze(-1)  # (h, 1)
        a_re = -log_a_real.float().exp()
        a_im = a_imag.float()
        dta_re, dta_im = dt * a_re, dt * a_im  # (h, m)
        # C' = C * Bbar with Bbar = (exp(dt A) - 1) / A, all in real arithmetic on (h, m)
        e = dta_re.exp()
        ab_re, ab_im = e * dta_im.cos() - 1, e * dta_im.sin()
        den = a_re.square() + a_im.square()
        bb_re = (ab_re * a_re + ab_im * a_im) / den
        bb_im = (ab_im * a_re - ab_re * a_im) / den
        c_re, c_im = c[..., 0].float(), c[..., 1].float()
        cb_re = c_re * bb_re - c_im * bb_im
        cb_im = c_re * bb_im + c_im * bb_re

        step = _chunk(length)
        blocks = -(-length // step)
        r = torch.arange(step, device=log_dt.device, dtype=torch.float32)
        q = torch.arange(blocks, device=log_dt.device, dtype=torch.float32) * step
        # Abar^r, (h, m, step)
        mag_r = (dta_re.unsqueeze(-1) * r).exp()
        ang_r = dta_im.unsqueeze(-1) * r
        pow_r = torch.cat([mag_r * ang_r.cos(), mag_r * ang_r.sin()], dim=1)  # (h, 2m, step)
        # C' Abar^(q step), (h, blocks, m)
        mag_q = (dta_re.unsqueeze(-1) * q).exp()
        ang_q = dta_im.unsqueeze(-1) * q
        z_re, z_im = mag_q * ang_q.cos(), mag_q * ang_q.sin()
        p_re = cb_re.unsqueeze(-1) * z_re - cb_im.unsqueeze(-1) * z_im
        p_im = cb_re.unsqueeze(-1) * z_im + cb_im.unsqueeze(-1) * z_re
        lhs = torch.cat([p_re, -p_im], dim=1).transpose(1, 2)  # (h, blocks, 2m)
        k = 2 * torch.bmm(lhs, pow_r)  # Re(P R) = Pr Rr - Pi Ri, (h, blocks, step)
        return k.reshape(k.shape[0], blocks * step)[:, :length]


def s4d_kernel_reference(
    log_dt: torch.Tensor, log_a_real: torch.Tensor, a_imag: torch.Tensor, c: torch.Tensor, length: int
) -> torch.Tensor:
    """The kernel as the impulse response of the recurrence, unrolled step by step in complex128."""
    abar, bbar, cc = (t.to(torch.complex128) for t in s4d_discretize(log_dt, log_a_real, a_imag, c))
    x = torch.zeros_like(abar)
    out = []
    for step in range(length):
        x = abar * x + (bbar if step == 0 else 0)  # u = impulse at t = 0
        out.append(2 * (cc * x).sum(-1).real)
    return torch.stack(out, dim=-1).float()


def s4d_step(
    state: torch.Tensor, u: torch.Tensor, abar: torch.Tensor, bbar: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent step for a batch: state (B, h, m) complex, u (B, h) real -> (new state, y (B, h))."""
    state = abar * state + bbar * u.unsqueeze(-1)
    return state, 2 * (c * state).sum(-1).real
