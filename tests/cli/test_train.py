"""``blockstate train`` from the command line: settings, bad input gives one line, resume checks."""

import errno
import shutil
from pathlib import Path

import pytest
from helpers.training import TINY_YAML, one_line_error, write_corpus

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

    monkeypatch.setattr("blockstate.runtime.checkpoint.save_file", full)
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


def test_a_misspelt_model_arg_is_refused_before_anything_runs(env, tmp_path, capsys):
    """`--model-arg hiden_size=64` trained the default width and wrote the typo into config.json."""
    out = tmp_path / "runs" / "typo"
    err = one_line_error(capsys, [*base(env), "--output", str(out), "--model-arg", "hiden_size=64"])
    assert "unknown --model-arg 'hiden_size'" in err and "did you mean 'hidden_size'?" in err
    bad = tmp_path / "typo.yaml"
    bad.write_text(TINY_YAML.replace("hidden_size: 32", "hiden_size: 32") + f"data: {env / 'corpus'}\n")
    err = one_line_error(capsys, ["train", "--config", str(bad), "--output", str(out)])
    assert f"unknown model_args key in {bad} 'hiden_size'" in err and "did you mean 'hidden_size'?" in err
    gpt = tmp_path / "gpt.yaml"  # without BST's S, which gpt has not
    gpt.write_text(TINY_YAML.replace(",\n             num_context_states: 4}", "}") + f"data: {env / 'corpus'}\n")
    err = one_line_error(capsys, ["train", "--config", str(gpt), "--output", str(out), "--model", "gpt", "--model-arg",
                                  "bst_layer=[0]"])
    assert "for model gpt" in err and "did you mean 'bst_layers'?" in err
    assert not (tmp_path / "runs").exists()


def test_a_failed_start_leaves_no_empty_run_directory(env, tmp_path, capsys, monkeypatch):
    """`blockstate train --model nonsense` left runs/nonsense-tiny-python-stdlib/ behind."""
    from blockstate.training import Trainer

    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, ["train", "--model", "nonsense", "--steps", "3"])
    assert "--model: unknown model 'nonsense'" in err and not (tmp_path / "runs").exists()
    # the library path (no CLI pre-check): the directories the start made are removed again, the others kept
    (tmp_path / "mine").mkdir()
    cfg = merge({}, {"model": "nonsense", "data": str(env / "corpus"), "cache_dir": str(env / "cache"),
                     "output": str(tmp_path / "mine" / "a" / "b"), "steps": 1, "progress": False})
    with pytest.raises(ValueError, match="unknown model 'nonsense'"):
        Trainer(cfg).run()
    assert (tmp_path / "mine").is_dir() and not (tmp_path / "mine" / "a").exists()


def test_resume_names_the_value_the_run_really_used(env, tmp_path, capsys):
    """`--resume RUN --seq-len 256` said "the run used None" for a run on the preset's length."""
    preset = tmp_path / "preset.yaml"  # no seq_len: the model's max_train_length (48) is the run's L
    preset.write_text(TINY_YAML.replace("seq_len: 64\n", "").replace("num_context_states: 4}",
                                                                      "num_context_states: 4, max_train_length: 48}")
                      + f"data: {env / 'corpus'}\ncache_dir: {env / 'cache'}\n")
    run = tmp_path / "run"
    assert main(["train", "--config", str(preset), "--steps", "2", "--no-final-eval", "--output", str(run)]) == 0
    capsys.readouterr()
    err = one_line_error(capsys, ["train", "--config", str(preset), "--resume", str(run), "--seq-len", "256"])
    assert "--seq-len 256 (the run used 48)" in err and "None" not in err
    # the value the run used is no difference at all
    assert main(["train", "--config", str(preset), "--resume", str(run), "--seq-len", "48", "--steps", "3",
                 "--no-final-eval"]) == 0


def test_the_model_help_lists_every_registered_model(capsys):
    from blockstate.registry import list_models

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    helptext = text.split("--model MODEL model name:", 1)[1].split("--size", 1)[0].replace("- ", "-")
    assert all(name in helptext for name in list_models()), helptext


def test_the_log_prints_gpt_full_attention_as_w_full(env, tmp_path, capsys):
    gpt = tmp_path / "gpt.yaml"  # no block_size: gpt's own (one block as long as the input)
    gpt.write_text(TINY_YAML.replace("block_size: 16\n", "").replace(",\n             num_context_states: 4}", "}")
                   + f"data: {env / 'corpus'}\ncache_dir: {env / 'cache'}\n")
    argv = ["train", "--config", str(gpt), "--model", "gpt", "--steps", "1", "--no-final-eval", "--output"]
    assert main([*argv, str(tmp_path / "g")]) == 0
    out = capsys.readouterr().out
    assert "W=full;" in out and "1073741824" not in out
    assert "speed: " in out and "tokens/s in " in out  # the speed and precision, printed early


def test_eval_is_bounded_by_eval_tokens_and_keeps_finished_lengths(env, tmp_path, capsys, monkeypatch):
    """`eval` had no --eval-tokens (the typo hint pointed to --batch-tokens) and left nothing when interrupted."""
    import json

    import blockstate.evaluation.runner as runner

    run = tmp_path / "run"
    assert main([*base(env), "--steps", "2", "--no-final-eval", "--output", str(run)]) == 0
    common = ["eval", str(run), "--split", "train", "--lengths", "16,32", "--no-progress"]
    assert main([*common, "--eval-tokens", "3000", "--output", str(tmp_path / "some")]) == 0
    assert main([*common, "--eval-tokens", "0", "--output", str(tmp_path / "all")]) == 0
    capsys.readouterr()
    some = json.loads((tmp_path / "some" / "eval_results.json").read_text())
    every = json.loads((tmp_path / "all" / "eval_results.json").read_text())
    (m_some,), (m_all,) = some["models"].values(), every["models"].values()
    assert 1 <= m_some["documents"] < m_all["documents"] and some["complete"] and every["complete"]
    assert m_some["results"][0]["tokens"] < m_all["results"][0]["tokens"]
    assert "argument --eval-tokens" in one_line_error(capsys, [*common, "--eval-tokens", "-5"])

    # Ctrl-C during the second length: the first one is on disk, marked incomplete
    real, calls = runner.evaluate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "evaluate", interrupted)
    assert main([*common, "--output", str(tmp_path / "cut")]) == 130
    cut = json.loads((tmp_path / "cut" / "eval_results.json").read_text())
    assert not cut["complete"] and [r["length"] for r in next(iter(cut["models"].values()))["results"]] == [16]
    assert "in progress" in (tmp_path / "cut" / "eval_results.md").read_text()


def test_train_help_says_eval_tokens_counts_whole_documents(capsys):
    for command in ("train", "eval"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--eval-tokens N" in text and "whole documents" in text and "may exceed N" in text, command


# SIGKILL at a random step / SIGTERM then resume: tests/training/test_faults.py
