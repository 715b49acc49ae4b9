"""Workers that tests start with ``torch.multiprocessing`` (spawn): a spawned child imports the worker by module
name, which a test module imported by path (pytest's importlib mode) does not have; ``helpers.distributed`` does,
since tests/ is on the path the child inherits."""

from __future__ import annotations

import os
import socket

import torch

from blockstate.registry import create_model
from helpers.models import VOCAB, small_overrides


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_lm() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("bst-sh-s4", size="tiny", **{**small_overrides("bst-sh-s4"), "num_hidden_layers": 2,
                                                     "bst_layers": [0]})


def clip_worker(rank: int, world: int, port: int, max_norm: float, reference: float, errors) -> None:
    """One FSDP2 rank: half the batch, then ``clip_gradients``. ``get_total_norm`` is made to return the norm as a
    partial DTensor, as torch releases before the replicated DTensor norm did; ``float()`` of it is this shard's."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from blockstate.training.steps import clip_gradients

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.tensor._ops._math_ops import _NormPartial

        def partial_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None):
            local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in local]))
            return DTensor.from_local(norm, mesh, [_NormPartial(2)])

        mesh = init_device_mesh("cpu", (world,))
        model = tiny_lm()
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        torch.manual_seed(1)
        x = torch.randint(0, VOCAB, (4, 32))[2 * rank : 2 * rank + 2]
        model(x, labels=x).loss.backward()
        torch.nn.utils.get_total_norm = partial_norm
        torch.nn.utils.clip_grad._get_total_norm = partial_norm
        norm = clip_gradients(model, max_norm)
        after = float(torch.linalg.vector_norm(torch.stack([p.grad.full_tensor().norm() for p in model.parameters()])))
        if abs(norm - reference) > 1e-5 * reference or abs(after - max_norm) > 1e-5:
            errors.put(f"rank {rank}: clip norm {norm:.6f} (1 process: {reference:.6f}), norm after clipping "
                       f"{after:.6f} (max_norm {max_norm})")
    except Exception as error:  # noqa: BLE001 (reported to the parent, which fails the test)
        errors.put(f"rank {rank}: {type(error).__name__}: {error}")
    finally:
        dist.destroy_process_group()
