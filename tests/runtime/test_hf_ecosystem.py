"""The run directory is the model (issue 12 items 1, 2, 4) and every loadable directory fails cleanly (issue 13
items 3, 5): ``AutoTokenizer`` / ``AutoModelForCausalLM`` / ``pipeline`` take a run directory as it is, after
``import blockstate``; ``blockstate generate`` runs HF ``generate()``; damaged ``save_pretrained`` directories and
bad ``generate`` flags are one line on stderr with exit code 2."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from helpers.training import TINY_MODEL, write_corpus

import blockstate.training.steps as steps_mod
from blockstate.cli.main import build_parser, main, subcommand_paths


def one_line(capsys, argv: list[str], code: int = 2) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == code, (argv, rc, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, (argv, err)
    return err


def train_args(root, out, *extra: str) -> list[str]:
    args = [a for k, v in TINY_MODEL.items() if k not in ("block_size", "max_train_length")
            for a in ("--model-arg", f"{k}={v}")]
    return ["train", "--data", str(root / "corpus"), "--cache-dir", str(root / "cache"), "--output", str(out),
            "--steps", "2", "--seq-len", "64", "--block-size", "16", "--sample-tokens", "0", "--no-progress",
            "--no-final-eval", *args, *extra]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    write_corpus(root / "corpus", n_docs=6)
    assert main(train_args(root, root / "run")) == 0
    return root / "run"


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


# -- the run directory is the model ---------------------------------------------------------------------------
def test_the_root_holds_the_final_model_tokenizer_and_generation_config(run_dir):
    published = json.loads((run_dir / "published.json").read_text())
    assert published["step"] == 2 and published["checkpoint"] == "checkpoints/step-0000002"
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json",
            "train_config.json"} <= set(published["files"])
    assert not any(n.startswith(("optimizer", "rng-", "trainer_state")) for n in published["files"])
    ckpt = run_dir / "checkpoints" / "step-0000002"
    assert (ckpt / "model.safetensors").read_bytes() == (run_dir / "model.safetensors").read_bytes()
    assert (ckpt / "tokenizer_config.json").is_file() and not (ckpt / "tokenizer").exists()
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((run_dir / name).read_text())
        assert cfg["eos_token_id"] == cfg["bos_token_id"] == cfg["pad_token_id"] == 256, name
    assert not list(run_dir.glob(".tmp-publish-*"))


def test_a_fresh_process_loads_the_run_directory_with_transformers(run_dir):
    """The issue's definition of done, in a fresh interpreter with nothing but ``import blockstate`` first."""
    code = f"""
import blockstate
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
run = {str(run_dir)!r}
tok = AutoTokenizer.from_pretrained(run)
model = AutoModelForCausalLM.from_pretrained(run)
assert type(tok).__name__ == "BlockStateBytesTokenizer" and tok("def").input_ids == [256, 100, 101, 102]
out = pipeline("text-generation", model=run)("def main(", max_new_tokens=8, do_sample=False)
assert out[0]["generated_text"].startswith("def main("), out
ids = tok("def main(", return_tensors="pt")
gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
assert gen.shape[1] <= ids["input_ids"].shape[1] + 5
ckpt = AutoTokenizer.from_pretrained(run + "/checkpoints/step-0000002")
assert ckpt("x").input_ids == tok("x").input_ids
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env())
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_generate_and_eval_keep_working_on_the_run_directory(run_dir, tmp_path, capsys):
    assert main(["generate", str(run_dir), "--prompt", "def ", "--max-new-tokens", "6", "--temperature", "0",
                 "--threads", "1"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    only_root = tmp_path / "copy"
    shutil.copytree(run_dir, only_root)
    shutil.rmtree(only_root / "checkpoints")  # the root model alone is enough
    assert main(["generate", str(only_root), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert main(["eval", str(only_root), "--lengths", "64", "--data", str(run_dir.parent / "corpus"), "--cache-dir",
                 str(run_dir.parent / "cache"), "--output", str(tmp_path / "eval"), "--split", "validation"]) == 0
    capsys.readouterr()
    (only_root / "model.safetensors").write_bytes((only_root / "model.safetensors").read_bytes()[:1000])
    err = one_line(capsys, ["generate", str(only_root)])
    assert "model.safetensors is truncated" in err and "root of" in err


def test_sigint_publishes_the_model_at_the_root_too(run_dir, tmp_path, monkeypatch, capsys):
    real, calls = steps_mod.step_nll, []

    def interrupt_at_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # handled after this step: checkpoint, publish, stop
        return real(*args, **kwargs)

    monkeypatch.setattr(steps_mod, "step_nll", interrupt_at_step_2)
    out = tmp_path / "run"
    assert main(train_args(run_dir.parent, out, "--steps", "5")) == 130
    assert json.loads((out / "published.json").read_text())["step"] == 2
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()


# -- issue 13 item 3: save_pretrained directories fail cleanly ------------------------------------------------
@pytest.fixture()
def saved(run_dir, tmp_path):
    """A plain ``model.save_pretrained(dir)`` of the trained bytes model: no tokenizer, no train config."""
    from transformers import AutoModelForCausalLM

    import blockstate  # noqa: F401

    d = tmp_path / "saved"
    AutoModelForCausalLM.from_pretrained(run_dir).save_pretrained(d)
    return d


def test_a_saved_bytes_model_needs_no_tokenizer_flag(saved, capsys):
    assert main(["generate", str(saved), "--prompt", "x", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("x")


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_truncated_save_pretrained_model_is_one_line(saved, capsys, command):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    err = one_line(capsys, [command, str(saved)])
    assert "model.safetensors is truncated" in err and "damaged" in err
    (saved / "model.safetensors").write_bytes(b"\x01\x02")
    assert "is not a safetensors file" in one_line(capsys, [command, str(saved)])


def test_an_edited_hidden_size_is_one_line(saved, capsys):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["hidden_size"] = 64
    (saved / "config.json").write_text(json.dumps(cfg))
    err = one_line(capsys, ["generate", str(saved)])
    assert "do not fit its config.json" in err and "config.json was edited" in err
    assert "(257, 32) in model.safetensors, (257, 64) from config.json" in err  # the first differing tensor


def test_a_model_without_tokenizer_and_another_vocab_names_the_flag(saved, capsys):
    import blockstate  # noqa: F401
    from blockstate import create_model

    create_model("bst-sh-s4", size="tiny", **{**TINY_MODEL, "vocab_size": 300}).save_pretrained(saved)
    err = one_line(capsys, ["generate", str(saved)])
    assert "has no saved tokenizer" in err and "--tokenizer" in err


# -- issue 13 item 5: generate's flags -------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a visible GPU")
def test_generate_device_cuda_without_a_gpu_is_one_line(run_dir, capsys):
    err = one_line(capsys, ["generate", str(run_dir), "--device", "cuda"])
    assert "--device cuda but no CUDA GPU is visible" in err


def test_generate_bad_device_and_invalid_utf8_prompt_name_the_flag(run_dir, capsys):
    err = one_line(capsys, ["generate", str(run_dir), "--device", "banana"])
    assert "argument --device: invalid choice: 'banana'" in err
    err = one_line(capsys, ["generate", str(run_dir), "--prompt", b"\xff\xfe".decode("utf-8", "surrogateescape")])
    assert "--prompt is not valid UTF-8 (byte 0xff at character 0)" in err and "--prompt-file" in err
    assert capsys.readouterr().out == ""  # nothing echoed before the error
    assert "--threads must be >= 1" in one_line(capsys, ["generate", str(run_dir), "--threads", "0"])


def test_invalid_utf8_prompt_in_a_real_process_and_raw_bytes_from_a_file(run_dir, tmp_path):
    res = subprocess.run([sys.executable, "-m", "blockstate", "generate", str(run_dir), "--prompt", b"\xff\xfe"],
                         capture_output=True, timeout=300, env=env())
    err = res.stderr.decode()
    assert res.returncode == 2 and len(err.strip().splitlines()) == 1 and "--prompt is not valid UTF-8" in err, err
    assert res.stdout == b""
    (tmp_path / "p.bin").write_bytes(b"caf\xe9 ")
    res = subprocess.run([sys.executable, "-m", "blockstate", "generate", str(run_dir), "--prompt-file",
                          str(tmp_path / "p.bin"), "--max-new-tokens", "3", "--threads", "1"],
                         capture_output=True, timeout=300, env=env())
    assert res.returncode == 0 and res.stdout.startswith("caf\ufffd ".encode()), res.stderr[-1000:]


def test_help_shows_defaults_and_every_subcommand_has_a_description(capsys):
    assert main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "(default: 200)" in out and "(default: 0.8)" in out and "--threads" in out
    paths = dict(subcommand_paths(build_parser()))
    for path in [("generate",), ("models",), ("presets",), ("demo",), ("bench", "generate")]:
        assert (paths[path].description or "").strip(), path


def test_a_full_disk_while_publishing_is_one_line_and_keeps_the_checkpoint(run_dir, tmp_path, monkeypatch, capsys):
    import errno

    import blockstate.training.rundir as rundir_mod

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir_mod, "atomic_write_text", enospc)  # the published.json write, the last one
    out = tmp_path / "run"
    err = one_line(capsys, train_args(run_dir.parent, out))
    assert f"no space left on the device of {out} while writing the final model (from step-0000002" in err
    assert not list(out.glob(".tmp-publish-*")) and not (out / "published.json").exists()
    monkeypatch.undo()
    from blockstate.runtime.checkpoint import verify

    verify(out / "checkpoints" / "step-0000002")  # complete and verified: resume or load it


def test_a_checkpoint_of_the_layout_before_still_loads(run_dir, tmp_path, capsys):
    """Tokenizer in ``tokenizer/blockstate_tokenizer.json`` (checkpoints written before the root layout)."""
    from blockstate.data import BytesTokenizer
    from blockstate.runtime.loading import verify_published
    from blockstate.runtime.manifest import write_manifest
    from blockstate.training.rundir import check_same_tokenizer, publish_model

    old = tmp_path / "old"
    shutil.copytree(run_dir / "checkpoints" / "step-0000002", old)
    for name in ("tokenizer_config.json", "added_tokens.json", "special_tokens_map.json", "manifest.json"):
        (old / name).unlink(missing_ok=True)
    (old / "tokenizer").mkdir()
    (old / "tokenizer" / "blockstate_tokenizer.json").write_text(json.dumps(
        {"format": "blockstate-tokenizer", "version": 1, "type": "bytes", "vocab_size": 257, "eos_id": 256}))
    write_manifest(old)
    check_same_tokenizer(old, BytesTokenizer())  # resuming it compares the same fingerprint
    root = tmp_path / "resumed"
    (root / "checkpoints").mkdir(parents=True)
    (root / ".tmp-publish-1").mkdir()  # left by a process killed while publishing
    publish_model(root, old, BytesTokenizer())  # its tokenizer is saved at the root, not left in tokenizer/
    assert (root / "tokenizer_config.json").is_file() and verify_published(root)
    assert not list(root.glob(".tmp-publish-*"))
    assert main(["generate", str(old), "--prompt", "a", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("a")


def test_every_registered_model_generates_text():
    import blockstate
    from blockstate.data import BytesTokenizer
    from blockstate.generation import SamplingConfig, can_generate, generate_text

    for name in blockstate.list_models():
        torch.manual_seed(0)
        model = blockstate.create_model(name, size="tiny", vocab_size=257).eval()
        if not can_generate(model):
            pytest.fail(f"{name} has no generate()")
        pieces: list[str] = []
        text = generate_text(model, BytesTokenizer(), "def ", SamplingConfig(max_new_tokens=3, seed=1), pieces.append)
        assert text == "".join(pieces), name
