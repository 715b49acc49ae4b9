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
        dta_re, dta_im = _dta(log_dt, log_a_real, a_imag)
        abar = torch.complex(dta_re, dta_im).exp()
        bbar = torch.complex(*_bbar(dta_re, dta_im, log_dt))
        return abar, bbar, torch.view_as_complex(c.float().contiguous())


def _chunk(length: int) -> int:
    return 1 << max(0, (math.isqrt(max(length, 1)) - 1).bit_length())  # power of two near sqrt(L)


def _dta(log_dt: torch.Tensor, log_a_real: torch.Tensor, a_imag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of dt * A, (h, m), fp32."""
    dt = log_dt.float().exp().unsqueeze(-1)
    return -dt * log_a_real.float().exp(), dt * a_imag.float()


def s4d_vandermonde(
    coef_re: torch.Tensor, coef_im: torch.Tensor, dta_re: torch.Tensor, dta_im: torch.Tensor, length: int
) -> torch.Tensor:
    """2 Re(sum_n coef_n exp(dtA_n l)) for l < length: (..., h, m) coefficients -> (..., h, length).

    With l = q*c + r only exp(dtA q c) and exp(dtA r) are evaluated, (h, m, L/c + c) transcendentals, and the
    sum over modes is one real matmul: Re(P R) = Pr Rr - Pi Ri.
    """
    step = _chunk(length)
    blocks = -(-length // step)
    r = torch.arange(step, device=dta_re.device, dtype=torch.float32)
    q = torch.arange(blocks, device=dta_re.device, dtype=torch.float32) * step
    mag_r, ang_r = (dta_re.unsqueeze(-1) * r).exp(), dta_im.unsqueeze(-1) * r
    pow_r = torch.cat([mag_r * ang_r.cos(), mag_r * ang_r.sin()], dim=-2)  # (h, 2m, step)
    mag_q, ang_q = (dta_re.unsqueeze(-1) * q).exp(), dta_im.unsqueeze(-1) * q
    z_re, z_im = mag_q * ang_q.cos(), mag_q * ang_q.sin()  # (h, m, blocks)
    p_re = coef_re.unsqueeze(-1) * z_re - coef_im.unsqueeze(-1) * z_im
    p_im = coef_re.unsqueeze(-1) * z_im + coef_im.unsqueeze(-1) * z_re
    lhs = torch.cat([p_re, -p_im], dim=-2).transpose(-1, -2)  # (..., h, blocks, 2m)
    k = 2 * torch.matmul(lhs, pow_r)  # (..., h, blocks, step)
    return k.flatten(-2)[..., :length]


def s4d_kernel(
    log_dt: torch.Tensor, log_a_real: torch.Tensor, a_imag: torch.Tensor, c: torch.Tensor, length: int
) -> torch.Tensor:
    """The (h, length) convolution kernel K_l = 2 Re(sum_n C_n Bbar_n Abar_n^l), fp32 (see module doc)."""
    with torch.autocast(device_type=log_dt.device.type, enabled=False):
        dta_re, dta_im = _dta(log_dt, log_a_real, a_imag)
        bb_re, bb_im = _bbar(dta_re, dta_im, log_dt)  # C' = C * Bbar
        c_re, c_im = c[..., 0].float(), c[..., 1].float()
        return s4d_vandermonde(c_re * bb_re - c_im * bb_im, c_re * bb_im + c_im * bb_re, dta_re, dta_im, length)


def _bbar(dta_re: torch.Tensor, dta_im: torch.Tensor, log_dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bbar = (exp(dt A) - 1) / A = dt * phi(z), phi(z) = (e^z - 1) / z, z = dt A = x + iy, in real arithmetic on
    (h, m): real and imaginary parts.

    Stable for long-horizon modes (Re(A) -> 0): e^z - 1 = expm1(x) cos y - 2 sin^2(y/2) + i e^x sin y has no
    cancellation, and phi takes its Taylor series where |z| < 1e-3 (error < |z|^3/24). The naive (e^z - 1) / A
    loses such a mode in fp32 (e^z - 1 rounds to 0) and gives 0/0 = NaN once |A|^2 underflows.
    """
    x, y = dta_re, dta_im
    num_re = torch.expm1(x) * y.cos() - 2 * (y / 2).sin().square()
    num_im = x.exp() * y.sin()
    den = x.square() + y.square()
    small = den < 1e-6
    safe = torch.where(small, torch.ones_like(den), den)  # no inf/NaN in the branch where() drops (gradients)
    phi_re = torch.where(small, 1 + x / 2 + (x.square() - y.square()) / 6, (num_re * x + num_im * y) / safe)
    phi_im = torch.where(small, y / 2 + x * y / 3, (num_im * x - num_re * y) / safe)
    dt = log_dt.float().exp().unsqueeze(-1)
    return dt * phi_re, dt * phi_im


def s4d_state_response(
    log_dt: torch.Tensor, log_a_real: torch.Tensor, a_imag: torch.Tensor, c: torch.Tensor, x0: torch.Tensor,
    length: int,
) -> torch.Tensor:
    """Output contribution of an initial state x0 (B, h, m) complex over the next ``length`` steps with zero
    input: 2 Re(C Abar^(l+1) x0), (B, h, length). Added to a chunk's convolution it continues a stream."""
    with torch.autocast(device_type=log_dt.device.type, enabled=False):
        dta_re, dta_im = _dta(log_dt, log_a_real, a_imag)
        abar = torch.complex(dta_re, dta_im).exp()
        coef = torch.view_as_complex(c.float().contiguous()) * abar * x0
        return s4d_vandermonde(coef.real, coef.imag, dta_re, dta_im, length)


def s4d_final_state(
    log_dt: torch.Tensor, log_a_real: torch.Tensor, a_imag: torch.Tensor, u: torch.Tensor,
    x0: torch.Tensor | None = None, chunk: int = 256, x0_steps: torch.Tensor | None = None,
) -> torch.Tensor:
    """State after reading u (B, h, T) from x0 (default zero): Abar^T x0 + sum_s Abar^(T-1-s) Bbar u_s.

    This hands a parallel prefill over to the recurrence. Chunked over time so memory stays (h, m, chunk).
    ``x0_steps`` (B,): row b read only that many real steps since x0 (its inputs right-aligned, zeros in front),
    so x0 decays by Abar^x0_steps[b] instead of Abar^T.
    """
    with torch.autocast(device_type=log_dt.device.type, enabled=False):
        dta_re, dta_im = _dta(log_dt, log_a_real, a_imag)
        dta = torch.complex(dta_re, dta_im)
        bbar = torch.complex(*_bbar(dta_re, dta_im, log_dt))
        total = u.shape[-1]
        state = torch.zeros(u.shape[0], *dta.shape, dtype=torch.complex64, device=u.device)
        for start in range(0, total, chunk):
            piece = u[..., start : start + chunk].float()
            lags = (total - 1 - torch.arange(start, start + piece.shape[-1], device=u.device)).float()
            powers = (dta.unsqueeze(-1) * lags).exp()  # (h, m, chunk)
            state = state + torch.einsum("bhs,hms->bhm", piece.to(powers.dtype), powers)
        state = state * bbar
        if x0 is None:
            return state
        steps = total if x0_steps is None else x0_steps.to(device=u.device, dtype=torch.float32).view(-1, 1, 1)
        return state + (dta * steps).exp() * x0


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


def s4d_update_(state: torch.Tensor, abar: torch.Tensor, bbar: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``state = abar * state + bbar * u`` in place (the fast path beside ``s4d_step``): state complex, abar / bbar
    complex and u real, broadcastable to it. Under ``torch.compile`` the same on (re, im) pairs: inductor emits no
    code for complex ops, so they would run one by one outside its fused loops."""
    if not torch.compiler.is_compiling():
        return state.mul_(abar).addcmul_(bbar, u)
    xr, ar, br = torch.view_as_real(state), torch.view_as_real(abar), torch.view_as_real(bbar)
    re = ar[..., 0] * xr[..., 0] - ar[..., 1] * xr[..., 1] + br[..., 0] * u
    im = ar[..., 0] * xr[..., 1] + ar[..., 1] * xr[..., 0] + br[..., 1] * u
    xr.copy_(torch.stack([re, im], -1))
    return state
