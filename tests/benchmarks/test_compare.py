"""`blockstate compare`: two tiny models on a tiny corpus write the table, JSON and plot; a rerun skips finished
models; an interrupted comparison resumes; bad flags and changed settings give one line and exit 2."""

import json
import math
import os
import signal

import pytest
from helpers.training import write_corpus

from blockstate.cli.main import main

MODELS = "bst-sh-s4,slide"  # one model without and one with state carried across segments


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("compare") / "corpus", n_docs=30)


def argv(corpus, tmp_path, *extra):
    return ["compare", "--models", MODELS, "--corpora", str(corpus), "--tokens", "2048", "--seq-len", "128",
            "--batch-size", "2", "--eval-tokens", "3000", "--lengths", "1x,4x", "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--threads", "1",
            "--no-progress", *extra]


def test_compare_writes_table_json_png_and_a_rerun_skips_finished_models(corpus, tmp_path, capsys):
    assert main(argv(corpus, tmp_path)) == 0
    first = capsys.readouterr().out
    out = tmp_path / "out"
    payload = json.loads((out / "compare.json").read_text())
    assert [m["name"] for m in payload["models"]] == MODELS.split(",")
    for m in payload["models"]:
        c = m["corpora"][str(corpus)]
        assert c["train"]["step"] == 8 and c["train"]["train_seconds"] > 0  # 2048 tokens / (2 x 128) per step
        assert [r["length"] for r in c["eval"]["results"]] == [128, 512]
        for r in c["eval"]["results"]:
            assert math.isfinite(r["ppl"]) and math.isfinite(r["bpb"]) and 0 < r["bpb"] < 9
    table = (out / "compare.md").read_text()
    assert table.count("| bst-sh-s4 |") == 3 and table.count("| slide |") == 3  # quality, length, position tables
    assert "bits/byte" in table and "shared machine" in table and "blockstate compare" in table
    assert "slide carry state across training segments" in table  # the data-order caveat is in the table
    assert (out / "compare.png").stat().st_size > 0 and (out / "compare-position.png").stat().st_size > 0
    assert "training 2,048 tokens" in first

    ckpts = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("checkpoints/*/model.safetensors")}
    assert len(ckpts) == 2
    assert main(argv(corpus, tmp_path)) == 0
    again = capsys.readouterr().out
    assert again.count("trained earlier, evaluated earlier") == 2 and "training 2,048" not in again
    assert {p: p.stat().st_mtime_ns for p in ckpts} == ckpts
    assert json.loads((out / "compare.json").read_text())["models"] == payload["models"]

    # the same runs with another budget are another experiment: refused, not silently reused
    assert main([*argv(corpus, tmp_path), "--tokens", "4096"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--overwrite" in err and len(err.splitlines()) == 1


def test_an_interrupted_compare_resumes_from_the_checkpoint(corpus, tmp_path, capsys, monkeypatch):
    import blockstate.training.steps as steps

    real = steps.lr_factor

    def interrupt_at_step_5(step, *args, **kwargs):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)  # the trainer checkpoints after this step and stops
        return real(step, *args, **kwargs)

    monkeypatch.setattr(steps, "lr_factor", interrupt_at_step_5)
    assert main(argv(corpus, tmp_path, "--models", "bst-sh-s4")) == 130
    assert "rerun the same command" in capsys.readouterr().out
    assert not (tmp_path / "out" / "compare.json").exists()
    monkeypatch.setattr(steps, "lr_factor", real)
    assert main(argv(corpus, tmp_path, "--models", "bst-sh-s4")) == 0
    assert "resuming" in capsys.readouterr().out
    payload = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert payload["models"][0]["corpora"][str(corpus)]["train"]["step"] == 8


@pytest.mark.parametrize("extra, message", [
    (["--models", "bst-sh-s9"], "unknown model"),
    (["--corpora", ","], "--corpora"),
    (["--size", "huge"], "--size"),
    (["--tokens", "0"], "--tokens"),
    (["--eval-tokens", "-1"], "--eval-tokens"),
    (["--lengths", "2y"], "--lengths"),
    (["--batch-size", "0"], "--batch-size"),
    (["--split", "dev2"], "--split"),
    (["--model-arg", "carry_state"], "--model-arg"),
    (["--models", "brect", "--model-arg", "carry_state=false"], "carry_state"),
])
def test_bad_flags_give_one_line_and_exit_2(extra, message, corpus, tmp_path, capsys):
    assert main([*argv(corpus, tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_a_missing_corpus_fails_before_training(tmp_path, capsys):
    assert main(argv(tmp_path / "no-such-corpus", tmp_path)) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
