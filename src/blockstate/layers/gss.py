"""The Gated State Space layer (Mehta et al. 2022, "Long Range Language Modeling via Gated State Spaces").

For x (B, L, D), pre-norm and residual:

    u = norm(x)
    v = GELU(W_v u)          (B, L, F)   the wide, gating branch
    s = GELU(W_s u)          (B, L, N)   the narrow branch, N << D
    y = SSM(s)               (B, L, N)   a diagonal SSM, one filter per channel (the project's LongConvSSM)
    x = x + W_o((W_y y) * v)             W_y: N -> F with no activation, as in the paper's pseudocode

The SSM is the same ``LongConvSSM`` + kernel family as BST's (``make_kernel``: S4D by default), not a copy.
A GSS layer has no FFN: the gated branch plays that role.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blockstate.layers.common import RMSNorm
from blockstate.layers.ssm import LongConvSSM, make_kernel


class GatedStateSpaceLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        dim, wide, narrow = config.hidden_size, config.gss_hidden_size, config.gss_narrow_size
        self.norm = RMSNorm(dim, config.rms_norm_eps)
        self.wide = nn.Linear(dim, wide, bias=False)
        self.narrow = nn.Linear(dim, narrow, bias=False)
        kernel = make_kernel(
            config.kernel, narrow, 1, state_size=config.ssm_state_size, s4d_init=config.s4d_init,
            dt_min=config.ssm_dt_min, dt_max=config.ssm_dt_max, max_train_length=config.max_train_length,
            filter_hidden=config.filter_hidden_size, filter_bands=config.filter_num_bands,
        )
        self.ssm = LongConvSSM(narrow, 1, kernel)
        self.expand = nn.Linear(narrow, wide, bias=False)
        self.out = nn.Linear(wide, dim, bias=False)
        self.out._residual_output = True  # depth-scaled init, like every residual branch's output
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.norm(x)
        v = F.gelu(self.wide(u))
        s = F.gelu(self.narrow(u))
        y = self.ssm(s)[:, :, 0].transpose(1, 2).to(s.dtype)  # (B, N, 1, L) fp32 -> (B, L, N)
        return x + self.dropout(self.out(self.expand(y) * v))
