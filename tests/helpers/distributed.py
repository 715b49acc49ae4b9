"""Workers that tests start with ``torch.multiprocessing`` (spawn): a spawned child imports the worker by module
name, which a test module imported by path (pytest's importlib mode) does not have; ``helpers.distributed`` does,
since tests/ is on the path the child inherits.

No run may hang the suite: ``run_ranks`` meets its ranks through a file store (no port to race for), gives every
collective a timeout, has each rank dump its stack and exit when its deadline passes, and kills what is left."""

from __future__ import annotations

import datetime
import faulthandler
import gc
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from blockstate.registry import create_model
from helpers.models import VOCAB, small_overrides

RANK_DEADLINE_S = 180.0  # a rank takes 5-15 s here; past this it is hung, not slow


def run_ranks(worker: Callable[..., str | None], *args, world: int = 2, deadline: float = RANK_DEADLINE_S) -> list[str]:
    """Run ``worker(rank, world, *args)`` on ``world`` spawned gloo ranks and return the problems they found (a
    worker returns one as a string, or raises). A rank that exits non-zero or outlives ``deadline`` fails the
    run with its reason."""
    ctx = torch.multiprocessing.get_context("spawn")
    errors = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "store")
        procs = torch.multiprocessing.start_processes(_rank_main, args=(world, store, deadline, worker, args, errors),
                                                      nprocs=world, join=False, start_method="spawn")
        end = time.monotonic() + deadline + 30  # each rank stops itself at ``deadline``; this is the backstop
        while not procs.join(timeout=1.0):
            if time.monotonic() > end:
                for p in procs.processes:
                    p.kill()
                raise TimeoutError(f"{world} ranks of {worker.__name__} still running after {deadline + 30:.0f} s")
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    return messages


def _rank_main(rank: int, world: int, store: str, deadline: float, worker: Callable[..., str | None], args: tuple,
               errors) -> None:
    """One rank: join the group, run ``worker``, then leave. Past ``deadline`` the rank prints every thread's stack
    and exits. The worker's objects are gone before the group is destroyed: a gloo group whose last holder (DDP's
    reducer) is freed after ``destroy_process_group`` can deadlock in its destructor (1 run in 5 here)."""
    import torch.distributed as dist

    faulthandler.dump_traceback_later(deadline, exit=True)
    if Path("/sys/class/net/lo").exists():  # ranks meet on loopback, whatever the host name resolves to
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=deadline / 2))
    try:
        problem = worker(rank, world, *args)
        if problem:
            errors.put(f"rank {rank}: {problem}")
    except Exception as error:  # noqa: BLE001 (reported to the parent, which fails the test)
        errors.put(f"rank {rank}: {type(error).__name__}: {error}")
    finally:
        gc.collect()
        dist.destroy_process_group()


def tiny_lm() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("bst-sh-s4", size="tiny", **{**small_overrides("bst-sh-s4"), "num_hidden_layers": 2,
                                                     "bst_layers": [0]})


def clip_worker(rank: int, world: int, max_norm: float, reference: float) -> str | None:
    """One FSDP2 rank: half the batch, then ``clip_gradients``. ``get_total_norm`` is made to return the norm as a
    partial DTensor, as torch releases before the replicated DTensor norm did; ``float()`` of it is this shard's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._ops._math_ops import _NormPartial

    from blockstate.training.steps import clip_gradients

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
    norm = float(clip_gradients(model, max_norm))  # a 0-d tensor on the gradients' device
    after = float(torch.linalg.vector_norm(torch.stack([p.grad.full_tensor().norm() for p in model.parameters()])))
    if abs(norm - reference) > 1e-5 * reference or abs(after - max_norm) > 1e-5:
        return (f"clip norm {norm:.6f} (1 process: {reference:.6f}), norm after clipping {after:.6f} "
                f"(max_norm {max_norm})")
    return None


def skip_worker(rank: int, world: int, parallel: str) -> str | None:
    """One rank of the trainer's ``train_step`` under DDP or FSDP2 (fused AdamW, gloo): a good step, then a step
    whose loss is NaN on rank 1 alone (its gradients finite: only the all-reduced flag tells rank 0), which every
    rank must skip bit for bit, then a good step again."""

    import blockstate.training.steps as steps_mod
    from blockstate.runtime.device import autocast_factory
    from blockstate.training import TrainConfig
    from blockstate.training import distributed as D
    from blockstate.training.optim import build_optimizer, group_of_parameters
    from blockstate.training.state import TrainState
    from blockstate.training.steps import StepParts, resolve, skips_on_device

    info = D.DistInfo(rank, world, 0, torch.device("cpu"), parallel)
    model = tiny_lm()
    groups = group_of_parameters(model)
    wrapped = D.wrap_model(model, info)
    cfg = TrainConfig(schedule="constant", warmup_steps=0, precision="fp32")
    opt = build_optimizer(model, groups, cfg)
    parts = StepParts(model, wrapped, opt, cfg, info, autocast_factory("fp32", info.device), False)
    state, real = TrainState(), steps_mod.step_nll

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    def snapshot():
        out = [local(p.detach()).clone() for p in model.parameters()]
        return out + [local(v).clone() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]

    def batch(seed):
        ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(seed))
        ids = ids[2 * rank : 2 * rank + 2]  # this rank's half of the global batch
        return {"input_ids": ids, "labels": ids.clone()}

    def nan_on_rank_1(*args, **kwargs):
        nll, carry = real(*args, **kwargs)
        return (nll + float("nan") if rank == 1 else nll), carry  # the gradients stay finite everywhere

    m = steps_mod.train_step(parts, state, [batch(0)])
    before = snapshot()
    steps_mod.step_nll = nan_on_rank_1
    bad = steps_mod.train_step(parts, state, [batch(1)])
    steps_mod.step_nll = real
    kept = all(torch.equal(a, b) for a, b in zip(before, snapshot(), strict=True))
    good = steps_mod.train_step(parts, state, [batch(2)])
    resolve([m, bad, good])
    moved = not all(torch.equal(a, b) for a, b in zip(before, snapshot(), strict=True))
    if not (skips_on_device(opt) and kept and moved and bad.skipped and not m.skipped and not good.skipped):
        return (f"{parallel}: fused {skips_on_device(opt)}, kept {kept}, moved after {moved}, "
                f"skipped {[m.skipped, bad.skipped, good.skipped]}")
    return None
