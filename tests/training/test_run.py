"""In-process training runs of a tiny model: outputs, gradient accumulation, resume, budgets."""

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from blockstate.training import TrainConfig, Trainer
from blockstate.training.metrics import read_metrics

TINY = dict(model_args={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                        "num_context_states": 4},
            seq_len=64, block_size=16, batch_size=4, log_every=1, eval_every=0, sample_tokens=0, progress=False,
            precision="fp32")  # exact comparisons: bf16 autocast (auto on AVX512-BF16 CPUs) rounds batch-dependently


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rnd = random.Random(0)
    words = "def class return import while for if else self value print none true false".split()
    for i in range(12):
        lines = [" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 9))) for _ in range(rnd.randint(40, 90))]
        (root / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return root


def config(corpus, tmp_path, name, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "data": str(corpus), "cache_dir": str(tmp_path / "cache"),
                          "output": str(tmp_path / name), **kw})


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}


def weights(ckpt):
    return load_file(ckpt / "model.safetensors")


def test_tiny_run_learns_and_writes_everything(corpus, tmp_path):
    cfg = config(corpus, tmp_path, "run", steps=40, lr=1e-2, warmup_steps=5, eval_every=20, save_every=20,
                 sample_tokens=16, sample_prompt="def ")
    result = Trainer(cfg, log=lambda *a: None).run()
    run = tmp_path / "run"
    ls = losses(run)
    assert result.step == 40 and sorted(ls) == list(range(1, 41))
    assert sum(list(ls.values())[-5:]) / 5 < sum(list(ls.values())[:5]) / 5 - 1.0  # it learns
    evals = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40] and evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert result.test is not None and result.test.tokens > 0 and 0 < result.test.bpb < 8
    assert (run / "loss_curve.png").stat().st_size > 0 and result.plots == [run / "loss_curve.png"]
    assert result.sample is not None and (run / "sample.txt").read_text().startswith("def ")
    results = json.loads((run / "results.json").read_text())
    assert results["step"] == 40 and results["test_bpb"] == pytest.approx(result.test.bpb, rel=1e-5)
    assert result.checkpoint.name == "step-0000040"
    assert (result.checkpoint / "tokenizer_config.json").is_file() and (run / "tokenizer_config.json").is_file()


def test_grad_accumulation_equals_the_large_batch(corpus, tmp_path):
    a = Trainer(config(corpus, tmp_path, "big", steps=4, batch_size=8), log=lambda *a: None).run()
    b = Trainer(config(corpus, tmp_path, "accum", steps=4, batch_size=4, grad_accum=2), log=lambda *a: None).run()
    la, lb = losses(a.run_dir), losses(b.run_dir)
    assert la.keys() == lb.keys() and all(la[k] == pytest.approx(lb[k], abs=1e-5) for k in la)
    for k, v in weights(a.checkpoint).items():
        torch.testing.assert_close(v, weights(b.checkpoint)[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("extra", [{}, {"dropout": 0.1, "optimizer": "adafactor", "schedule": "inverse-sqrt"},
                                   {"model": "slide", "model_args": {k: v for k, v in TINY["model_args"].items()
                                                                     if k != "num_context_states"}},  # not slide's
                                   {"precision": "bf16"}])  # slide carries state: saved too
def test_resume_reproduces_the_uninterrupted_run(corpus, tmp_path, extra):
    full = Trainer(config(corpus, tmp_path, "full", steps=12, save_every=6, **extra), log=lambda *a: None).run()
    part = config(corpus, tmp_path, "part", steps=12, save_every=6, **extra)
    Trainer(part, log=lambda *a: None).run()
    # forget everything after step 6, as if the run had been killed there
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-0000012")
    (tmp_path / "part" / "checkpoints" / "latest").unlink()
    resumed = Trainer(config(corpus, tmp_path, "part", steps=12, **extra), resume=tmp_path / "part",
                      log=lambda *a: None).run()
    assert resumed.step == 12
    if extra.get("model") == "slide":
        assert (resumed.checkpoint / "carry-rank0.safetensors").is_file()
    assert losses(tmp_path / "part") == losses(full.run_dir)  # bit-identical on CPU
    for k, v in weights(full.checkpoint).items():
        assert torch.equal(v, weights(resumed.checkpoint)[k]), k


def test_time_budget_and_token_budget(corpus, tmp_path):
    r = Trainer(config(corpus, tmp_path, "timed", time_budget=0.03, warmup_steps=2), log=lambda *a: None).run()
    assert r.step >= 1 and r.train_seconds >= 0.03 * 60
    lrs = [x["lr"] for x in read_metrics(r.run_dir / "metrics.jsonl") if x["kind"] == "train"]
    assert lrs[-1] < max(lrs)  # the time-driven cosine decays
    t = Trainer(config(corpus, tmp_path, "tokens", tokens=64 * 4 * 3 - 10), log=lambda *a: None).run()
    assert t.step == 3
