"""Parameter groups, optimisers (AdamW, Adafactor) and learning-rate schedules.

Three groups:

- ``decay``: matrices of attention / FFN projections: full learning rate, weight decay;
- ``no_decay``: norms, biases, embeddings (the tied LM head included), the MF variant's learned context
  vectors and the Block-Recurrent layer's initial state and state IDs: full learning rate, no weight decay
  (decaying them only shrinks scales the norms undo; meliad exempts BRecT's state vectors too);
- ``ssm``: parameters marked by their layers (``layers.ssm_parameter_names``: S4D's A, B/C, dt; implicit-filter
  MLPs; explicit kernels; D skip):
  a lower learning rate and no weight decay, as in S4 / Hyena, whose kernels diverge at transformer rates.

The schedule is a pure function of the step, so resuming needs only the step number.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from blockstate.layers import ssm_parameter_names
from blockstate.training.config import TrainConfig

DEFAULT_SSM_LR_CAP = 1e-3
NO_DECAY_NAMES = ("initial_context", "context_ids", "initial_state", "state_ids")


def group_of_parameters(model: nn.Module) -> dict[str, str]:
    """Parameter name -> ``decay`` / ``no_decay`` / ``ssm`` (computed on the unwrapped model, before FSDP
    replaces the parameters)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    ssm = ssm_parameter_names(model)
    groups = {}
    for name, p in model.named_parameters():
        if name in ssm:
            groups[name] = "ssm"
        elif p.ndim < 2 or id(p) in embedding_ids or name.endswith(NO_DECAY_NAMES):
            groups[name] = "no_decay"
        else:
            groups[name] = "decay"
    return groups


def ssm_lr(cfg: TrainConfig) -> float:
    return cfg.ssm_lr if cfg.ssm_lr is not None else min(cfg.lr, DEFAULT_SSM_LR_CAP)


def build_optimizer(model: nn.Module, groups: dict[str, str], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or Adafactor over ``model``'s parameters, grouped by ``groups`` (from :func:`group_of_parameters`).

    Each param group records ``base_lr``; :func:`set_lr` scales it by the schedule. AdamW is fused where torch has
    a kernel for the parameters (:func:`fused_supported`; build it after moving the model to its device), foreach
    elsewhere; Adafactor has no fused kernel, so the trainer decides its skipped steps on the host.
    """
    lrs = {"decay": cfg.lr, "no_decay": cfg.lr, "ssm": ssm_lr(cfg)}
    wds = {"decay": cfg.weight_decay, "no_decay": 0.0, "ssm": 0.0}
    buckets: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "ssm": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            buckets[groups.get(name, "decay")].append(p)
    param_groups = [{"params": ps, "lr": lrs[g], "base_lr": lrs[g], "weight_decay": wds[g], "name": g}
                    for g, ps in buckets.items() if ps]
    if cfg.optimizer == "adamw":
        # fused where torch has the kernel (CPU, CUDA, ...): it skips a non-finite step on the device (``found_inf``,
        # ``steps.update``) and keeps its step counters there too; foreach elsewhere
        fused = fused_supported([p for ps in buckets.values() for p in ps])
        return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                                 **({"fused": True} if fused else {"foreach": True}))
    # Adafactor (Shazeer & Stern 2018; T5 / PaLM lineage): factored second moments, no first moment. torch's
    # version scales steps by the parameter RMS and caps the relative step at lr, which the schedule drives.
    return torch.optim.Adafactor(param_groups, lr=cfg.lr, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                                 foreach=True)


def fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes ``params``: floating point, on a device type it has a kernel for."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # the private helper moved: the device types torch 2.4+ supports
        devices = {"cpu", "cuda"}
    return bool(params) and all(torch.is_floating_point(p) and p.device.type in devices for p in params)


def lr_factor(step: int, cfg: TrainConfig, total_steps: int | None, progress: float | None = None) -> float:
    """Multiplier of the base learning rate for optimiser step ``step`` (0-based).

    Linear warmup over ``warmup_steps``, then: ``cosine`` decay to ``min_lr_ratio`` at ``total_steps``;
    ``inverse-sqrt`` (Transformer / T5 style, continuous at the end of warmup); or ``constant``. A time-budget
    run without a step count passes ``progress`` (the fraction of the budget spent after warmup) instead.
    """
    warmup = cfg.warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "inverse-sqrt":
        return math.sqrt(max(warmup, 1) / (step + 1))
    if progress is None:
        if total_steps is None:
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(1.0, max(0.0, progress))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Apply the schedule; returns the main group's learning rate (for logs)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]


def describe_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{"name": g.get("name"), "params": sum(p.numel() for p in g["params"]), "lr": g["base_lr"],
             "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
