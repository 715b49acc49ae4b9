"""Diagonal State Spaces (DSS, Gupta et al. 2022), the SSM of the Gated State Space layer (Mehta et al. 2022).

DSS-EXP, for ``h`` channels sharing ``n`` complex modes Lambda (GSS runs one DSS over its narrow branch, and in
DSS the modes are shared across channels while W and the step are per channel):

    Lambda_n = -exp(log_lambda_re_n) + i lambda_im_n                Re(Lambda) < 0: every mode decays
    K_(c,l)  = Re( sum_n W_(c,n) (exp(dt_c Lambda_n) - 1) / Lambda_n exp(dt_c Lambda_n l) )

that is the ZOH-discretised diagonal SSM with B = 1 and C = W, taken with ``Re`` (DSS) where S4D takes ``2 Re``
(conjugate pairs): a DSS kernel is the S4D kernel of C = W / 2 and A_(c,n) = Lambda_n. ``dss_kernel`` therefore
runs through ``s4d_kernel``'s real-arithmetic, chunked path (no complex (h, n, L) tensor: GSS uses hundreds of
modes). ``dss_kernel_reference`` is the formula above, term by term, in complex128: the test oracle.

Streaming uses the same identity the other way round: ``dss_as_s4d`` gives the S4D parameters of a DSS kernel, so
its exact diagonal recurrence (``s4d_step``, ``s4d_final_state``, ``s4d_state_response``) runs a GSS layer one
token at a time with a (B, h, n) complex state, constant in the context length.

Parameters (real tensors, fp32, like S4D's):
    log_dt        (h,)       dt = exp(log_dt), per channel
    log_lambda_re (n,)       shared modes: Re(Lambda) = -exp(log_lambda_re)
    lambda_im     (n,)
    w             (h, n, 2)  real and imaginary parts of W (= C * B), per channel
"""

from __future__ import annotations

import math

import torch

from blockstate.ops.s4d import s4d_init, s4d_kernel


def dss_init(h: int, n: int, init: str = "lin", dt_min: float = 1e-3, dt_max: float = 1e-1,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Initial DSS parameters for ``h`` channels and ``n`` shared complex modes.

    Lambda follows S4D's diagonal initialisations over n modes (``"lin"``: -1/2 + i pi k; ``"inv"``: the S4D-Inv
    approximation of the HiPPO-LegS eigenvalues DSS started from); W ~ complex normal with unit variance per real
    part (DSS's ``randn`` of real and imaginary parts); log dt uniform in [log dt_min, log dt_max] (DSS, S4).
    """
    if n < 1:
        raise ValueError(f"a DSS kernel needs at least one mode, got {n}")
    s4d = s4d_init(1, 2 * n, init, dt_min, dt_max, generator=generator)  # 2n real states = n complex modes
    u = torch.rand(h, generator=generator)
    return {
        "log_dt": math.log(dt_min) + u * (math.log(dt_max) - math.log(dt_min)),
        "log_lambda_re": s4d["log_a_real"][0].clone(),
        "lambda_im": s4d["a_imag"][0].clone(),
        "w": torch.randn(h, n, 2, generator=generator),
    }


def dss_as_s4d(log_dt: torch.Tensor, log_lambda_re: torch.Tensor, lambda_im: torch.Tensor,
               w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The S4D parameters (log_dt, log_a_real, a_imag, c) of the DSS kernel: A_(c,n) = Lambda_n, C = W / 2.

    The shared modes are expanded (a view, no copy) to one row per channel, as S4D keeps them."""
    h, n = w.shape[0], w.shape[1]
    return log_dt, log_lambda_re.expand(h, n), lambda_im.expand(h, n), 0.5 * w


def dss_kernel(log_dt: torch.Tensor, log_lambda_re: torch.Tensor, lambda_im: torch.Tensor, w: torch.Tensor,
               length: int) -> torch.Tensor:
    """The (h, length) DSS-EXP kernel, fp32 (see the module doc): ``s4d_kernel`` with A = Lambda, C = W / 2."""
    return s4d_kernel(*dss_as_s4d(log_dt, log_lambda_re, lambda_im, w), length)


def dss_kernel_reference(log_dt: torch.Tensor, log_lambda_re: torch.Tensor, lambda_im: torch.Tensor,
                         w: torch.Tensor, length: int) -> torch.Tensor:
    """The DSS-EXP kernel written out in complex128, (h, length) fp64: the oracle of ``dss_kernel``."""
    lam = torch.complex(-log_lambda_re.double().exp(), lambda_im.double())  # (n,)
    dt_lam = log_dt.double().exp()[:, None] * lam[None, :]  # (h, n)
    coef = torch.view_as_complex(w.double().contiguous()) * (dt_lam.exp() - 1) / lam  # W (e^{dt L} - 1) / L
    l = torch.arange(length, dtype=torch.float64)
    return (coef[..., None] * (dt_lam[..., None] * l).exp()).sum(1).real
