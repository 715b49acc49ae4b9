"""Small shared building blocks: RMSNorm, the feed-forward network, rotary positions, block reshaping, and the
marks on SSM parameters (``tag_ssm`` / ``ssm_parameter_names``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blockstate.layers.cache import cached_on, step_constant

SQRT_HALF = 0.5 ** 0.5  # 1 / sqrt(2): GELU(h) = h/2 (1 + erf(h / sqrt(2)))


class RMSNorm(nn.Module):
    """Root-mean-square norm (no centring, no bias), computed in fp32 for stability under autocast."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` for a decoding step, in fp32 as four ops: one norm, then x * w * rsqrt(|x|^2 / D + eps).

        On CPU ``F.rms_norm`` is a composite of six ops and a step is dispatch-bound: at D = 256 on AMD EPYC the
        four ops take 25 us against its 39 us, and a tiny model runs eleven norms per token."""
        weight, device = self.weight, x.device
        if (x.dtype is not torch.float32 or weight.dtype is not torch.float32 or self._forward_hooks
                or torch.is_autocast_enabled(device.type)):
            return self(x)
        eps = self.__dict__.get("_eps_tensor")
        if eps is None or eps.device != device:
            eps = self.__dict__["_eps_tensor"] = torch.tensor(self.eps, device=device)  # not in the state dict
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        return torch.addcmul(eps, norm, norm, value=1 / x.shape[-1]).rsqrt_().mul(x).mul_(weight)


class FeedForward(nn.Module):
    """Bias-free D -> intermediate -> D with GELU (the Block Transformer's FFN)."""

    def __init__(self, dim: int, intermediate: int, dropout: float = 0.0):
        super().__init__()
        self.up = nn.Linear(dim, intermediate, bias=False)
        self.down = nn.Linear(intermediate, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))

    def step(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """One row per stream, x (B, D), in eval (a decoding step): ``residual + forward(x)``, in fewer ops.

        A product of one row reads every weight once, and MKL reads a weight fastest along its longer side (on
        AMD EPYC, 256 -> 1024: 67 against 153 us per matrix once the weights leave the cache), so the up
        projection is read from a (D, intermediate) copy of its weight, kept until the parameter changes. That
        copy is scaled by 1/sqrt(2): with g = h / sqrt(2), g + g erf(g) = sqrt(2) GELU(h), two plain kernels in
        place of the GELU (in a profile of a tiny model's step on a Zen 1 EPYC: 84 us per GELU, 16 per erf), and
        the down projection takes the residual and the other 1/sqrt(2) in one ``addmm``."""
        up_proj, down_proj = self.up, self.down
        if self.training or self._forward_hooks or up_proj._forward_hooks or down_proj._forward_hooks:
            out = self(x)
            return out if residual is None else residual + out
        up = self.step_up_weight()
        g = torch.mm(x, up) if up_proj.weight.shape[0] > up_proj.weight.shape[1] else F.linear(x, up)
        hidden = torch.addcmul(g, g, torch.erf(g))
        if residual is None or residual.dtype != hidden.dtype or torch.is_autocast_enabled(x.device.type):
            out = F.linear(hidden, down_proj.weight).mul_(SQRT_HALF)  # under autocast the residual keeps its dtype
            return out if residual is None else residual + out
        return torch.addmm(residual, hidden, down_proj.weight.t(), alpha=SQRT_HALF)

    @step_constant
    def step_up_weight(self) -> torch.Tensor:
        """The up projection as ``step`` reads it, times 1/sqrt(2): (D, intermediate) where that side is the
        longer (for ``mm``), else (intermediate, D) (for ``linear``)."""
        up = self.up.weight
        if up.shape[0] <= up.shape[1]:
            return cached_on(self, "up_scaled", [up], lambda: up.detach() * SQRT_HALF)
        return cached_on(self, "up_t", [up], lambda: (up.detach().t() * SQRT_HALF).contiguous())


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, ...]:
    """cos/sin tables (len(positions), head_dim) for rotary embeddings ("rotate half" layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, head_dim) by the tables for its T positions; the result keeps x's dtype."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def to_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, L, ...) -> (B, nb, W, ...), zero-padding the tail. Causality makes the padding harmless: it sits after
    every real token, and the caller trims it again with ``from_blocks``."""
    length = x.shape[1]
    nb = num_blocks(length, block_size)
    pad = nb * block_size - length
    if pad:
        x = torch.cat([x, x.new_zeros((x.shape[0], pad, *x.shape[2:]))], dim=1)
    return x.reshape(x.shape[0], nb, block_size, *x.shape[2:])


def from_blocks(x: torch.Tensor, length: int) -> torch.Tensor:
    """(B, nb, W, ...) -> (B, L, ...), dropping the padded tail."""
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])[:, :length]


def tag_ssm(module: nn.Module, *names: str) -> None:
    """Mark ``module``'s parameters ``names`` (dotted, below it) as SSM parameters: a lower learning rate and no
    weight decay (``training.optim``). The names live on the module, so the mark survives ``from_pretrained`` (which
    replaces every parameter), ``copy.deepcopy`` and FSDP; ``p._ssm`` on the parameter itself is kept for readers
    of a freshly built model."""
    module._ssm_parameters = (*getattr(module, "_ssm_parameters", ()), *names)
    for name in names:
        module.get_parameter(name)._ssm = True


def ssm_parameter_names(model: nn.Module) -> set[str]:
    """The names, as ``model.named_parameters()`` gives them, of every parameter marked by ``tag_ssm``."""
    return {f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
            for name in getattr(module, "_ssm_parameters", ())}
