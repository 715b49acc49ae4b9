"""Process groups, DDP / FSDP2 wrapping and the few collectives the trainer needs.

Launch with torchrun (single or multi node, its usual rendezvous flags)::

    torchrun --nproc_per_node=N -m blockstate train ... --parallel ddp      # or fsdp

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; the backend is NCCL on CUDA and gloo on CPU. Without those
variables everything here degrades to a single process and the collectives are no-ops.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from blockstate.runtime.device import pick_device


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    parallel: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1




def init_distributed(parallel: str, device: str) -> DistInfo:
    """Join the torchrun process group if there is one; ``parallel`` must then be ddp or fsdp."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=pick_device(device), parallel="none" if parallel == "none" else parallel)
    if parallel == "none":
        raise ValueError(f"launched by torchrun with WORLD_SIZE={world} but --parallel none: pass --parallel ddp "
                         "or --parallel fsdp (or run without torchrun)")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank, world, local_rank, dev, parallel)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce(values: list[float], info: DistInfo, op: str = "sum") -> list[float]:
    """Sum (or max) a few Python numbers over ranks, in float64 so token counts stay exact."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_tensor(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t)
    return t


def broadcast_object(value: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(value: Any, info: DistInfo) -> list[Any] | None:
    """Every rank's ``value`` as a list on rank 0 (None elsewhere); small objects only (RNG states, carries)."""
    if not info.enabled:
        return [value]
    out = [None] * info.world_size if info.is_main else None
    dist.gather_object(value, out, dst=0)
    return out


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP, or FSDP2 (``fully_shard`` on every layer, then the root, which holds the tied embedding / head).

    Mixed precision is autocast in the trainer, not FSDP's param_dtype: casting parameters would put the SSM
    parameters (kept in fp32 by design) into bf16.
    """
    if not info.enabled or info.parallel == "none":
        return model
    if info.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    mesh = None
    if info.device.type == "cpu":  # FSDP2 defaults to a CUDA mesh; on CPU it needs an explicit gloo mesh
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (info.world_size,))
    layers = getattr(getattr(model, "model", None), "layers", None)
    for layer in layers if layers is not None else []:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def no_sync(model: nn.Module, info: DistInfo, last: bool) -> AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if not info.enabled or last:
        if info.parallel == "fsdp" and info.enabled:
            model.set_requires_gradient_sync(True)
        return nullcontext()
    if info.parallel == "ddp":
        return model.no_sync()
    model.set_requires_gradient_sync(False)
    return nullcontext()


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None, info: DistInfo
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Unsharded model and optimiser state on CPU, keyed by parameter name (identical for every wrapper)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    target = model if info.parallel == "fsdp" else unwrap(model)
    model_state = get_model_state_dict(target, options=options)
    opt_state = None if optimizer is None else get_optimizer_state_dict(target, optimizer, options=options)
    return model_state, opt_state


def load_optimizer_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                              info: DistInfo) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    target = model if info.parallel == "fsdp" else unwrap(model)
    set_optimizer_state_dict(target, optimizer, state, options=StateDictOptions(full_state_dict=True))
