"""``blockstate synthetic`` (blockstate.benchmarks.synthetic): baselines at the reference parameter budget, the
scoring by token, example and distance, and the command end to end; bad options are one line."""

import json

import numpy as np
import pytest
import torch
from helpers.training import one_line_error

from blockstate.benchmarks.synthetic import distance_bins, evaluate
from blockstate.benchmarks.synthetic_models import model_overrides, parameters, shared_fields
from blockstate.cli.main import main
from blockstate.data.synthetic import SyntheticSet, make_task


def test_every_baseline_matches_the_reference_parameter_budget():
    for name in ("mqar", "passkey"):
        task = make_task(name)
        fields = shared_fields("tiny", task.vocab_size, task.train_length, 16)
        reference = parameters("bst-sh-s4", "tiny", model_overrides("bst-sh-s4", "tiny", fields))
        for model in ("gpt", "slide", "transformer-xl", "brect", "gss-hybrid"):
            overrides = model_overrides(model, "tiny", fields)
            assert abs(parameters(model, "tiny", overrides) / reference - 1) < 0.05, (name, model)
        assert "block_size" not in model_overrides("gpt", "tiny", fields)  # full attention stays full


class Oracle(torch.nn.Module):
    """Logits that put all mass on a fixed answer table (right, or shifted by one: always wrong)."""

    def __init__(self, data: SyntheticSet, shift: int = 0, vocab: int = 64):
        super().__init__()
        self.data, self.shift, self.vocab, self.row = data, shift, vocab, 0

    def forward(self, input_ids):
        n = input_ids.shape[0]
        targets = torch.from_numpy(self.data.targets[self.row:self.row + n]).clamp(min=0)
        self.row += n
        logits = torch.nn.functional.one_hot((targets + self.shift) % self.vocab, self.vocab).float()
        return type("Out", (), {"logits": logits})()


def test_evaluate_scores_tokens_examples_and_distance_bins():
    task = make_task("mqar", seq_len=128, num_kv_pairs=8, vocab_size=64)
    data = task.test_sets(0, 10)[0]
    [right] = evaluate(Oracle(data), task, [data], 16, torch.device("cpu"), batch_tokens=3 * 128)
    assert right["accuracy"] == right["token_accuracy"] == right["example_accuracy"] == 1.0
    assert sum(b["scored_tokens"] for b in right["by_distance_blocks"]) == right["scored_tokens"] == 80
    [wrong] = evaluate(Oracle(data, shift=1), task, [data], 16, torch.device("cpu"))
    assert wrong["accuracy"] == 0.0
    assert distance_bins(np.array([0, 0.5, 1, 1.9, 2, 3.9, 4, 16, 17])).tolist() == [0, 0, 1, 1, 2, 2, 3, 5, 5]


def test_the_command_runs_end_to_end_and_skips_finished_pairs(tmp_path, capsys):
    out = tmp_path / "syn"
    argv = ["synthetic", "--task", "mqar,passkey", "--models", "gpt,bst-sh-s4", "--steps", "2", "--test-examples", "3",
            "--seq-len", "96", "--kv-pairs", "4", "--vocab-size", "32", "--distances", "1,2,8", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for suffix in ("md", "json", "png"):
        assert (out / f"synthetic.{suffix}").stat().st_size > 0
    payload = json.loads((out / "synthetic.json").read_text())
    assert {(p["task"], p["model"]) for p in payload["pairs"]} == {(t, m) for t in ("mqar", "passkey")
                                                                    for m in ("gpt", "bst-sh-s4")}
    passkey = [p for p in payload["pairs"] if p["task"] == "passkey"][0]
    assert [r["name"] for r in passkey["results"]] == ["d=1", "d=2", "d=1 @144", "d=2 @144", "d=8 @144"]
    text = (out / "synthetic.md").read_text()
    assert "| GPT (full attention) |" in text and "d=8 @144" in text and "1-2 blocks" in text and text in printed
    assert (out / "pairs" / "passkey" / "gpt.json").exists()
    assert main(argv) == 0  # the rerun trains nothing
    assert capsys.readouterr().out.count("skipped") == 4
    err = one_line_error(capsys, [*argv[:-2], "--lr", "0.01", "--out", str(out)])
    assert "trained with other settings (lr)" in err and "--overwrite" in err
    before = (out / "synthetic.md").read_text()
    (out / "synthetic.md").unlink()
    assert main(["synthetic", "--report", str(out / "synthetic.json")]) == 0  # re-renders, trains nothing
    assert (out / "synthetic.md").read_text() == before and "skipped" not in capsys.readouterr().out
    assert "does not exist" in one_line_error(capsys, ["synthetic", "--report", str(tmp_path / "none.json")])
    assert "not a blockstate synthetic result" in one_line_error(
        capsys, ["synthetic", "--report", str(out / "pairs" / "passkey" / "gpt.json")])


@pytest.mark.parametrize("argv, message", [
    (["--task", "nosuch"], "unknown task 'nosuch'"),
    (["--models", "nosuch"], "unknown model 'nosuch'"),
    (["--task", "passkey", "--kv-pairs", "4"], "--kv-pairs applies to mqar, none of which is in --task passkey"),
    (["--task-arg", "mqar.nosuch=1"], "mqar has no option 'nosuch'"),
    (["--task-arg", "nosuch=1"], "'nosuch' is no task's option"),
    (["--task-arg", "copy.seq_len=64"], "copy is not in --task"),
    (["--block-size", "4"], "or drop that distance"),
    (["--distances", "1,x"], "--distances must be comma-separated"),
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--size", "huge"], "--size must be one of"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--task-arg", "mqar"], "use [TASK.]KEY=VALUE"),
])
def test_bad_options_are_one_line_errors(argv, message, tmp_path, capsys):
    err = one_line_error(capsys, ["synthetic", *argv, "--out", str(tmp_path)])
    assert message in err, err
