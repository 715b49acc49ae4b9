"""`blockstate ablate`: arms at equal parameters, one table on the validation split, reruns skip finished arms."""

import json
import math

import pytest
from helpers.training import write_corpus

from blockstate.benchmarks.ablation import default_arms, equalize, plan
from blockstate.cli.main import main
from blockstate.registry import count_model_parameters

TOY = ["--model-arg", "hidden_size=32", "--model-arg", "num_attention_heads=2", "--model-arg",
       "intermediate_size=128", "--model-arg", "block_size=16"]


def test_every_arm_is_within_one_percent_of_the_reference_parameters():
    target = count_model_parameters("bst-sh-s4", "tiny")
    rows = plan("tiny", default_arms(4))
    assert {r["arm"] for r in rows} >= {"paper", "layers-all", "previous-block", "gated", "mf", "ssm-lr-full"}
    for r in rows:  # references are the registry's baselines, matched within 5% by the registry
        if not r["diagnostic"]:  # a diagnostic takes a part out of a reference: its count is what it is
            assert abs(r["parameters"] / target - 1) <= (0.05 if r["reference"] else 0.01), r
        assert r["parameters"] == count_model_parameters(r["model"], "tiny", **r["model_args"])
    paper = next(r for r in rows if r["arm"] == "paper")
    assert paper["model_args"] == {} and paper["model"] == "bst-sh-s4"
    assert next(r for r in rows if r["arm"] == "block-half")["model_args"]["block_size"] == 32
    stack = next(r for r in rows if r["arm"] == "gss-stack")  # GSS-Hybrid's layout at tiny: 6 layers, BST at 3
    assert stack["model_args"]["plain_layers"] == "gss" and stack["model_args"]["bst_layers"] == [3]
    assert stack["model_args"]["num_hidden_layers"] == 6
    assert {r["arm"] for r in rows if r["diagnostic"]} == {"gss-no-attention", "gss-s4d"}


def test_equalize_narrows_and_widens_the_ffn():
    target = count_model_parameters("bst-sh-s4", "tiny")
    wider, n = equalize("bst-sh-s4", "tiny", {"bst_layers": [0, 1, 2, 3]}, target)
    assert wider["intermediate_size"] < 1024 and abs(n / target - 1) <= 0.01
    narrower, n = equalize("bst-sh-s4", "tiny", {"bst_layers": [0]}, target)
    assert narrower["intermediate_size"] > 1024 and abs(n / target - 1) <= 0.01


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("ablate") / "corpus", n_docs=30)


def test_ablate_writes_one_table_and_a_rerun_skips_finished_arms(corpus, tmp_path, capsys):
    argv = ["ablate", "--arms", "paper,gated", "--corpus", str(corpus), "--tokens", "2048", "--seq-len", "64",
            "--batch-size", "2", "--lengths", "1x", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
            "--threads", "1", "--no-progress", *TOY]
    assert main(argv) == 0
    payload = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert [a["arm"] for a in payload["arms"]] == ["paper", "gated"]
    for arm in payload["arms"]:
        assert math.isfinite(arm["results"][0]["bpb"]) and arm["results"][0]["length"] == 64
    table = (tmp_path / "out" / "ablation.md").read_text()
    assert "| gated | (beyond the paper)" in table and "validation split" in table
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("trained earlier") == 2


def test_unknown_arm_is_one_line_exit_2(capsys):
    assert main(["ablate", "--arms", "paper,nonsense", "--list"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nonsense" in err and "known:" in err and len(err.splitlines()) == 1
