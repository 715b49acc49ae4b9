"""Shared pieces of the training / evaluation / CLI tests: a tiny model, a tiny corpus, the CLI's error check."""

import random
from pathlib import Path

import torch

TINY_MODEL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  num_context_states=4, block_size=16, max_train_length=64)

# the flags of a tiny `blockstate train` run in a subprocess (the distributed tests add data, batch and output)
TINY_ARGV = ["--model-arg", "hidden_size=32", "--model-arg", "num_hidden_layers=2", "--model-arg",
             "num_attention_heads=2", "--model-arg", "intermediate_size=64", "--seq-len", "64", "--block-size", "16",
             "--log-every", "1", "--eval-every", "3", "--eval-tokens", "2000", "--sample-tokens", "0",
             "--no-progress", "--threads", "1", "--steps", "6", "--save-every", "3", "--lr", "1e-2",
             "--warmup-steps", "2", "--dropout", "0.0", "--precision", "fp32"]


def write_corpus(root: Path, n_docs: int = 12, seed: int = 0) -> Path:
    """A small directory of code-like text documents."""
    rnd = random.Random(seed)
    words = "def class return import while for if else self value print none true false".split()
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 9))) for _ in range(rnd.randint(40, 90))]
        (root / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return root

# settings of a tiny `blockstate train` run (the CLI tests add data and cache paths)
TINY_YAML = """\
model_args: {hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64,
             num_context_states: 4}
seq_len: 64
block_size: 16
batch_size: 4
log_every: 1
eval_every: 0
sample_tokens: 0
progress: false
"""


def one_line_error(capsys, argv) -> str:
    """Run the CLI in-process; it must fail with exit code 2 and exactly one line on stderr, no traceback."""
    from blockstate.cli.main import main

    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, (argv, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


class InfGrad(torch.autograd.Function):
    """Identity forward (a finite loss), infinite gradient backward: a step whose gradient is not finite."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")
