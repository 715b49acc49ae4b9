"""`blockstate compare` at toy sizes: --lr-sweep (choice on validation, only the chosen run scored on test, reruns
skip, diverged runs left out), :nocarry control rows and lane spans for carried-state models, loss by position,
and a long-context setting (L = 1024, 16 blocks)."""

import json
import math

import pytest
from helpers.training import one_line_error, write_corpus

from blockstate.benchmarks.compare import CompareSettings, lr_factors
from blockstate.benchmarks.compare_eval import position_buckets
from blockstate.cli.main import main

TINY = ["--model-arg", "hidden_size=32", "--model-arg", "num_hidden_layers=2", "--model-arg", "num_attention_heads=2",
        "--model-arg", "intermediate_size=64"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("sweep") / "corpus", n_docs=30)


def argv(corpus, tmp_path, *extra):
    return ["compare", "--corpora", str(corpus), "--tokens", "1024", "--seq-len", "128", "--batch-size", "2",
            "--eval-tokens", "3000", "--lengths", "1x,4x", "--runs", str(tmp_path / "runs"), "--out",
            str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--no-progress",
            *TINY, "--model-arg", "block_size=16", *extra]


def test_lr_factors_form_a_ratio_2_grid_holding_the_base():
    assert lr_factors(1) == [1.0]
    assert lr_factors(2) == [1.0, 2.0]
    assert lr_factors(3) == [0.5, 1.0, 2.0]
    assert lr_factors(4) == [0.5, 1.0, 2.0, 4.0]
    s = CompareSettings(lr_sweep=3)
    assert s.lrs() == pytest.approx([1e-3, 2e-3, 4e-3])  # the trainer's 2e-3 in the middle
    assert s.run_dir("c", "slide:nocarry").name == "slide-nocarry"
    assert s.run_dir("c", "gpt", 2e-3) == s.run_dir("c", "gpt")  # the base lr shares the plain directory
    assert s.run_dir("c", "gpt", 4e-3).name == "gpt-lr0.004"


def test_position_buckets_average_the_per_position_sums():
    class R:
        length = 11
        position_nll = [1.0] * 5 + [3.0] * 4 + [0.0]  # summed over targets: 0 where none
        position_count = [1] * 5 + [1] * 4 + [0]

    got = position_buckets(R(), buckets=2)
    assert got["edges"] == [0, 5, 10] and got["count"] == [5, 4]
    assert got["loss"] == pytest.approx([1.0, 3.0])
    assert len(position_buckets(R(), buckets=32)["loss"]) == 10  # never more buckets than positions


def test_lr_sweep_chooses_on_validation_and_scores_only_the_chosen_run(corpus, tmp_path, capsys, monkeypatch):
    import blockstate.training as training
    from blockstate.training.trainer import TrainingDiverged

    real = training.Trainer

    class Diverging(real):  # the highest learning rate "diverges"; the sweep must go on without it
        def run(self):
            if self.cfg.lr > 3e-3:
                raise TrainingDiverged("the loss or gradient was not finite for 20 steps in a row")
            return super().run()

    monkeypatch.setattr(training, "Trainer", Diverging)
    extra = ["--models", "bst-sh-s4", "--lr-sweep", "3"]
    assert main(argv(corpus, tmp_path, *extra)) == 0
    first = capsys.readouterr().out
    assert "diverged at lr 0.004" in first
    payload = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert payload["lrs"] == pytest.approx([1e-3, 2e-3, 4e-3])
    c = payload["models"][0]["corpora"][str(corpus)]
    runs = c["sweep"]
    assert [r["lr"] for r in runs] == pytest.approx([1e-3, 2e-3, 4e-3])
    assert "diverged" in runs[2] and "valid" not in runs[2]
    valid = [r["valid"]["loss"] for r in runs[:2]]
    best = runs[valid.index(min(valid))]
    assert best.get("chosen") and c["lr"] == best["lr"] and c["lr_selected_on"] == "validation"
    assert c["valid"] == best["valid"] and c["run_dir"] == best["run_dir"]
    assert sum(bool(r.get("chosen")) for r in runs) == 1
    root = tmp_path / "runs" / "corpus-tiny-L128"
    evaluated = sorted(p.parent.name for p in root.glob("*/compare-eval.json"))
    assert evaluated == [best["run_dir"].rsplit("/", 1)[1]]  # the test split scores the chosen run only
    assert sorted(p.parent.name for p in root.glob("*/compare-valid.json")) == ["bst-sh-s4", "bst-sh-s4-lr0.001"]
    table = (tmp_path / "out" / "compare.md").read_text()
    assert "lr" in table and f"{best['lr']:.3g}" in table and "diverged" in table and "validation" in table

    monkeypatch.setattr(training, "Trainer", real)
    assert main(argv(corpus, tmp_path, *extra)) == 0  # a rerun trains nothing, not even the diverged run
    again = capsys.readouterr().out
    assert "training 1,024" not in again and again.count("trained earlier") == 2 and "diverged earlier" in again
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["models"] == payload["models"]


def test_control_rows_and_lane_spans(corpus, tmp_path, capsys):
    assert main(argv(corpus, tmp_path, "--models", "slide,slide:nocarry", "--lane-span", "3")) == 0
    payload = json.loads((tmp_path / "out" / "compare.json").read_text())
    slide, control = payload["models"]
    assert (slide["name"], slide["carries_state"], slide["lane_span"]) == ("slide", True, 3)
    assert (control["name"], control["carries_state"], control["lane_span"]) == ("slide:nocarry", False, 0)
    root = tmp_path / "runs" / "corpus-tiny-L128"
    cfg = json.loads((root / "slide" / "results.json").read_text())["config"]
    assert cfg["lane_span"] == 3 and "carry_state" not in cfg["model_args"]
    cfg = json.loads((root / "slide-nocarry" / "results.json").read_text())["config"]
    assert cfg["lane_span"] == 0 and cfg["model_args"]["carry_state"] is False
    state = json.loads(next((root / "slide" / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert state["loader"]["mode"] == "spans" and state["loader"]["lane_span"] == 3
    table = (tmp_path / "out" / "compare.md").read_text()
    assert "| slide:nocarry |" in table and "run of 3 consecutive segments" in table
    pos = slide["corpora"][str(corpus)]["position"]
    assert len(pos["loss"]) == 32 and pos["edges"][-1] == 127 and all(math.isfinite(x) for x in pos["loss"])
    assert sum(pos["count"]) == slide["corpora"][str(corpus)]["eval"]["results"][0]["tokens"]


@pytest.mark.parametrize("extra, message", [
    (["--lr-sweep", "0"], "--lr-sweep"),
    (["--lane-span", "-1"], "--lane-span"),
    (["--models", "bst-sh-s4:nocarry"], "carries no state"),
    (["--models", "brect:nocarry"], "cannot drop its carried state"),
    (["--models", "slid:nocarry"], "unknown model"),
])
def test_bad_sweep_and_row_flags_give_one_line(extra, message, corpus, tmp_path, capsys):
    assert message in one_line_error(capsys, argv(corpus, tmp_path, *extra))
    assert not (tmp_path / "runs").exists()


def test_long_context_compare_at_1024_with_16_blocks(tmp_path, capsys):
    """L = 1024 with the tiny preset's W = 64 (16 blocks), evaluated at 1x, 4x and 16x (16384 tokens)."""
    corpus = write_corpus(tmp_path / "long", n_docs=12)
    for i, p in enumerate(sorted(corpus.glob("*.txt"))[:4]):  # a few documents longer than 16k tokens
        p.write_text(p.read_text() * (8 + i))
    args = ["compare", "--models", "bst-sh-s4,slide", "--corpora", str(corpus), "--tokens", "4096", "--seq-len",
            "1024", "--batch-size", "2", "--eval-tokens", "40000", "--runs", str(tmp_path / "runs"), "--out",
            str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--no-progress", *TINY]
    assert main(args) == 0
    assert "L=1024, W=64" in capsys.readouterr().out  # 16 blocks per segment
    payload = json.loads((tmp_path / "out" / "compare.json").read_text())
    for m in payload["models"]:
        c = m["corpora"][str(corpus)]
        assert [r["length"] for r in c["eval"]["results"]] == [1024, 4096, 16384]
        assert all(math.isfinite(r["bpb"]) for r in c["eval"]["results"])
        assert len(c["position"]["loss"]) == 32 and c["position"]["edges"][-1] == 1023
    cfg = json.loads((tmp_path / "runs" / "long-tiny-L1024" / "bst-sh-s4" / "results.json").read_text())["config"]
    assert cfg["seq_len"] == 1024
    assert (tmp_path / "out" / "compare-position.png").stat().st_size > 0
