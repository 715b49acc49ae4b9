"""Checkpoints people depend on: every damaged file is caught before use, a checkpoint of another model is
refused with the difference named, and nothing in a checkpoint can run code (no pickle anywhere in src)."""

import ast
import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers.training import TINY_MODEL, one_line_error, write_corpus
from safetensors.torch import load_file

from blockstate.registry import create_model as build_model
from blockstate.runtime import checkpoint as ckpt_io
from blockstate.runtime.loading import load_checkpoint
from blockstate.runtime.manifest import MANIFEST, CheckpointError, verify_checkpoint, write_manifest
from blockstate.training import TrainConfig, Trainer

SRC = Path(__file__).resolve().parents[2] / "src" / "blockstate"
TINY = dict(model_args={k: v for k, v in TINY_MODEL.items() if k not in ("block_size", "max_train_length")},
            seq_len=64, block_size=16, batch_size=4, log_every=1, eval_every=0, sample_tokens=0, progress=False,
            precision="fp32", final_eval=False, save_every=2, keep_checkpoints=3)
DAMAGES = ("truncate", "flip", "delete")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def config(root: Path, name: str, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "data": str(root / "corpus"), "cache_dir": str(root / "cache"),
                          "output": str(root / name), **kw})


def quiet(*args, **kwargs) -> None:
    pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 6-step run with checkpoints at steps 2, 4 and 6 (copy it before damaging it)."""
    root = tmp_path_factory.mktemp("ckpt")
    write_corpus(root / "corpus")
    Trainer(config(root, "run", steps=6), log=quiet).run()
    return root


def copy_run(trained: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    return run


def damage(path: Path, how: str, rnd: random.Random) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        i = rnd.randrange(len(data))
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x40]) + data[i + 1:])
    else:
        path.unlink()




# -- manifest --------------------------------------------------------------------------------------------------
def test_manifest_lists_every_file_with_size_and_sha256(trained):
    ckpt = trained / "run" / "checkpoints" / "step-0000006"
    manifest = json.loads((ckpt / MANIFEST).read_text())
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert set(manifest["files"]) == on_disk  # written last: it covers the tokenizer and the trainer state too
    assert {"model.safetensors", "optimizer.safetensors", "trainer_state.json", "tokenizer_config.json"
            } <= on_disk
    for rel, entry in manifest["files"].items():
        assert entry["size"] == (ckpt / rel).stat().st_size and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
    assert verify_checkpoint(ckpt) is True


def test_every_file_truncated_flipped_or_deleted_is_caught(trained, tmp_path):
    """3 damages x every file of a checkpoint: each one refused in one line naming the file and a way out."""
    run = copy_run(trained, tmp_path)
    ckpt = run / "checkpoints" / "step-0000006"
    pristine = tmp_path / "pristine"
    shutil.copytree(ckpt, pristine)
    rnd = random.Random(0)
    files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)
    cases = 0
    for rel in files:
        for how in DAMAGES:
            shutil.rmtree(ckpt)
            shutil.copytree(pristine, ckpt)
            damage(ckpt / rel, how, rnd)
            with pytest.raises(CheckpointError) as info:
                ckpt_io.verify(ckpt)
            msg = str(info.value)
            assert "\n" not in msg and rel in msg, (rel, how, msg)
            assert {"truncate": "truncated", "flip": "corrupted", "delete": "missing"}[how] in msg or (
                how == "truncate" and "corrupted" in msg)  # an empty file cut in half is still empty
            assert "step-0000004" in msg  # the earlier checkpoint to use instead
            cases += 1
    assert cases == 3 * len(files) >= 3 * 10


def test_damaged_manifest_missing_manifest_and_added_files(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    ckpt = run / "checkpoints" / "step-0000006"
    (ckpt / "model-extra.safetensors").write_bytes(b"not part of the save")
    with pytest.raises(CheckpointError, match="model-extra.safetensors was added after"):
        ckpt_io.verify(ckpt)
    (ckpt / "model-extra.safetensors").unlink()
    manifest = (ckpt / MANIFEST).read_bytes()
    (ckpt / MANIFEST).write_bytes(manifest[:40])
    with pytest.raises(CheckpointError, match="manifest.json is damaged"):
        ckpt_io.verify(ckpt)
    (ckpt / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="has no manifest.json"):
        ckpt_io.verify(ckpt)
    # a checkpoint from before manifests (version 1) still loads, with a warning that it is unverified
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps({**state, "version": 1}))
    ckpt_io.verify(ckpt)


def test_resume_refuses_a_damaged_checkpoint_then_resumes_the_earlier_one(trained, tmp_path, capsys):
    """The newest checkpoint is damaged: one line naming it; resuming the earlier one it names sets the newer one
    aside and reproduces the uninterrupted run exactly."""
    run = copy_run(trained, tmp_path)
    damage(run / "checkpoints" / "step-0000006" / "optimizer.safetensors", "truncate", random.Random(0))
    err = one_line_error(capsys, ["train", "--resume", str(run), "--steps", "6"])
    assert "optimizer.safetensors is truncated" in err and str(run / "checkpoints" / "step-0000004") in err
    earlier = run / "checkpoints" / "step-0000004"
    resumed = Trainer(config(tmp_path, "unused", steps=6), resume=earlier, explicit={"steps": 6}, log=quiet).run()
    assert resumed.step == 6 and (run / "checkpoints" / "abandoned-step-0000006").is_dir()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000006"
    ref, got = (load_file(d / "model.safetensors") for d in (trained / "run" / "checkpoints" / "step-0000006",
                                                               resumed.checkpoint))
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_eval_and_generate_refuse_a_damaged_checkpoint(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    ckpt = run / "checkpoints" / "step-0000006"
    damage(ckpt / "model.safetensors", "flip", random.Random(1))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupted"):
        load_checkpoint(ckpt)
    assert "model.safetensors is corrupted" in one_line_error(capsys, ["eval", str(run), "--no-progress"])
    assert "model.safetensors is corrupted" in one_line_error(capsys, ["generate", str(ckpt), "--prompt", "x"])
    # the earlier checkpoint it points to still works
    assert load_checkpoint(run / "checkpoints" / "step-0000004").model is not None


# -- another model or config -----------------------------------------------------------------------------------
def test_a_checkpoint_of_another_model_config_is_refused_naming_the_difference(trained, tmp_path, capsys):
    ckpt = trained / "run" / "checkpoints" / "step-0000006"
    wider = build_model("bst-sh-s4", "tiny", **{**TINY_MODEL, "hidden_size": 48, "vocab_size": 257})
    with pytest.raises(CheckpointError, match=r"trained with hidden_size=32, this run has hidden_size=48"):
        ckpt_io.load_model_weights(wider, ckpt)
    # the model config in the checkpoint no longer matches what its settings build (e.g. a preset changed)
    run = copy_run(trained, tmp_path)
    edited = run / "checkpoints" / "step-0000006"
    cfg = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    write_manifest(edited)  # re-sealed: the manifest is integrity, the config check is a separate guard
    err = one_line_error(capsys, ["train", "--resume", str(run), "--steps", "8"])
    assert "trained with num_hidden_layers=3, this run has num_hidden_layers=2" in err
    # settings given on resume that change the model are named one by one
    err = one_line_error(capsys, ["train", "--resume", str(trained / "run"), "--model-arg", "hidden_size=64"])
    assert "--model-arg hidden_size=64 (the run used hidden_size=32)" in err


def test_resume_refuses_a_tokenizer_that_changed_since_the_checkpoint(tmp_path, capsys):
    write_corpus(tmp_path / "corpus", n_docs=8)
    Trainer(config(tmp_path, "run", steps=2, tokenizer="bpe:300"), log=quiet).run()
    write_corpus(tmp_path / "corpus" / "more", n_docs=8, seed=5)  # the BPE is retrained on the new corpus
    err = one_line_error(capsys, ["train", "--resume", str(tmp_path / "run"), "--steps", "4"])
    assert "was trained with the tokenizer bpe" in err and "corpus or the tokenizer changed" in err


# -- no code execution -----------------------------------------------------------------------------------------
def test_no_pickle_anywhere_in_src():
    """Loading never unpickles: no pickle-family module, torch.load only with weights_only=True, np.load never
    with allow_pickle=True, from_pretrained only with use_safetensors=True and without trust_remote_code."""
    problems, calls = [], 0
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            where = f"{path.relative_to(SRC)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any((n or "").split(".")[0] in UNSAFE_MODULES for n in names):
                    problems.append(f"{where}: imports {names}")
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            kw = {k.arg: k.value.value for k in node.keywords if isinstance(k.value, ast.Constant)}
            if node.func.attr == "load" and owner == "torch":
                calls += 1
                if kw.get("weights_only") is not True:
                    problems.append(f"{where}: torch.load without weights_only=True")
            elif node.func.attr == "load" and owner in ("np", "numpy"):
                calls += 1
                if kw.get("allow_pickle", False) is not False:
                    problems.append(f"{where}: np.load with allow_pickle")
            elif node.func.attr == "from_pretrained" and "Config" not in owner:
                calls += 1
                if kw.get("use_safetensors") is not True or kw.get("trust_remote_code", False) is not False:
                    problems.append(f"{where}: from_pretrained without use_safetensors=True")
    assert not problems, "possible code execution on load:\n" + "\n".join(problems)
    assert calls >= 3  # the scan sees the loads that exist (np.load of the token cache, from_pretrained)


class _Payload:
    """Unpickling this creates a marker file: proof that code from the checkpoint ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickled_model_or_remote_code_in_a_checkpoint_never_runs(trained, tmp_path, capsys):
    import pickle

    run = copy_run(trained, tmp_path)
    ckpt = run / "checkpoints" / "step-0000006"
    marker = tmp_path / "code-ran"
    (ckpt / "model.safetensors").unlink()
    with open(ckpt / "pytorch_model.bin", "wb") as f:
        pickle.dump({"weight": _Payload(str(marker))}, f)
    write_manifest(ckpt)  # even a consistent manifest does not make a pickle loadable
    with pytest.raises((ValueError, OSError)):
        load_checkpoint(ckpt)
    one_line_error(capsys, ["eval", str(ckpt), "--no-progress"])
    one_line_error(capsys, ["train", "--resume", str(ckpt), "--steps", "8"])
    assert not marker.exists()
    # a config asking for custom code from the checkpoint directory
    shutil.rmtree(ckpt)
    shutil.copytree(trained / "run" / "checkpoints" / "step-0000006", ckpt)
    (ckpt / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoConfig": "evil.Config",
                                                                      "AutoModelForCausalLM": "evil.Model"}}))
    write_manifest(ckpt)
    try:
        load_checkpoint(ckpt)
    except (ValueError, OSError):
        pass
    assert not marker.exists()


def test_a_garbage_safetensors_file_is_a_one_line_error(trained, tmp_path):
    """Without a manifest (an old checkpoint), a damaged tensor file still gives a clear error, not a crash."""
    run = copy_run(trained, tmp_path)
    ckpt = run / "checkpoints" / "step-0000006"
    (ckpt / "rng-rank0.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="rng-rank0.safetensors is not a readable safetensors file"):
        ckpt_io.load_rng_state(ckpt, 0)
