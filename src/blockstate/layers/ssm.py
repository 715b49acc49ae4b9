"""The SSM sublayer: depthwise causal long convolutions (by FFT; SH's S4D chunk by chunk).

``LongConvSSM(channels=D, filters=C)`` maps u (B, L, D) to y (B, D, C, L): C filters per channel
(C = 1 for SH, H for MH, S for MF). Three kernel families share the interface ``kernel(length) -> (D, C, L)``:

- ``S4DKernel``      structured, generated from (A, B, C, dt) for any length (spec section 4, *decision* S4D-ZOH);
- ``ImplicitKernel`` unstructured, Hyena-style implicit filter with t in units of the training length;
- ``ExplicitKernel`` unstructured, a free kernel regularised by smooth-then-squash (Fu et al. 2023).

Kernel parameters are fp32, stay fp32 when the model is cast to bf16 / fp16 (``LongConvSSM._apply``) and are
used in fp32 with autocast off; outputs are fp32 (callers cast them). Parameters tagged ``_ssm = True`` get the
lower learning rate and no weight decay (``blockstate.models.parameter_groups``).
"""

from __future__ import annotations

import math

import torch
import transformers.initialization as init
from torch import nn

from blockstate.layers.cache import cached_on, grow, no_grad_step, step_constant
from blockstate.layers.common import tag_ssm
from blockstate.ops import (
    decay_rates,
    exponential_decay,
    fft_causal_conv,
    fft_causal_conv_tokens,
    fft_size,
    positional_features,
    s4d_block_ends,
    s4d_chunked_bank,
    s4d_chunked_conv,
    s4d_discretize,
    s4d_final_state,
    s4d_init,
    s4d_kernel,
    s4d_state_response,
    s4d_update_,
    squash_smooth,
)
from blockstate.ops.fftconv import channel_group


class S4DKernel(nn.Module):
    """Diagonal S4 kernels for ``channels * filters`` independent SSMs of ``state_size`` states each."""

    def __init__(self, channels: int, filters: int, state_size: int = 16, init: str = "lin",
                 dt_min: float = 1e-3, dt_max: float = 1e-1):
        super().__init__()
        self.channels, self.filters = channels, filters
        self.state_size, self.init, self.dt_range = state_size, init, (dt_min, dt_max)
        h, m = channels * filters, state_size // 2
        s4d_init(1, state_size, init)  # validate the arguments early
        self.log_dt = nn.Parameter(torch.empty(h))
        self.log_a_real = nn.Parameter(torch.empty(h, m))
        self.a_imag = nn.Parameter(torch.empty(h, m))
        self.c = nn.Parameter(torch.empty(h, m, 2))
        tag_ssm(self, "log_dt", "log_a_real", "a_imag", "c")
        self.init_parameters()

    @torch.no_grad()
    def init_parameters(self, std: float = 0.02) -> None:
        values = s4d_init(self.channels * self.filters, self.state_size, self.init, *self.dt_range)
        for name, value in values.items():
            init.copy_(getattr(self, name), value)

    def forward(self, length: int) -> torch.Tensor:
        """(D, C, length) kernels (SSM d * C + f is filter f of channel d)."""
        k = s4d_kernel(self.log_dt, self.log_a_real, self.a_imag, self.c, length)
        return k.view(self.channels, self.filters, length)


class _Sin(nn.Module):
    """sin(freq * x) with a learned frequency per unit (Hyena's filter activation)."""

    def __init__(self, dim: int, w: float = 1.0):
        super().__init__()
        self.w = w
        self.freq = nn.Parameter(torch.full((dim,), w))

    @torch.no_grad()
    def init_parameters(self, std: float = 0.02) -> None:
        init.constant_(self.freq, self.w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class ImplicitKernel(nn.Module):
    """k(t) = exp(-alpha t) * MLP(features(t)), t = l / max_train_length (spec section 4, *decision*)."""

    def __init__(self, channels: int, filters: int, max_train_length: int, hidden: int = 64,
                 num_bands: int = 16, depth: int = 2):
        super().__init__()
        self.channels, self.filters, self.max_train_length = channels, filters, max_train_length
        self.num_bands = num_bands
        layers: list[nn.Module] = []
        width = 1 + 2 * num_bands
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), _Sin(hidden)]
            width = hidden
        layers.append(nn.Linear(width, channels * filters, bias=False))
        self.mlp = nn.Sequential(*layers)
        for layer in self.mlp:
            # torch's default Linear init (uniform, bound 1/sqrt(fan_in)), which a standalone kernel already has;
            # inside a PreTrainedModel ``_init_weights`` reads the flag and applies the same (its one copy)
            layer._init_fan_in_uniform = True
        tag_ssm(self, *(f"mlp.{name}" for name, _ in self.mlp.named_parameters()))

    def forward(self, length: int) -> torch.Tensor:
        device = self.mlp[0].weight.device
        with torch.autocast(device_type=device.type, enabled=False):
            z = positional_features(length, self.max_train_length, self.num_bands, device=device)
            # fp32 weights even if the MLP was cast (loaded in bf16, FSDP param_dtype): the filter is a long-range
            # function of t, and fp32 features meet same-dtype weights
            weights = {name: p.float() for name, p in self.mlp.named_parameters()}
            k = torch.func.functional_call(self.mlp, weights, (z,)).t()  # (D*C, L)
            # made on the device: a blocking host-to-device copy is a sync per step (and the device= argument, unlike
            # a torch.device context, keeps the kernel inside one torch.compile graph)
            rates = decay_rates(self.channels * self.filters, device=device)
            k = k * exponential_decay(length, self.max_train_length, rates)
        return k.reshape(self.channels, self.filters, length)


class ExplicitKernel(nn.Module):
    """A free kernel of max_train_length taps per filter, smoothed then squashed (Fu et al. 2023); zero beyond its
    length. The squash passes its gradient straight through (``squash_smooth``), so every tap keeps training."""

    def __init__(self, channels: int, filters: int, max_train_length: int, squash: float = 0.003,
                 smooth_width: int = 3):
        super().__init__()
        self.channels, self.filters, self.max_train_length = channels, filters, max_train_length
        self.squash, self.smooth_width = squash, smooth_width
        self.weight = nn.Parameter(torch.empty(channels * filters, max_train_length))
        tag_ssm(self, "weight")
        self.init_parameters()

    @torch.no_grad()
    def init_parameters(self, std: float = 0.02) -> None:
        # Fu et al.'s "double exponential" init: randn taps under exp(-rate_d * l / L_train), the rate spread
        # geometrically over channels from 1 (the slowest, still e^-1 at the last tap) to D/2 (multi-scale), one
        # rate per channel shared by its filters. Their scale is a constant 0.02 (tuned for kernels of thousands of
        # taps); short kernels take 1 / sqrt(L_train) instead, a fan-in scale that gives every training length a
        # kernel of O(1) energy (at L_train = 32, 0.02 left the taps ~10x weaker than S4D's and under the squash).
        # ``std`` is the model's Linear init and does not apply to taps.
        length, channels = self.max_train_length, self.channels
        t = torch.arange(length, dtype=torch.float32) / length
        rates = max(channels / 2, 1.0) ** (torch.arange(channels, dtype=torch.float32) / channels)
        envelope = torch.exp(-rates[:, None] * t[None, :]).repeat_interleave(self.filters, dim=0)
        scale = max(0.02, 1 / math.sqrt(length))
        init.copy_(self.weight, torch.randn(self.weight.shape) * scale * envelope)

    def forward(self, length: int) -> torch.Tensor:
        with torch.autocast(device_type=self.weight.device.type, enabled=False):
            k = squash_smooth(self.weight.float(), self.squash, self.smooth_width)[:, :length]
        if length > k.shape[-1]:
            k = torch.nn.functional.pad(k, (0, length - k.shape[-1]))
        return k.reshape(self.channels, self.filters, length)


KERNELS = ("s4d", "unstructured", "explicit")


def make_kernel(kind: str, channels: int, filters: int, *, state_size: int = 16, s4d_init: str = "lin",
                dt_min: float = 1e-3, dt_max: float = 1e-1, max_train_length: int = 1024,
                filter_hidden: int = 64, filter_bands: int = 16) -> nn.Module:
    """Build a kernel family by its config name (``kernel=`` in BlockStateConfig)."""
    if kind == "s4d":
        return S4DKernel(channels, filters, state_size, s4d_init, dt_min, dt_max)
    if kind == "unstructured":
        return ImplicitKernel(channels, filters, max_train_length, filter_hidden, filter_bands)
    if kind == "explicit":
        return ExplicitKernel(channels, filters, max_train_length)
    raise ValueError(f"kernel must be one of {list(KERNELS)}, got {kind!r}")


def kernel_from_config(config, kind: str, channels: int, filters: int) -> nn.Module:
    """``make_kernel`` with the kernel settings of a model config (``ssm_state_size``, ``s4d_init``, ``ssm_dt_*``,
    ``max_train_length``, ``filter_*``): BST's SSM (``kind = config.kernel``) and GSS's narrow branch
    (``config.gss_kernel``) read the same fields."""
    return make_kernel(kind, channels, filters, state_size=config.ssm_state_size, s4d_init=config.s4d_init,
                       dt_min=config.ssm_dt_min, dt_max=config.ssm_dt_max, max_train_length=config.max_train_length,
                       filter_hidden=config.filter_hidden_size, filter_bands=config.filter_num_bands)


class LongConvSSM(nn.Module):
    """u (B, L, D) -> y (B, D, C, L) fp32: causal FFT convolution with C kernels per channel, plus D skip."""

    def __init__(self, channels: int, filters: int, kernel: nn.Module):
        super().__init__()
        self.channels, self.filters = channels, filters
        self.kernel = kernel
        self.skip = nn.Parameter(torch.empty(channels, filters))
        tag_ssm(self, "skip")
        self.init_parameters()

    @torch.no_grad()
    def init_parameters(self, std: float = 0.02) -> None:
        init.normal_(self.skip, 0.0, 1.0)

    def _apply(self, fn, recurse: bool = True):
        """``model.to(torch.bfloat16)`` / ``.half()`` move the SSM's parameters (and gradients) but make them fp32,
        not half precision, like Hugging Face's ``_keep_in_fp32_modules``: S4D's dt, A and the long kernels lose
        their tails in half precision, and the kernels and FFTs run in fp32 anyway. Other conversions (device,
        fp64) apply unchanged."""

        def keep_fp32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if t.is_floating_point() and out.dtype in (torch.bfloat16, torch.float16):
                return t.to(device=out.device, dtype=torch.float32)  # fp32 values stay exact: no round trip
            return out

        return super()._apply(keep_fp32, recurse)

    def forward(self, u: torch.Tensor, carry=None, start: int = 0, tokens: bool = False) -> torch.Tensor:
        """u (B, L, D) -> y (B, D, C, L). With ``carry`` (a LayerCache that has read ``start`` earlier tokens of
        every row), continue that stream: S4D adds the carried state's response, other kernels convolve over the
        kept history too. Exact: equal to one pass over the whole stream. ``tokens=True`` (no carry): the same
        y in the token-major layout (C, B, L, D), see ``tokens``."""
        if tokens:
            return self.tokens(u)
        length = u.shape[1]
        if carry is None or start == 0:
            return fft_causal_conv(u.transpose(1, 2), self.kernel(length), self.skip)
        if self.recurrent:
            k = self.kernel
            y = fft_causal_conv(u.transpose(1, 2), k(length), self.skip)
            response = s4d_state_response(k.log_dt, k.log_a_real, k.a_imag, k.c, carry.ssm_state, length)
            return y + response.view(u.shape[0], self.channels, self.filters, length)
        whole = torch.cat([carry.history[..., :start], u.transpose(1, 2).float()], dim=-1)
        return fft_causal_conv(whole, self.kernel(whole.shape[-1]), self.skip)[..., start:]

    def tokens(self, u: torch.Tensor) -> torch.Tensor:
        """u (B, L, D) -> y (C, B, L, D) fp32 = ``forward(u).permute(2, 0, 3, 1)``, made in that layout: S4D
        chunk by chunk through its state (``s4d_chunked_conv``, ``s4d_chunked_bank`` for C filters), the other
        kernels by FFT per group of channels."""
        k = self.kernel
        if isinstance(k, S4DKernel) and self.filters == 1:
            return s4d_chunked_conv(k.log_dt, k.log_a_real, k.a_imag, k.c, u, self.skip[:, 0]).unsqueeze(0)
        if isinstance(k, S4DKernel):  # MH's bank: every filter of a channel reads that channel's chunks at once
            return s4d_chunked_bank(k.log_dt, k.log_a_real, k.a_imag, k.c, u, self.filters, self.skip.flatten())
        return fft_causal_conv_tokens(u, k(u.shape[1]), self.skip, channel_group(self.filters, fft_size(u.shape[1])))

    def mean_filter(self, u: torch.Tensor) -> torch.Tensor:
        """u (B, L, D) -> the output averaged over the C filters, (B, L, D) fp32, as one convolution with the
        mean kernel (convolution is linear), so no (B, D, C, L) output is formed."""
        length = u.shape[1]
        k = self.kernel(length).mean(1)
        return fft_causal_conv(u.transpose(1, 2), k, self.skip.mean(1)).transpose(1, 2)

    def block_ends(self, u: torch.Tensor, block: int, count: int) -> torch.Tensor:
        """Only the outputs at positions block-1, 2*block-1, ... (``count`` of them): u (B, L, D) -> (B, D, C,
        count), fp32. S4D gets them through its state (``s4d_block_ends``), without the (B, D, C, L) output."""
        u = u[:, : count * block].transpose(1, 2)
        if count == 0:  # one block: nothing before it
            return u.new_zeros(u.shape[0], self.channels, self.filters, 0, dtype=torch.float32)
        if self.recurrent:
            k = self.kernel
            with torch.autocast(device_type=u.device.type, enabled=False):
                y = s4d_block_ends(k.log_dt, k.log_a_real, k.a_imag, k.c, u, block)
                return y + self.skip.float().unsqueeze(-1) * u[..., block - 1 :: block].float().unsqueeze(2)
        return fft_causal_conv(u, self.kernel(u.shape[-1]), self.skip)[..., block - 1 :: block]

    # -- streaming ------------------------------------------------------------------------------------------
    @property
    def recurrent(self) -> bool:
        """S4D kernels run as their exact diagonal recurrence; the others convolve the kept input history."""
        return isinstance(self.kernel, S4DKernel)

    def _per_filter(self, u: torch.Tensor) -> torch.Tensor:
        """(B, D, ...) -> (B, D*C, ...): filter (d, c) of the kernel bank reads channel d."""
        return u.repeat_interleave(self.filters, dim=1) if self.filters > 1 else u

    @torch.no_grad()
    def fill_cache(self, cache, u: torch.Tensor, lengths: torch.Tensor, start: int = 0) -> None:
        """After a parallel pass over u (B, T, D) with lengths[b] real tokens per row (following ``start``
        tokens already in the cache), keep the SSM state (S4D) or the input history (other kernels)."""
        bsz, total = u.shape[0], u.shape[1]
        t = torch.arange(total, device=u.device)
        if self.recurrent:
            # right-align each row (zeros in front leave a zero state unchanged), then one state at the end
            index = t[None, :] + (lengths[:, None] - total)
            aligned = u.gather(1, index.clamp(min=0)[..., None].expand(-1, -1, u.shape[-1]))
            aligned = aligned * (index >= 0)[..., None]
            k = self.kernel
            inputs = self._per_filter(aligned.transpose(1, 2))
            # the carried state lives through lengths[b] real steps of row b, not the padded chunk's T
            x0 = cache.ssm_state if start > 0 else None
            cache.ssm_state = s4d_final_state(k.log_dt, k.log_a_real, k.a_imag, inputs, x0=x0, x0_steps=lengths)
        else:
            history = (u * (t[None, :] < lengths[:, None])[..., None]).transpose(1, 2).float()
            old = cache.history if start > 0 else None
            cache.history = grow(old, (bsz, self.channels, start + total), start + total, None, 2, torch.float32,
                                 u.device)
            cache.history[..., start : start + total] = history
            cache.kernel = self.kernel(cache.history.shape[-1]).detach()

    def _recurrent_step(self, cache, u: torch.Tensor) -> torch.Tensor:
        """S4D / DSS: u (B, D) fp32 -> y (B, D, C); the state (B, D*C, m) complex is updated in place."""
        bsz = u.shape[0]
        abar, bbar, c = self._step_coefficients()
        state = cache.ssm_state
        if state is None or not state.is_contiguous():
            state = torch.zeros(bsz, self.channels * self.filters, abar.shape[-1], dtype=abar.dtype,
                                device=u.device) if state is None else state.contiguous()
        # x' = Abar x + Bbar u in place, (B, D, C, m): channel d feeds its C filters by broadcasting
        x = s4d_update_(state.view(bsz, self.channels, self.filters, -1), abar, bbar, u.reshape(bsz, -1, 1, 1))
        cache.ssm_state = state
        # y = 2 Re(sum_m C x) + skip u as real products over (m, re/im), with 2 and the sign folded in c
        y = (torch.view_as_real(x) * c).sum((-2, -1))
        return torch.addcmul(y, self.skip.float(), u.unsqueeze(-1))

    @step_constant
    def _step_coefficients(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """S4D's discretised (Abar, Bbar) as (D, C, m) complex and 2 (Re C, -Im C) as (D, C, m, 2) real, computed
        once per parameter version instead of per token."""
        k = self.kernel

        def build():
            abar, bbar, c = s4d_discretize(k.log_dt, k.log_a_real, k.a_imag, k.c)
            shape = (self.channels, self.filters, abar.shape[-1])
            c2 = 2 * torch.stack([c.real, -c.imag], dim=-1)
            return abar.view(shape), bbar.view(shape), c2.view(*shape, 2)

        return cached_on(self, "step_coefficients", list(k.parameters()), build)

    @no_grad_step
    def step(self, cache, u: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """u (B, D) at positions (B,) -> y (B, D, C), fp32, equal to the convolution's output there."""
        bsz = u.shape[0]
        if self.recurrent and u.dtype is torch.float32 and not torch.is_autocast_enabled(u.device.type):
            return self._recurrent_step(cache, u)  # fp32 already, no autocast to turn off
        with torch.autocast(device_type=u.device.type, enabled=False):
            u = u.float()
            if self.recurrent:
                return self._recurrent_step(cache, u)
            else:
                needed = int(cache.positions_on_host(position).max()) + 1  # the mirror: no sync
                old = 0 if cache.history is None else cache.history.shape[-1]
                cache.history = grow(cache.history, (bsz, self.channels, needed), needed, None, 2, torch.float32,
                                     u.device)
                if cache.history.shape[-1] != old or cache.kernel is None:
                    cache.kernel = self.kernel(cache.history.shape[-1]).detach().float()
                cache.history[torch.arange(bsz, device=u.device), :, position] = u
                lag = position[:, None] - torch.arange(cache.history.shape[-1], device=u.device)[None, :]  # (B, T)
                taps = cache.kernel[:, :, lag.clamp(min=0)] * (lag >= 0)  # (D, C, B, T)
                y = torch.einsum("dcbs,bds->bdc", taps, cache.history)
            return y + self.skip.float() * u.unsqueeze(-1)
