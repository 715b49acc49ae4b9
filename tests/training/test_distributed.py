"""2 CPU processes (torchrun, gloo) with DDP and FSDP2 take the same steps as 1 process with the same global batch."""

import os
import random
import subprocess
import sys

import pytest
import torch
from helpers.training import TINY_ARGV as TINY
from safetensors.torch import load_file

from blockstate.training.metrics import read_metrics


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    rnd = random.Random(0)
    words = "def class return import while for if else self value print none true false".split()
    (root / "corpus").mkdir()
    for i in range(12):
        lines = [" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 9))) for _ in range(rnd.randint(40, 90))]
        (root / "corpus" / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return root


def train(root, name, batch, nproc=1, parallel="none"):
    args = ["-m", "blockstate", "train", *TINY, "--data", str(root / "corpus"), "--cache-dir", str(root / "cache"),
            "--batch-size", str(batch), "--output", str(root / name)]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        argv = [*launcher, *args, "--parallel", parallel]
    else:
        argv = [sys.executable, *args]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    records = read_metrics(root / name / "metrics.jsonl")
    losses = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    val = [r["val_loss"] for r in records if r["kind"] == "eval"]
    return losses, val, load_file(root / name / "checkpoints" / "step-0000006" / "model.safetensors")


@pytest.fixture(scope="module")
def single(corpus):
    return train(corpus, "single", batch=8)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(corpus, single, parallel):
    losses, val, weights = train(corpus, parallel, batch=4, nproc=2, parallel=parallel)
    ref_losses, ref_val, ref_weights = single
    assert losses.keys() == ref_losses.keys() == set(range(1, 7))
    for step, loss in losses.items():  # the same loss at every step, up to float reduction order
        assert loss == pytest.approx(ref_losses[step], abs=2e-5), step
    assert val == pytest.approx(ref_val, abs=2e-5)
    for name, w in ref_weights.items():
        torch.testing.assert_close(weights[name], w, rtol=1e-4, atol=2e-5)
