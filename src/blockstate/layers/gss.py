"""The Gated State Space layer (Mehta et al. 2022, "Long Range Language Modeling via Gated State Spaces").

As in the paper's Fig. 1 pseudo-code (``gss(x, F=4096, L=4096, E=1024, H=256)``), for x (B, L, E), pre-norm and
residual:

    u  = norm(x)
    v  = GELU(W_v u)          (B, L, F)   the wide, gating branch                   (paper: F = 4E)
    s  = GELU(W_s u)          (B, L, H)   the narrow branch, H << E                 (paper: H = E/4 = 256)
    y  = DSS(s)               (B, L, H)   a DSS-EXP kernel per narrow channel, N complex modes shared by the
                                          channels (``blockstate.ops.dss``), plus the D skip term
    uc = W_uc y               (B, L, F)   narrow -> wide, no activation
    x  = x + W_o(uc * v)

What was followed, and what could not be checked against the paper's text (this was written from memory of it):
- the shapes and the order above, the GELUs on both branches, no activation on W_uc, no FFN (the gated branch
  plays its role), the DSS on the narrow branch only, F = 4E and H = E/4 from Fig. 1's defaults (the registry's
  presets tune F and the depth so GSS-Hybrid matches BST:SH:S4's parameter budget);
- DSS-EXP with Lambda shared across channels and W and dt per channel, as in DSS; N = 512 modes by default
  (``gss_state_size``), a state far larger than BST's N = 16, which a shared Lambda makes cheap;
- not verified: the paper's ``norm`` (its kind; here the project's RMSNorm), Lambda's initialisation (here S4D's
  ``s4d_init``, "lin" by default, "inv" approximating the HiPPO eigenvalues DSS used), whether GSS kept a
  learnable dt and the D skip term (both kept here, as in DSS).

``gss_kernel`` other than ``"dss"`` (``"s4d"``, ``"unstructured"``, ``"explicit"``) runs the project's kernel of
that name on the narrow branch instead (``kernel_from_config``, one filter per channel), for ablations. Either way the
kernel is applied by ``LongConvSSM`` (the causal ``fft_causal_conv``) and its parameters are fp32 and tagged
``_ssm`` (lower learning rate, no weight decay).

Streaming has the one interface every layer here has: the parallel ``forward`` (which, given a cache, also keeps
the state decoding needs), ``step`` (one token) and ``allocate_inference_cache``. A DSS kernel is an S4D kernel
with A = Lambda and C = W / 2 (``blockstate.ops.dss_as_s4d``), so it runs as S4D's exact diagonal recurrence:
a (B, H, N) complex state, constant memory and time per token; S4D likewise; the unstructured and explicit
kernels keep the narrow branch's input history and convolve it incrementally (``LongConvSSM``). The SSM runs in
fp32 on every path and meets the wide branch in the activations' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers.initialization as init
from torch import nn

from blockstate.layers.cache import LayerCache
from blockstate.layers.common import RMSNorm, tag_ssm
from blockstate.layers.ssm import LongConvSSM, S4DKernel, kernel_from_config
from blockstate.ops import dss_as_s4d, dss_init, dss_kernel

GSS_KERNELS = ("dss", "s4d", "unstructured", "explicit")


class DSSKernel(nn.Module):
    """DSS-EXP kernels for ``channels`` channels sharing ``state_size`` complex modes: ``kernel(L) -> (C, 1, L)``."""

    def __init__(self, channels: int, state_size: int = 512, init: str = "lin", dt_min: float = 1e-3,
                 dt_max: float = 1e-1):
        super().__init__()
        self.channels, self.state_size, self.init, self.dt_range = channels, state_size, init, (dt_min, dt_max)
        self.log_dt = nn.Parameter(torch.empty(channels))
        self.log_lambda_re = nn.Parameter(torch.empty(state_size))
        self.lambda_im = nn.Parameter(torch.empty(state_size))
        self.w = nn.Parameter(torch.empty(channels, state_size, 2))
        tag_ssm(self, "log_dt", "log_lambda_re", "lambda_im", "w")
        self.init_parameters()

    @torch.no_grad()
    def init_parameters(self, std: float = 0.02) -> None:
        for name, value in dss_init(self.channels, self.state_size, self.init, *self.dt_range).items():
            init.copy_(getattr(self, name), value)

    def forward(self, length: int) -> torch.Tensor:
        return dss_kernel(self.log_dt, self.log_lambda_re, self.lambda_im, self.w, length).unsqueeze(1)

    # The S4D view of the same kernel (A = Lambda per channel, C = W / 2), read by the recurrence in LongConvSSM
    # (``s4d_step`` / ``s4d_final_state`` / ``s4d_state_response`` take ``kernel.log_a_real``, ``.a_imag``, ``.c``).
    @property
    def log_a_real(self) -> torch.Tensor:
        return dss_as_s4d(self.log_dt, self.log_lambda_re, self.lambda_im, self.w)[1]

    @property
    def a_imag(self) -> torch.Tensor:
        return dss_as_s4d(self.log_dt, self.log_lambda_re, self.lambda_im, self.w)[2]

    @property
    def c(self) -> torch.Tensor:
        return dss_as_s4d(self.log_dt, self.log_lambda_re, self.lambda_im, self.w)[3]


class GatedConvSSM(LongConvSSM):
    """``LongConvSSM`` whose streaming also runs DSS kernels as their diagonal recurrence (as it runs S4D's)."""

    @property
    def recurrent(self) -> bool:
        return isinstance(self.kernel, (S4DKernel, DSSKernel))


def gss_kernel(config, channels: int) -> nn.Module:
    """The narrow branch's kernel bank named by ``config.gss_kernel``."""
    if config.gss_kernel == "dss":
        return DSSKernel(channels, config.gss_state_size, config.s4d_init, config.ssm_dt_min, config.ssm_dt_max)
    return kernel_from_config(config, config.gss_kernel, channels, 1)


def gss_widths(hidden: int, wide: int | None = None, narrow: int | None = None) -> tuple[int, int]:
    """The wide (F) and narrow (H) branch widths; an unset one is the GSS paper's F = 4E or H = E/4."""
    return (4 * hidden if wide is None else wide), (max(1, hidden // 4) if narrow is None else narrow)


class GatedStateSpaceLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        dim = config.hidden_size  # widths unset in a BST config with plain_layers="gss": the paper's defaults
        wide, narrow = gss_widths(dim, config.gss_hidden_size, config.gss_narrow_size)
        self.norm = RMSNorm(dim, config.rms_norm_eps)
        self.wide = nn.Linear(dim, wide, bias=False)  # W_v
        self.narrow = nn.Linear(dim, narrow, bias=False)  # W_s
        self.ssm = GatedConvSSM(narrow, 1, gss_kernel(config, narrow))
        self.expand = nn.Linear(narrow, wide, bias=False)  # W_uc
        self.out = nn.Linear(wide, dim, bias=False)  # W_o
        self.out._residual_output = True  # depth-scaled init, like every residual branch's output
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None, lengths: torch.Tensor | None = None,
                start: int = 0) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D). With ``cache``, also keep the SSM state (or input history) for decoding from
        position start + lengths[b] (row b holds lengths[b] real tokens, then padding); with start > 0, continue
        the stream the cache has read ``start`` tokens of."""
        u = self.norm(x)
        v = F.gelu(self.wide(u))
        s = F.gelu(self.narrow(u))
        y = self.ssm(s, cache, start)[:, :, 0].transpose(1, 2).to(s.dtype)  # (B, H, 1, L) fp32 -> (B, L, H)
        if cache is not None:  # after the pass above, which reads the state carried into this chunk
            if lengths is None:
                lengths = torch.full((x.shape[0],), x.shape[1], device=x.device)
            self.ssm.fill_cache(cache, s, lengths, start)
        return x + self.dropout(self.out(self.expand(y) * v))

    @torch.no_grad()
    def step(self, x: torch.Tensor, cache: LayerCache, position: torch.Tensor) -> torch.Tensor:
        """One token per row: x (B, D) at positions (B,) -> (B, D), equal to the parallel forward there."""
        u = self.norm(x)
        v = F.gelu(self.wide(u))
        s = F.gelu(self.narrow(u))
        y = self.ssm.step(cache, s, position)[..., 0].to(s.dtype)  # (B, H, 1) fp32 -> (B, H)
        return x + self.dropout(self.out(self.expand(y) * v))

    def allocate_inference_cache(self) -> LayerCache:
        """An empty cache; the SSM state (or history) is sized on first use (prefill or step)."""
        return LayerCache()
