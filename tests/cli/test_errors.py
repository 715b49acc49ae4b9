"""The command line as a user meets it: every subcommand's --help works, every wrong flag or bad value is one
line on stderr with exit code 2, and no traceback reaches the user unless --debug is given.

The subcommands and their flags are read from the parser itself, so a new subcommand or flag is covered
without editing this file.
"""

import argparse
import json
import subprocess
import sys

import pytest
from helpers.training import TINY_MODEL, write_corpus

import blockstate.cli.presets
from blockstate.cli.main import build_parser, main, subcommand_paths
from blockstate.training import TrainConfig
from blockstate.training.config import FIELDS

PARSER = build_parser()
PATHS = [path for path, _ in subcommand_paths(PARSER)]
LEAVES = [(path, p) for path, p in subcommand_paths(PARSER) if not subcommand_paths(p)]
NOT_A_VALUE = "not-a-value"


def one_line(capsys, argv: list[str], code: int = 2) -> str:
    rc = main(argv)
    out = capsys.readouterr()
    err = out.err.strip()
    assert rc == code, (argv, rc, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, (argv, err)
    return err


def test_the_parser_knows_the_subcommands():
    assert {"train", "eval", "generate", "bench", "presets", "models", "demo"} <= {p[0] for p in PATHS}
    assert ("bench", "generate") in PATHS


@pytest.mark.parametrize("path", [(), *PATHS], ids=lambda p: " ".join(p) or "blockstate")
def test_every_help_works(path, capsys):
    assert main([*path, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {' '.join(('blockstate', *path))}") and "--debug" in out


def validated_options(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """(flag, kind) for every option whose value is checked by argparse: a type that rejects NOT_A_VALUE,
    or a list of choices."""
    out = []
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 or action.help == argparse.SUPPRESS:
            continue
        flag = max(action.option_strings, key=len)
        if action.choices is not None:
            out.append((flag, "choice"))
        elif action.type is not None:
            try:
                action.type(NOT_A_VALUE)
            except (ValueError, TypeError, argparse.ArgumentTypeError):
                out.append((flag, "type"))
    return out


def test_every_bad_value_and_unknown_flag_is_one_line_with_code_2(capsys):
    checked = 0
    for path, parser in LEAVES:
        for flag, _kind in validated_options(parser):
            err = one_line(capsys, [*path, flag, NOT_A_VALUE])
            assert err.startswith(f"blockstate {' '.join(path)}: error: argument ") and flag in err, err
            assert NOT_A_VALUE in err, err
            checked += 1
        err = one_line(capsys, [*path, "--no-such-flag", "1"])
        assert "unrecognized arguments: --no-such-flag" in err
    assert checked >= 30  # train alone has ~30 checked options
    assert "invalid choice: 'nosuch'" in one_line(capsys, ["nosuch"])
    assert "required: COMMAND" in one_line(capsys, [])
    assert "required: BENCHMARK" in one_line(capsys, ["bench"])
    assert "did you mean --steps?" in one_line(capsys, ["train", "--step", "3"])  # no abbreviations
    assert "did you mean --steps?" in one_line(capsys, ["train", "--stesp", "3"])
    assert "invalid int value: 'ten'" in one_line(capsys, ["train", "--steps", "ten"])


def test_bad_values_in_a_config_file_are_one_line(tmp_path, capsys):
    """Every TrainConfig field given a value of the wrong type (as a YAML file can) is refused by name."""
    for name in sorted(FIELDS):
        with pytest.raises(ValueError, match=name.replace("_", "[-_]")):
            TrainConfig(**{name: [1]}).validate()
    for values, message in [({"lr": "fast"}, "--lr must be a positive number"),
                            ({"packing": "yes"}, "--packing must be true or false"),
                            ({"seed": -1}, "--seed must be an integer >= 0"),
                            ({"grad_clip": float("nan")}, "--grad-clip must be a finite number"),
                            ({"beta1": "x"}, "--beta1 must be a number"),
                            ({"steps": 1.5}, "--steps must be a positive integer")]:
        (tmp_path / "bad.json").write_text(json.dumps(values))
        assert message in one_line(capsys, ["train", "--config", str(tmp_path / "bad.json")])
    (tmp_path / "bad.yaml").write_text("lr: [unclosed\n")
    assert "is not valid YAML" in one_line(capsys, ["train", "--config", str(tmp_path / "bad.yaml")])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    corpus = write_corpus(root / "corpus", n_docs=6)
    args = [a for k, v in TINY_MODEL.items() if k not in ("block_size", "max_train_length")
            for a in ("--model-arg", f"{k}={v}")]
    assert main(["train", "--data", str(corpus), "--cache-dir", str(root / "cache"), "--output", str(root / "run"),
                 "--steps", "2", "--seq-len", "64", "--block-size", "16", "--sample-tokens", "0", "--no-progress",
                 "--no-final-eval", *args]) == 0
    return root / "run"


def test_user_errors_at_run_time_are_one_line(run_dir, tmp_path, capsys):
    missing = str(tmp_path / "missing")
    cases = [
        (["eval", missing], "does not exist"),
        (["generate", missing], "does not exist"),
        (["eval", str(tmp_path)], "holds no checkpoint"),
        (["generate", str(run_dir), "--temperature", "-1"], "temperature"),
        (["generate", str(run_dir), "--prompt-file", missing], "does not exist"),
        (["eval", str(run_dir), "--lengths", "4q"], "not a token count"),
        (["train", "--size", "huge", "--data", str(run_dir.parent / "corpus"), "--output", str(tmp_path / "o"),
          "--cache-dir", str(run_dir.parent / "cache")], "size must be one of"),
        (["train", "--resume", missing], "does not exist"),
        (["bench", "generate", "--contexts", "a,b"], "--contexts must be comma-separated integers"),
        (["demo", "--length", "0"], "must be positive"),
    ]
    for argv, message in cases:
        assert message in one_line(capsys, argv), argv
    # a damaged checkpoint
    model = run_dir / "checkpoints" / "step-0000002" / "model.safetensors"
    backup = model.read_bytes()
    model.write_bytes(backup[:100])
    try:
        for argv in (["eval", str(run_dir)], ["generate", str(run_dir)], ["train", "--resume", str(run_dir)]):
            assert "model.safetensors is truncated" in one_line(capsys, argv), argv
    finally:
        model.write_bytes(backup)


def test_an_unexpected_error_is_one_line_with_code_1_and_debug_shows_it(monkeypatch, capsys):
    def bug(args):
        raise RuntimeError("something broke\nwith a second line")

    monkeypatch.setattr(blockstate.cli.presets, "run", bug)
    err = one_line(capsys, ["presets"], code=1)
    assert err == ("blockstate presets: internal error: RuntimeError: something broke with a second line (rerun "
                   "with --debug for the traceback, and please report it)")
    for argv in (["--debug", "presets"], ["presets", "--debug"]):  # before or after the subcommand
        with pytest.raises(RuntimeError, match="something broke"):
            main(argv)

    def user_error(args):
        raise FileNotFoundError("no such thing: pass another")

    monkeypatch.setattr(blockstate.cli.presets, "run", user_error)
    assert one_line(capsys, ["presets"]) == "blockstate presets: error: no such thing: pass another"
    with pytest.raises(FileNotFoundError):
        main(["presets", "--debug"])

    def closed_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(blockstate.cli.presets, "run", closed_pipe)
    assert main(["presets"]) == 141 and capsys.readouterr().err == ""


def test_a_subcommand_that_cannot_be_imported_does_not_break_the_others(monkeypatch, capsys):
    import blockstate.cli.main as cli_main

    monkeypatch.setitem(cli_main.SUBCOMMANDS, "broken", "blockstate.cli.no_such_module")
    assert main(["presets", "--json"]) == 0 and capsys.readouterr().err == ""
    err = one_line(capsys, ["broken"], code=1)
    assert "ModuleNotFoundError" in err and "no_such_module" in err and "--debug" in err


def test_real_processes_exit_with_one_line(tmp_path):
    """The installed entry point as a shell sees it: exit codes and stderr, no traceback."""
    for argv, code, message in [(["train", "--steps", "ten"], 2, "invalid int value: 'ten'"),
                                (["eval", str(tmp_path / "missing")], 2, "does not exist")]:
        res = subprocess.run([sys.executable, "-m", "blockstate", *argv], capture_output=True, text=True, timeout=120)
        assert res.returncode == code, (argv, res.stderr)
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert message in res.stderr


def test_ctrl_c_while_importing_is_one_line_with_code_130(tmp_path):
    """Ctrl-C while torch loads (before main runs) printed a 51-line traceback."""
    import signal

    # An import that waits for the signal, in a process that is the blockstate command (the real command
    # interrupted after a fixed delay was flaky under load: the signal could land before the package was imported)
    (tmp_path / "slow_module.py").write_text("import sys, time\nprint('importing', flush=True)\ntime.sleep(120)\n")
    code = (f"import sys; sys.argv[0] = 'blockstate'; sys.path.insert(0, {str(tmp_path)!r}); "
            "import blockstate, slow_module")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "importing"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "blockstate: interrupted (Ctrl-C)", (proc.returncode, err)
    # a library user's Python keeps its own Ctrl-C behaviour (the traceback)
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import blockstate, slow_module"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "importing"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "KeyboardInterrupt" in err and proc.returncode != 130
