"""Faults during training: NaN / inf steps, SIGKILL at a random step, SIGTERM / SIGINT, a full disk.

Every fault ends in one of two states, and the tests check which: training went on with the weights intact,
or it stopped with a one-line error / a documented exit code, leaving a checkpoint that resumes to exactly the
weights of the uninterrupted run (CPU, fp32).

The SIGKILL / SIGTERM steps are random; ``BLOCKSTATE_FAULT_SEED=<n>`` replays a run (the seed is printed, and
named in every assertion message).
"""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.training import TINY_YAML as BASE_YAML
from helpers.training import InfGrad, write_corpus
from safetensors.torch import load_file

import blockstate.training.steps as steps_mod
from blockstate.cli.main import main
from blockstate.data import BytesTokenizer
from blockstate.registry import create_model as build_model
from blockstate.runtime import checkpoint as ckpt_io
from blockstate.training import TrainConfig
from blockstate.training.metrics import MetricsLogger, read_metrics
from blockstate.training.optim import build_optimizer, group_of_parameters
from blockstate.training.steps import clip_gradients

TINY_YAML = BASE_YAML + "precision: fp32\nfinal_eval: false\n"
NAN = float("nan")


def fault_seed() -> int:
    seed = int(os.environ.get("BLOCKSTATE_FAULT_SEED") or random.SystemRandom().randrange(1_000_000))
    print(f"fault seed {seed} (replay with BLOCKSTATE_FAULT_SEED={seed})")
    return seed


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    corpus = write_corpus(root / "corpus")
    (root / "tiny.yaml").write_text(TINY_YAML + f"data: {corpus}\ncache_dir: {root / 'cache'}\n")
    return root


def base(env: Path, out: Path, *args: str) -> list[str]:
    return ["train", "--config", str(env / "tiny.yaml"), "--output", str(out), *args]


@pytest.fixture(scope="module")
def reference(env) -> Path:
    """The uninterrupted 6-step run (checkpoints every 2 steps) that faulted runs must reproduce."""
    assert main(base(env, env / "reference", "--steps", "6", "--save-every", "2")) == 0
    return env / "reference"


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "model.safetensors")


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"}


# -- non-finite loss and gradients ---------------------------------------------------------------------------
def inject(monkeypatch, bad_steps, kind: str = "loss", poison_carry: bool = False) -> list:
    """Make the loss NaN (or its gradient inf) on the given steps (grad_accum 1: call i = step i); returns the
    weights seen at each call (= after the previous step) and the carry each call received."""
    real = steps_mod.step_nll
    seen = []

    def fake(model, batch, device, autocast, carry=None, stateful=False):
        seen.append(({n: p.detach().clone() for n, p in model.named_parameters()}, carry))
        nll, new_carry = real(model, batch, device, autocast, carry, stateful)
        if len(seen) in bad_steps:
            nll = nll * NAN if kind == "loss" else InfGrad.apply(nll)
            if poison_carry and new_carry is not None:
                new_carry = type(new_carry)(*[tuple(t * NAN for t in field) for field in new_carry])
        return nll, new_carry

    monkeypatch.setattr(steps_mod, "step_nll", fake)
    return seen


def equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_a_non_finite_step_is_skipped_with_the_weights_untouched(env, tmp_path, monkeypatch, capsys, kind):
    seen = inject(monkeypatch, {3}, kind)
    run = tmp_path / "run"
    assert main(base(env, run, "--steps", "6", "--save-every", "4")) == 0
    out = capsys.readouterr()
    after = [w for w, _ in seen[1:]] + [weights(run / "checkpoints" / "step-0000006")]  # after step 1..6
    assert equal(after[2], after[1])  # step 3 left every weight as step 2 did
    assert not equal(after[3], after[2]) and not equal(after[5], after[4])  # and training went on
    assert all(torch.isfinite(v).all() for v in after[-1].values())
    assert "step 3: the" in out.err and "optimiser step skipped (1 skipped so far" in out.err
    assert "skipped: 1 optimiser step(s)" in out.out  # the final summary
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "skip"] == [3]
    assert [r["skipped_steps"] for r in records if r["kind"] == "train"] == [0, 0, 1, 1, 1, 1]
    assert [r["step"] for r in records if r["kind"] == "train" and r["loss"] is None] == [3]  # no loss to log
    state = json.loads((run / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1  # kept across a resume
    assert json.loads((run / "results.json").read_text())["skipped_steps"] == 1


def test_a_poisoned_carry_is_dropped(env, tmp_path, monkeypatch):
    """A stateful model's carried state that went NaN with the skipped step does not reach the next segment."""
    seen = inject(monkeypatch, {2}, poison_carry=True)
    slide = tmp_path / "slide.yaml"  # without BST's S, which slide has not
    slide.write_text((env / "tiny.yaml").read_text().replace(",\n             num_context_states: 4}", "}"))
    assert main(["train", "--config", str(slide), "--output", str(tmp_path / "slide"), "--model", "slide",
                 "--steps", "3", "--save-every", "0"]) == 0
    assert seen[1][1] is not None and seen[2][1] is None  # step 3 started from a fresh state


def test_too_many_non_finite_steps_in_a_row_stop_the_run(env, tmp_path, monkeypatch, capsys):
    inject(monkeypatch, set(range(3, 100)))
    run = tmp_path / "run"
    rc = main(base(env, run, "--steps", "20", "--save-every", "2", "--max-skipped-steps", "4"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "Traceback" not in "".join(err)
    assert err[-1].startswith("blockstate train: error: the loss or gradient was not finite for 4 steps in a row "
                              "(steps 3-6; weights kept from step 2)"), err[-1]
    latest = ckpt_io.latest_checkpoint(run)
    assert latest.name in err[-1] and "--max-skipped-steps" in err[-1]
    ckpt_io.verify(latest)
    assert same_weights(latest, run / "checkpoints" / "step-0000002")  # the skipped steps changed nothing
    assert all(torch.isfinite(v).all() for v in weights(latest).values())


def test_gradients_are_clipped():
    model = build_model("bst-sh-s4", "tiny", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_context_states=4, block_size=16, max_train_length=64)
    ids = torch.randint(0, 200, (2, 32))
    (model(ids, labels=ids).loss * 1e4).backward()
    norm = clip_gradients(model, 1.0)
    assert isinstance(norm, torch.Tensor) and norm.shape == ()  # on the device: the caller reads it when it must
    after = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    assert float(norm) > 10 and float(after) == pytest.approx(1.0, rel=1e-4)
    assert float(clip_gradients(model, 0.0)) == pytest.approx(float(after), rel=1e-5)  # 0 = measure only


# -- signals ------------------------------------------------------------------------------------------------
def test_sigint_saves_the_step_and_resume_reproduces_the_run(env, reference, tmp_path, monkeypatch, capsys):
    real, calls = steps_mod.step_nll, []

    def interrupt_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # handled after this step: checkpoint, then stop
        return real(*args, **kwargs)

    monkeypatch.setattr(steps_mod, "step_nll", interrupt_at_step_3)
    run = tmp_path / "run"
    assert main(base(env, run, "--steps", "6", "--save-every", "2")) == 130
    out = capsys.readouterr().out
    assert "stopped by SIGINT at step 3" in out and f"blockstate train --resume {run}" in out
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    monkeypatch.undo()
    assert main(["train", "--resume", str(run)]) == 0
    assert train_losses(run) == train_losses(reference)
    assert same_weights(run / "checkpoints" / "step-0000006", reference / "checkpoints" / "step-0000006")


def cli(env: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "blockstate", "train", "--config", str(env / "tiny.yaml"), "--threads", "1", *args]


def run_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def wait_for_step(proc: subprocess.Popen, run: Path, step: int, what: str, timeout: float = 120) -> int:
    """Poll metrics.jsonl (flushed per line) until the run logged ``step``; returns the last step logged."""
    deadline = time.monotonic() + timeout
    while True:
        steps = train_losses(run) if (run / "metrics.jsonl").is_file() else {}
        if steps and max(steps) >= step:
            return max(steps)
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"{what}: step {step} never came (rc {proc.returncode}): {out[-1500:]} {err[-1500:]}")
        time.sleep(0.002)


def test_sigkill_at_a_random_step_then_resume_equals_the_uninterrupted_run(env, tmp_path):
    seed = fault_seed()
    rnd = random.Random(seed)
    total, every = 120, 7
    kill_at, delay = rnd.randint(every + 1, total - 20), rnd.uniform(0.0, 0.02)
    what = f"seed {seed}: SIGKILL at step {kill_at} + {delay * 1000:.0f} ms"
    print(what)
    steps = ["--steps", str(total), "--save-every", str(every)]
    ref = subprocess.Popen(cli(env, *steps, "--output", str(tmp_path / "ref")), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=run_env())  # alongside: one thread each
    run = tmp_path / "killed"
    proc = subprocess.Popen(cli(env, *steps, "--output", str(run)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=run_env())
    wait_for_step(proc, run, kill_at, what)
    time.sleep(delay)  # somewhere inside a step, or inside a checkpoint save
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, what
    logged = max(train_losses(run))
    assert logged < total, f"{what}: the run finished before the kill"
    ckpt = ckpt_io.latest_checkpoint(run)
    ckpt_io.verify(ckpt)  # whatever the moment of the kill, the newest checkpoint is complete
    print(f"{what}: killed after step {logged}, resuming from {ckpt.name}")
    res = subprocess.run(cli(env, "--resume", str(run)), capture_output=True, text=True, env=run_env(), timeout=300)
    assert res.returncode == 0, f"{what}: {res.stderr[-2000:]}"
    assert f"resumed at step {int(ckpt.name[5:])}" in res.stdout, what
    assert not list((run / "checkpoints").glob(".tmp-*")), what  # a save cut by the kill is redone and cleaned
    ref_out, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err
    assert train_losses(run) == train_losses(tmp_path / "ref"), what  # every step, bit for bit (CPU)
    final = f"step-{total:07d}"
    assert same_weights(run / "checkpoints" / final, tmp_path / "ref" / "checkpoints" / final), what
    a, b = (load_file(r / "checkpoints" / final / "optimizer.safetensors") for r in (run, tmp_path / "ref"))
    assert all(torch.equal(a[k], b[k]) for k in a), what


def test_sigterm_at_a_random_step_saves_and_exits_143(env, tmp_path):
    seed = fault_seed()
    stop_at = random.Random(seed).randint(3, 60)
    what = f"seed {seed}: SIGTERM at step {stop_at}"
    run = tmp_path / "term"
    proc = subprocess.Popen(cli(env, "--steps", "400", "--save-every", "50", "--output", str(run)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env())
    wait_for_step(proc, run, stop_at, what)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, f"{what}: {err[-2000:]}"
    assert "Traceback" not in err, what
    stopped = max(train_losses(run))
    assert f"stopped by SIGTERM at step {stopped}" in out and f"blockstate train --resume {run}" in out, what
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{stopped:07d}", what  # the step the signal stopped at, not the last periodic save
    ckpt_io.verify(run / "checkpoints" / latest)
    res = subprocess.run(cli(env, "--resume", str(run), "--steps", str(stopped + 2)), capture_output=True,
                         text=True, env=run_env(), timeout=300)
    assert res.returncode == 0 and max(train_losses(run)) == stopped + 2, f"{what}: {res.stderr[-2000:]}"


# -- a full disk ----------------------------------------------------------------------------------------------
def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_a_save_stops_with_one_line_and_keeps_the_last_checkpoint(env, reference, tmp_path,
                                                                                  monkeypatch, capsys):
    real = ckpt_io.save_file

    def full_at_step_4(tensors, path, *args, **kwargs):
        if "step-0000004" in str(path):
            enospc()
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt_io, "save_file", full_at_step_4)
    run = tmp_path / "run"
    assert main(base(env, run, "--steps", "6", "--save-every", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"no space left on the device of {run} while writing checkpoint step-0000004" in err
    assert "is intact" in err
    root = run / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-0000002" and ckpt_io.latest_checkpoint(run).name == \
        "step-0000002"
    assert not list(root.glob(".tmp-*")) and not list(root.glob(".latest*"))
    ckpt_io.verify(root / "step-0000002")
    monkeypatch.undo()  # space freed: resuming gives the uninterrupted run
    assert main(["train", "--resume", str(run)]) == 0
    assert same_weights(root / "step-0000006", reference / "checkpoints" / "step-0000006")


def _tiny_save(run: Path, step: int, model, opt, monkeypatch=None) -> Path:
    return ckpt_io.save_checkpoint(run, step, model=model, model_state=None, optimizer_state=opt.state_dict(),
                                   trainer_state={"step": step, "run_id": "r"}, train_config={},
                                   tokenizer=BytesTokenizer(), keep=2)


def test_disk_full_at_every_write_of_a_save_leaves_a_verified_latest(tmp_path, monkeypatch):
    """Fault injection at each write operation of a checkpoint save in turn (tensors, JSON, model, tokenizer,
    manifest, the renames, the ``latest`` pointer, pruning): the error names the full disk, no temporary file is
    left, and ``latest`` always leads to a complete, verified checkpoint (the previous one or the new one)."""
    model = build_model("bst-sh-s4", "tiny", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_context_states=4, block_size=16, max_train_length=64)
    opt = build_optimizer(model, group_of_parameters(model), TrainConfig())
    template = tmp_path / "template"
    for step in (1, 2):
        _tiny_save(template, step, model, opt)
    calls: list[str] = []
    fail_at = [0]

    def wrap(owner, name):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls.append(name)
            if len(calls) == fail_at[0]:
                enospc()
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    for name in ("save_file", "write_json", "_save_model", "write_manifest", "atomic_write_text", "fsync_path"):
        wrap(ckpt_io, name)
    wrap(BytesTokenizer, "save")
    wrap(os, "replace")  # the renames: tmp -> step, latest.tmp -> latest, old step -> trash

    shutil.copytree(template, tmp_path / "count")
    _tiny_save(tmp_path / "count", 3, model, opt)
    n = len(calls)
    print(f"{n} write operations in one save, each failed in turn: {calls}")
    assert n >= 12 and {"save_file", "_save_model", "write_manifest", "replace", "save"} <= set(calls)
    for k in range(1, n + 1):
        run = tmp_path / f"fail-{k}"
        shutil.copytree(template, run)
        calls.clear()
        fail_at[0] = k
        with pytest.raises(OSError, match="no space left on the device") as info:
            _tiny_save(run, 3, model, opt)
        fail_at[0] = 0
        assert "\n" not in str(info.value)
        root = run / "checkpoints"
        assert not list(root.glob(".tmp-*")) and not list(root.glob(".latest.tmp*")), (k, calls[-1])
        latest = ckpt_io.latest_checkpoint(run)
        assert latest.name in ("step-0000002", "step-0000003"), (k, calls[-1])
        ckpt_io.verify(latest)
        ckpt_io.verify(root / "step-0000002")
        pointer = (root / "latest").read_text().strip()
        assert ckpt_io.is_checkpoint(root / pointer), (k, calls[-1], pointer)


def test_disk_full_while_logging_metrics_is_one_clear_error(tmp_path):
    metrics = MetricsLogger(tmp_path, tensorboard=False)

    class Full:
        def write(self, text):
            enospc()

        def close(self):
            pass

    metrics._file = Full()
    with pytest.raises(OSError, match=f"no space left on the device of {tmp_path} while writing metrics.jsonl"):
        metrics.log("train", 1, loss=1.0)
