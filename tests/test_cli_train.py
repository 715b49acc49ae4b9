"""``blockstate train`` from the command line: settings, bad input gives one line, resume checks."""

import errno
import shutil
from pathlib import Path

import pytest
from training_helpers import TINY_YAML, one_line_error, one_thread, write_corpus  # noqa: F401 (one_thread: autouse)

from blockstate.cli.main import build_parser, main
from blockstate.cli.train import explicit_settings
from blockstate.training import TrainConfig, merge
from blockstate.training.metrics import read_metrics


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(root / "corpus")
    (root / "tiny.yaml").write_text(TINY_YAML + f"data: {corpus}\ncache_dir: {root / 'cache'}\n")
    return root


def base(env) -> list[str]:
    return ["train", "--config", str(env / "tiny.yaml")]


def test_bare_command_is_the_quick_start_run():
    args = build_parser().parse_args(["train"])
    file_values, flags = explicit_settings(args)
    assert file_values == {} and flags == {}
    cfg = merge(file_values, flags)
    assert cfg == TrainConfig() and cfg.default_budget()


def test_flags_override_the_config_file(env):
    args = build_parser().parse_args([*base(env), "--lr", "0.02", "--model-arg", "hidden_size=64"])
    file_values, flags = explicit_settings(args)
    cfg = merge(file_values, flags)
    assert cfg.lr == 0.02 and cfg.seq_len == 64 and cfg.model_args["hidden_size"] == 64
    assert cfg.model_args["num_hidden_layers"] == 2




def test_bad_input_gives_one_line(env, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text("tiny\n")
    (small / "b.txt").write_text("text\n")
    out = ["--output", str(tmp_path / "out"), "--steps", "2"]
    cases = [
        (["--model", "gpt-9"], "unknown model 'gpt-9'"),
        (["--data", "nosuch-corpus"], "unknown corpus 'nosuch-corpus'"),
        (["--data", str(tmp_path / "missing")], "does not exist"),
        (["--data", ""], "empty corpus name"),
        (["--data", str(empty)], "no usable text"),
        (["--tokenizer", "wordpiece"], "unknown tokenizer 'wordpiece'"),
        (["--data", str(small)], "fewer than one segment of --seq-len 64"),
        (["--size", "huge"], "size must be one of"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--config", str(tmp_path / "nope.yaml")], "config file"),
        (["--resume", str(tmp_path)], "not a blockstate run directory"),
        (["--resume", str(tmp_path / "missing")], "does not exist"),
        (["--output", str(env / "tiny.yaml")], "is a file"),
    ]
    for extra, message in cases:
        argv = [*base(env), *out, *extra] if extra[0] != "--config" else ["train", *extra]
        assert message in one_line_error(capsys, argv), extra
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1\n")
    assert "unknown setting 'learning_rate'" in one_line_error(capsys, ["train", "--config", str(bad)])

    # read-only output directory (simulated: the tests may run as root, where chmod does not stop writes)
    real = Path.write_bytes

    def read_only(self, data):
        if ".write-test" in self.name:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    assert "is not writable" in one_line_error(capsys, [*base(env), *out])
    monkeypatch.undo()

    # disk full while writing a checkpoint
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("blockstate.training.checkpoint.save_file", full)
    err = one_line_error(capsys, [*base(env), "--output", str(tmp_path / "full"), "--steps", "2"])
    assert "no space left" in err and not list((tmp_path / "full" / "checkpoints").glob(".tmp-*"))


def test_binary_and_non_utf8_files_are_counted(env, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "mixed", n_docs=6)
    (corpus / "blob.txt").write_bytes(b"\x00\x01binary\x00" * 50)
    (corpus / "latin1.txt").write_bytes("caf\xe9 ol\xe9 na\xefve\n".encode("latin-1") * 100)
    common = [*base(env), "--data", str(corpus), "--steps", "2", "--no-final-eval"]
    assert main([*common, "--output", str(tmp_path / "bytes")]) == 0
    out = capsys.readouterr()
    assert "1 binary" in out.out + out.err and "1 invalid utf8" in out.out
    assert main([*common, "--tokenizer", "bpe:300", "--output", str(tmp_path / "bpe")]) == 0
    out = capsys.readouterr()
    assert "replacement characters" in out.err and "1 binary" in out.out


def test_resume_checks(env, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*base(env), "--steps", "4", "--save-every", "2", "--output", str(run)]) == 0
    capsys.readouterr()
    assert "already holds a training run" in one_line_error(capsys, [*base(env), "--output", str(run)])
    err = one_line_error(capsys, [*base(env), "--resume", str(run), "--lr", "0.5", "--seq-len", "32"])
    assert "--lr 0.5" in err and "--seq-len 32" in err and "drop them to resume" in err
    err = one_line_error(capsys, [*base(env), "--resume", str(run), "--batch-size", "2"])
    assert "global batch" in err
    other = tmp_path / "other"
    assert main([*base(env), "--steps", "2", "--output", str(other)]) == 0
    shutil.copytree(run / "checkpoints" / "step-0000004", other / "checkpoints" / "step-0000009")
    (other / "checkpoints" / "latest").write_text("step-0000009\n")
    assert "belongs to another run" in one_line_error(capsys, [*base(env), "--resume", str(other)])
    # a longer budget continues the same run; --overwrite starts again
    assert main([*base(env), "--resume", str(run), "--steps", "6"]) == 0
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == 6
    assert main([*base(env), "--output", str(run), "--overwrite", "--steps", "1"]) == 0
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"] == [1]


# SIGKILL at a random step / SIGTERM then resume: tests/test_reliability_faults.py
