"""`blockstate bench train`: runs end to end on two tiny models, writes its files, refuses bad flags in one line."""

import json
import math

import pytest
import torch

from blockstate.benchmarks import train as bench
from blockstate.benchmarks import train_contestants
from blockstate.cli.main import main

# slide carries W = 64 keys/values across steps, so its segments must hold more than W tokens
FAST = ["--models", "bst-sh-s4,slide", "--lengths", "128,256", "--steps", "2", "--threads", "1"]


def test_bench_train_writes_table_json_and_png(tmp_path, capsys):
    assert main(["bench", "train", *FAST, "--no-memory", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "training tokens/s" in out and "torch" in out and "shared machine" in out
    payload = json.loads((tmp_path / "train.json").read_text())
    assert (tmp_path / "train.png").stat().st_size > 0
    assert payload["benchmark"] == "train" and payload["lengths"] == [128, 256] and payload["batch_size"] == 1
    assert payload["machine"]["device"] and "blockstate bench train" in payload["command"]
    assert set(payload["results"]) == {"bst-sh-s4", "slide"} and payload["stopped"] == {}
    for rows in payload["results"].values():
        assert [r["length"] for r in rows] == [128, 256]
        for r in rows:
            assert 0 < r["tokens_per_s_min"] <= r["tokens_per_s"] <= r["tokens_per_s_max"]
            assert math.isfinite(r["tokens_per_s"]) and r["parameters"] > 1e6 and r["state_mib"] > 0
            assert r["step_s"]["min"] <= r["step_s"]["median"] <= r["step_s"]["max"]
    # the registry matches every model's size to BST:SH:S4 within 5%
    params = payload["parameters"]
    assert abs(params["slide"] / params["bst-sh-s4"] - 1) < 0.05
    # a saved result re-renders without running anything
    assert main(["bench", "train", "--report", str(tmp_path / "train.json")]) == 0
    assert "| bst-sh-s4 |" in capsys.readouterr().out


def test_time_limit_stops_a_model_at_longer_lengths():
    grid = bench.run_grid(["bst-sh-s4", "gpt"], [128, 256], steps=1, time_limit=1e-6, memory=False,
                          log=lambda _: None)
    assert set(grid["stopped"]) == {"bst-sh-s4", "gpt"} and "128" in grid["stopped"]["gpt"]
    assert [r["length"] for r in grid["results"]["gpt"]] == [128]
    assert "stopped" in bench.table({"machine": {"device": "cpu", "torch": "x", "threads": 1}, "lengths": [128, 256],
                                     "size": "tiny", "batch_size": 1, "precision": "fp32", "steps": 1, "warmup": 1,
                                     "device": "cpu", "parameters": {}, **grid})


def test_a_training_step_changes_the_weights_and_carries_state():
    c = train_contestants.build("slide", "tiny", 128)
    before = [p.detach().clone() for p in c.model.parameters()]
    step = train_contestants.make_step(c, train_contestants.make_batch(257, 1, 128), torch.device("cpu"), "fp32")
    step()
    assert c.state.carry is not None and c.state.step == 1  # the trainer's step: the next continues from this one
    assert any(not torch.equal(a, p) for a, p in zip(before, c.model.parameters()))
    step()


@pytest.mark.slow
def test_cpu_memory_pass_measures_every_point(tmp_path):
    assert main(["bench", "train", *FAST, "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "train.json").read_text())
    assert "tracked op by op" in payload["memory_note"]
    assert all(r["peak_mib"] and r["peak_mib"] > 0 for rows in payload["results"].values() for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["--models", "bst-sh-s9"], "unknown model"),
    (["--models", ","], "--models"),
    (["--lengths", "4k,x"], "--lengths"),
    (["--batch-size", "0"], "--batch-size"),
    (["--steps", "0"], "--steps"),
    (["--time-limit", "0"], "--time-limit"),
    (["--size", "huge"], "--size"),
    (["--device", "tpu"], "--device"),
])
def test_bad_flags_give_one_line_and_exit_2(argv, message, tmp_path, capsys):
    assert main(["bench", "train", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "train.json").exists()


def test_the_bench_times_the_trainers_own_step(monkeypatch):
    import blockstate.training.steps as steps

    real, calls = steps.train_step, []

    def spy(parts, state, batches):
        calls.append(len(batches))
        return real(parts, state, batches)

    monkeypatch.setattr(steps, "train_step", spy)
    c = train_contestants.build("bst-sh-s4", "tiny", 64)
    train_contestants.make_step(c, train_contestants.make_batch(257, 1, 64), torch.device("cpu"), "fp32")()
    assert calls == [1] and c.state.step == 1 and c.state.tokens == 63
