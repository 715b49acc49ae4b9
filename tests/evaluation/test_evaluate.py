"""Evaluation protocol (every token scored once), reports, sampling, and ``blockstate eval`` end to end."""

import json
import math

import numpy as np
import pytest
import torch
from helpers.training import TINY_MODEL, write_corpus

from blockstate.cli.main import main
from blockstate.data import BytesTokenizer, TokenizedSplit
from blockstate.evaluation import evaluate, head_documents, parse_lengths
from blockstate.generation import SamplingConfig, generate_ids, generate_text
from blockstate.registry import create_model as build_model


def tiny_split(lengths=(5, 40, 64, 65, 130, 1)) -> TokenizedSplit:
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, n) for n in lengths]
    return TokenizedSplit.from_documents(docs, [n + 1 for n in lengths], eos_id=256, vocab_size=257)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("bst-sh-s4", "tiny", **TINY_MODEL).eval()


@pytest.mark.parametrize("length", [2, 8, 64, 200])
def test_every_token_scored_once(model, length):
    data = tiny_split()
    r = evaluate(model, data, length, batch_tokens=256)
    assert r.tokens == data.num_tokens == sum((5, 40, 64, 65, 130, 1))
    assert r.bytes == data.num_bytes
    assert sum(r.position_count) == r.tokens
    assert r.bpb == pytest.approx(r.nll / (math.log(2) * r.bytes))
    assert r.ppl == pytest.approx(math.exp(r.nll / r.tokens))
    assert sum(r.position_nll) == pytest.approx(r.nll, rel=1e-9)


def test_scores_match_a_direct_forward(model):
    """A document shorter than the length is one segment: its NLL is the model's own loss on [EOS] + doc."""
    data = tiny_split((50,))
    r = evaluate(model, data, 64)
    ids = torch.from_numpy(data.tokens.astype(np.int64))[None]
    assert r.loss == pytest.approx(model(ids, labels=ids).loss.item(), rel=1e-5)


def test_sharded_equals_single(model):
    data = tiny_split()
    single = evaluate(model, data, 16, batch_tokens=32)
    parts = [evaluate(model, data, 16, batch_tokens=32, rank=r, world_size=2) for r in range(2)]
    assert sum(p.tokens for p in parts) == single.tokens
    assert sum(p.nll for p in parts) == pytest.approx(single.nll, rel=1e-6)


def test_head_documents_keeps_whole_documents():
    data = tiny_split()
    head = head_documents(data, 110)
    assert head.num_documents == 3 and head.num_tokens == 5 + 40 + 64
    assert head.num_bytes == 6 + 41 + 65
    assert head_documents(data, 1).num_documents == 1


def test_parse_lengths():
    assert parse_lengths("512, 4096,16384", 512) == [512, 4096, 16384]
    assert parse_lengths("1x,4x,16x", 64) == [64, 256, 1024]
    with pytest.raises(ValueError, match="not a token count"):
        parse_lengths("abc", 64)
    with pytest.raises(ValueError, match="relative to the training length"):
        parse_lengths("4x", None)
    with pytest.raises(ValueError, match="at least 2"):
        parse_lengths("1", 64)


def test_sample_is_seeded_and_stops(model):
    """The sample printed after training goes through the one generation path (``blockstate.generation``)."""
    cfg = SamplingConfig(max_new_tokens=20, seed=3)
    a = generate_ids(model, [256, 100], cfg, None)
    assert a == generate_ids(model, [256, 100], cfg, None) and len(a) == 20
    assert all(0 <= t < 257 for t in a)
    greedy = SamplingConfig(max_new_tokens=5, temperature=0)
    assert generate_ids(model, [256], greedy, None) == generate_ids(model, [256], greedy, None)
    pieces: list[str] = []
    text = generate_text(model, BytesTokenizer(), "def ", SamplingConfig(max_new_tokens=10), pieces.append)
    assert text == "".join(pieces) and len(text.encode("utf-8", "surrogateescape")) <= 10 * 3


# -- the command -------------------------------------------------------------------------------------------
TINY_FLAGS = ["--model-arg", "hidden_size=32", "--model-arg", "num_hidden_layers=2", "--model-arg",
              "num_attention_heads=2", "--model-arg", "intermediate_size=64", "--model-arg", "num_context_states=4",
              "--seq-len", "64", "--block-size", "16", "--batch-size", "4", "--log-every", "1", "--eval-every", "0",
              "--sample-tokens", "0", "--no-progress"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalrun")
    corpus = write_corpus(tmp / "corpus")
    rc = main(["train", *TINY_FLAGS, "--data", str(corpus), "--cache-dir", str(tmp / "cache"), "--steps", "20",
               "--output", str(tmp / "run")])
    assert rc == 0
    return tmp


def test_eval_command_writes_tables_and_plots(trained_run, capsys):
    out = trained_run / "report"
    rc = main(["eval", str(trained_run / "run"), "--lengths", "1x,4x,16x", "--output", str(out),
               "--cache-dir", str(trained_run / "cache"), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| bst-sh-s4" in printed and "bits/byte" in printed
    payload = json.loads((out / "eval_results.json").read_text())
    (model,) = payload["models"].values()
    assert [r["length"] for r in model["results"]] == [64, 256, 1024]
    assert model["train_length"] == 64 and model["tokenizer"] == "bytes"
    tokens = {r["tokens"] for r in model["results"]}
    assert len(tokens) == 1  # the same tokens scored at every length
    assert all(0 < r["bpb"] < 9 for r in model["results"])
    assert "every token is a target exactly once" in payload["protocol"]
    assert set(model["loss_by_position"]) == {"64", "256", "1024"}
    for name in ("eval_results.md", "ppl_vs_length.png", "loss_by_position.png"):
        assert (out / name).stat().st_size > 0
    # two checkpoints compare in one table
    rc = main(["eval", str(trained_run / "run"), str(trained_run / "run" / "checkpoints" / "step-0000020"),
               "--lengths", "64", "--output", str(out), "--cache-dir", str(trained_run / "cache"), "--no-progress"])
    assert rc == 0 and len(json.loads((out / "eval_results.json").read_text())["models"]) == 2


def test_eval_errors(trained_run, tmp_path, capsys):
    cases = [
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(tmp_path)], "holds no checkpoint"),
        ([str(trained_run / "run"), "--tokenizer", "bpe:300"], "has 300 ids but checkpoint"),
        ([str(trained_run / "run"), "--lengths", "4q"], "not a token count"),
        ([str(trained_run / "run"), "--data", str(tmp_path / "nodata")], "does not exist"),
    ]
    for args, message in cases:
        rc = main(["eval", *args, "--cache-dir", str(trained_run / "cache"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2, args
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_eval_stream_scores_whole_documents(trained_run, capsys):
    """--stream scores every document with its whole left context; every token once, like the segment protocol,
    and at least as well as 64-token segments (more context)."""
    out = trained_run / "report-stream"
    rc = main(["eval", str(trained_run / "run"), "--lengths", "64", "--stream", "64", "--output", str(out),
               "--cache-dir", str(trained_run / "cache"), "--no-progress"])
    assert rc == 0
    assert "streamed whole documents" in capsys.readouterr().out
    (model,) = json.loads((out / "eval_results.json").read_text())["models"].values()
    stream, segments = model["stream"], model["results"][0]
    assert stream["tokens"] == segments["tokens"] and stream["bytes"] == segments["bytes"]
    assert 0 < stream["bpb"] < 9


def test_generate_command_streams_text(trained_run, capsys):
    rc = main(["generate", str(trained_run / "run"), "--prompt", "def ", "--max-new-tokens", "12",
               "--temperature", "0"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.startswith("def ") and len(printed) > len("def \n")
    assert main(["generate", str(trained_run / "run"), "--top-p", "2"]) == 2
