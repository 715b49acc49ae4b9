"""The trainer's own step (``steps.train_step``) and loop without host-device syncs (issue 16), and the skipped
steps still exact: a non-finite step leaves weights and optimiser state bit-identical, and the loop, which reads
the steps' values only at log / validation / checkpoint steps and at the end, reports each with its own number.

Syncs are counted by ``helpers.syncs.SyncCounter`` (on CPU a simulated accelerator). The batches come from the
host, as the data loader hands them over; fused AdamW keeps its step counters on the parameters' device (not
declared host), a foreach optimiser (Adafactor) on the host. The counts print with -s for the report.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers.distributed import run_ranks, skip_worker
from helpers.syncs import DEVICE, counting
from helpers.training import TINY_YAML, InfGrad, write_corpus

import blockstate.training.steps as steps_mod
from blockstate.benchmarks.train_contestants import make_batch
from blockstate.cli.main import main
from blockstate.registry import carries_state, create_model, list_models
from blockstate.runtime.device import autocast_factory
from blockstate.training import TrainConfig, Trainer
from blockstate.training import distributed as D
from blockstate.training.config import load_config_file, merge
from blockstate.training.metrics import read_metrics
from blockstate.training.optim import build_optimizer, group_of_parameters
from blockstate.training.state import TrainState
from blockstate.training.steps import StepParts, resolve, skips_on_device, train_step

LENGTH = 64
NAN = float("nan")


def parts_for(name: str, optimizer: str = "adamw") -> tuple[StepParts, TrainState]:
    """``name`` at the tiny preset with the trainer's optimiser on one process, as ``blockstate train`` builds it."""
    torch.manual_seed(0)
    model = create_model(name, "tiny", max_train_length=LENGTH)
    if carries_state(model) and model.config.block_size >= LENGTH:  # a carried window must fit in L - 1 tokens
        torch.manual_seed(0)
        model = create_model(name, "tiny", max_train_length=LENGTH, block_size=LENGTH // 4)
    model = model.to(DEVICE).train()
    cfg = TrainConfig(optimizer=optimizer, schedule="constant", warmup_steps=0, precision="fp32")
    opt = build_optimizer(model, group_of_parameters(model), cfg)
    parts = StepParts(model, model, opt, cfg, D.DistInfo(device=DEVICE), autocast_factory("fp32", DEVICE),
                      carries_state(model))
    return parts, TrainState()


def host_step_counters(optimizer) -> list[torch.Tensor]:
    """A foreach optimiser's step counters, which torch keeps on the host (fused AdamW's live on the device)."""
    if skips_on_device(optimizer):
        return []
    return [s["step"] for s in optimizer.state.values() if isinstance(s.get("step"), torch.Tensor)]


def count_train_step(monkeypatch, name: str, optimizer: str = "adamw"):
    parts, state = parts_for(name, optimizer)
    vocab = int(parts.model.config.vocab_size)
    train_step(parts, state, [make_batch(vocab, 2, LENGTH, seed=0)])  # warm-up: optimiser state, lazy buffers
    batch = make_batch(vocab, 2, LENGTH, seed=1)
    counter = counting(monkeypatch, host=[*batch.values(), *host_step_counters(parts.optimizer)])
    with counter:
        m = train_step(parts, state, [batch])  # step 2: not a log step, nothing is read on the host
    resolve([m])
    assert m.step == 2 and m.count == 2 * (LENGTH - 1) and m.skipped is False and m.loss_sum > 0
    return counter, parts


@pytest.mark.parametrize("name", list_models())
def test_train_step_has_no_host_syncs(monkeypatch, name):
    """0 syncs; a stateful model (slide, transformer-xl, brect) reads its skip flag once, since a bad step's carry
    must be dropped on the host before the next segment."""
    counter, parts = count_train_step(monkeypatch, name)
    print(f"\ntrain_step {name}{' (stateful)' if parts.stateful else ''}: {counter.total} syncs {dict(counter.hits)}")
    assert skips_on_device(parts.optimizer)  # fused AdamW: the skip is decided on the device
    if parts.stateful:
        assert counter.total <= 1 and all(where.startswith("steps.py") for _, where in counter.hits), dict(counter.hits)
    else:
        assert counter.total == 0, dict(counter.hits)


def test_an_adafactor_train_step_reads_its_skip_flag_once(monkeypatch):
    """Adafactor has no fused kernel to skip on the device: the trainer reads the flag on the host (one sync), and
    torch's Adafactor itself reads two norms per parameter (``_adafactor.py``), which are not the trainer's."""
    counter, parts = count_train_step(monkeypatch, "bst-sh-s4", "adafactor")
    print(f"\ntrain_step bst-sh-s4 adafactor: {counter.total} syncs {dict(counter.hits)}")
    assert not skips_on_device(parts.optimizer)
    ours = {k: n for k, n in counter.hits.items() if not k[1].startswith("_adafactor.py")}
    assert list(ours.values()) == [1] and all(where.startswith("steps.py") for _, where in ours), dict(counter.hits)


# -- a non-finite step is skipped bit for bit ---------------------------------------------------------------------
def poison(monkeypatch, kind: str) -> None:
    real = steps_mod.step_nll

    def fake(*args, **kwargs):
        nll, carry = real(*args, **kwargs)
        return (nll * NAN if kind == "loss" else InfGrad.apply(nll)), carry

    monkeypatch.setattr(steps_mod, "step_nll", fake)


def snapshot(parts: StepParts) -> dict[str, torch.Tensor]:
    out = {f"param:{n}": p.detach().clone() for n, p in parts.model.named_parameters()}
    names = {id(p): n for n, p in parts.model.named_parameters()}
    for p, s in parts.optimizer.state.items():
        out.update({f"{names[id(p)]}:{k}": v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)})
    return out


@pytest.mark.parametrize("name, optimizer", [("bst-sh-s4", "adamw"), ("bst-sh-s4", "adafactor"), ("slide", "adamw")])
@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_a_non_finite_step_leaves_weights_and_optimiser_state_bit_identical(monkeypatch, name, optimizer, kind):
    parts, state = parts_for(name, optimizer)
    vocab = int(parts.model.config.vocab_size)
    for seed in (0, 1):
        train_step(parts, state, [make_batch(vocab, 2, LENGTH, seed=seed)])
    before = snapshot(parts)
    assert any(k.endswith(":exp_avg_sq") or k.endswith(":row_var") for k in before)  # moments exist
    if optimizer == "adamw":
        steps = [s["step"] for s in parts.optimizer.state.values()]
        assert skips_on_device(parts.optimizer) and all(s.device == DEVICE and float(s) == 2 for s in steps)
    with monkeypatch.context() as patch:
        poison(patch, kind)
        m = train_step(parts, state, [make_batch(vocab, 2, LENGTH, seed=2)])
    after = snapshot(parts)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed  # parameters, moments and step counters: bit for bit
    assert all(p.grad is None for p in parts.model.parameters())
    resolve([m])
    assert m.skipped is True and m.step == 3 and state.step == 3
    assert not math.isfinite(m.loss_sum if kind == "loss" else m.grad_norm)
    m = train_step(parts, state, [make_batch(vocab, 2, LENGTH, seed=3)])  # and the next good step updates again
    resolve([m])
    name, first = next(iter(parts.model.named_parameters()))
    assert m.skipped is False and not torch.equal(first, before[f"param:{name}"])


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_every_rank_skips_when_one_rank_is_not_finite(parallel):
    """2 gloo processes, the loss NaN on rank 1 only: both skip (the flag is all-reduced), bit for bit."""
    messages = run_ranks(skip_worker, parallel)
    assert not messages, messages


# -- the loop: one read per log step, exact reports --------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("syncs")
    corpus = write_corpus(root / "corpus")
    (root / "tiny.yaml").write_text(TINY_YAML + f"precision: fp32\nfinal_eval: false\ndata: {corpus}\n"
                                    f"cache_dir: {root / 'cache'}\n")
    return root


def test_the_loop_reads_the_device_once_per_log_step(env, tmp_path, monkeypatch):
    """Steps 1-4 of 5 (log every 5, no validation, no checkpoint in between) make no sync; step 5 reads all five
    steps' values at once."""
    cfg = merge(load_config_file(env / "tiny.yaml"), {"output": str(tmp_path / "run"), "steps": 5, "log_every": 5,
                                                      "save_every": 0, "eval_every": 0, "device": DEVICE.type})
    trainer = Trainer(cfg, log=lambda *a: None)
    trainer._new_dirs = []
    trainer.setup(D.init_distributed(cfg.parallel, cfg.device))
    batches = [next(trainer.loader) for _ in range(5 * cfg.grad_accum)]  # read outside the counter
    trainer.loader = iter(batches)
    counter = counting(monkeypatch, host=[t for b in batches for t in b.values()])
    with counter:
        trainer.train()
    trainer.metrics.close()
    print(f"\nTrainer.train, 5 steps, log every 5: {counter.total} syncs {dict(counter.hits)}")
    assert trainer.state.step == 5
    assert counter.total == 1 and all(where.startswith("steps.py") for _, where in counter.hits), dict(counter.hits)


def inject(monkeypatch, bad_steps) -> list:
    """The loss NaN on the given steps (grad_accum 1: call i = step i); returns the weights seen at each call."""
    real, seen = steps_mod.step_nll, []

    def fake(model, batch, device, autocast, carry=None, stateful=False):
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        nll, new_carry = real(model, batch, device, autocast, carry, stateful)
        return (nll * NAN if len(seen) in bad_steps else nll), new_carry

    monkeypatch.setattr(steps_mod, "step_nll", fake)
    return seen


def base(env, out, *args: str) -> list[str]:
    return ["train", "--config", str(env / "tiny.yaml"), "--output", str(out), *args]


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_skips_are_reported_with_their_own_steps_when_read_later(env, tmp_path, monkeypatch, capsys, optimizer):
    seen = inject(monkeypatch, {2, 3, 5})
    run = tmp_path / "run"
    assert main(base(env, run, "--steps", "8", "--log-every", "4", "--save-every", "0", "--optimizer",
                     optimizer)) == 0
    err = capsys.readouterr().err
    for step, so_far, in_a_row in [(2, 1, 1), (3, 2, 2), (5, 3, 1)]:
        assert f"step {step}: the loss is nan; optimiser step skipped ({so_far} skipped so far, {in_a_row} in a row)" \
            in err, err
    same = [all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(seen, seen[1:], strict=False)]
    assert same == [False, True, True, False, True, False, False]  # steps 2, 3 and 5 changed no weight
    records = read_metrics(run / "metrics.jsonl")
    assert [(r["step"], r["skipped_steps"]) for r in records if r["kind"] == "skip"] == [(2, 1), (3, 2), (5, 3)]
    train = [r for r in records if r["kind"] == "train"]
    assert [(r["step"], r["skipped_steps"]) for r in train] == [(4, 2), (8, 3)]
    assert all(r["loss"] is not None and r["loss"] > 0 for r in train)  # the updated steps' loss alone
    steps = [r["step"] for r in records]
    assert steps == sorted(steps)
    state = json.loads((run / "checkpoints" / "step-0000008" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 3 and json.loads((run / "results.json").read_text())["skipped_steps"] == 3


def test_too_many_skips_in_a_row_found_at_a_later_log_step_name_their_steps(env, tmp_path, monkeypatch, capsys):
    inject(monkeypatch, set(range(3, 100)))
    run = tmp_path / "run"
    rc = main(base(env, run, "--steps", "20", "--log-every", "5", "--save-every", "0", "--max-skipped-steps", "4"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "Traceback" not in "".join(err)
    assert err[-1].startswith("blockstate train: error: the loss or gradient was not finite for 4 steps in a row "
                              "(steps 3-6; weights kept from step 2; found at step 10, when the steps were read)"), \
        err[-1]
    skips = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "skip"]
    assert skips == [3, 4, 5, 6]
