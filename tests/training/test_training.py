"""Unit tests of blockstate.training: config, model names, parameter groups, schedules, checkpoints."""

import copy
import errno
import json
import math
from pathlib import Path

import pytest
import torch
from helpers.training import TINY_MODEL
from safetensors.torch import load_file, save_file

from blockstate.models import BlockStateForCausalLM
from blockstate.registry import create_model as build_model
from blockstate.runtime import checkpoint as ckpt_io
from blockstate.training.config import TrainConfig, load_config_file, merge
from blockstate.training.optim import build_optimizer, group_of_parameters, lr_factor, set_lr
from blockstate.training.rundir import identity_mismatches


def tiny_model(name: str = "bst-sh-s4") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, "tiny", **TINY_MODEL)


def test_defaults_are_the_quick_start_run():
    cfg = TrainConfig().validate()
    assert (cfg.model, cfg.size, cfg.data, cfg.tokenizer) == ("bst-sh-s4", "tiny", "python-stdlib", "bytes")
    # the default budget is a token count (the same result on every machine), not a time
    assert cfg.default_budget() and cfg.effective_time_budget() is None and cfg.steps_for_tokens(2048) == 1465
    assert TrainConfig(steps=10).effective_time_budget() is None
    assert TrainConfig(time_budget=2.0).steps_for_tokens(2048) is None  # a time budget alone: no step count
    assert TrainConfig(tokens=1000).steps_for_tokens(64) == 16


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_config_file_then_flags(tmp_path, suffix):
    path = tmp_path / f"c.{suffix}"
    values = {"lr": 0.01, "seq-len": 128, "model_args": {"hidden_size": 64}}
    yaml_text = "lr: 0.01\nseq-len: 128\nmodel_args:\n  hidden_size: 64\n"
    path.write_text(json.dumps(values) if suffix == "json" else yaml_text)
    file_values = load_config_file(path)
    cfg = merge(file_values, {"lr": 0.02})
    assert cfg.lr == 0.02 and cfg.seq_len == 128 and cfg.model_args == {"hidden_size": 64}


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 3\n")
    with pytest.raises(ValueError, match="unknown setting 'learning_rate'"):
        load_config_file(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config_file(tmp_path / "missing.yaml")
    for field, value, msg in [("optimizer", "sgd", "--optimizer must be one of"), ("lr", -1.0, "--lr"),
                              ("batch_size", 0, "--batch-size"), ("seq_len", 1, "--seq-len"),
                              ("beta2", 1.0, "--beta2")]:
        with pytest.raises(ValueError, match=msg):
            TrainConfig(**{field: value}).validate()


def test_identity_mismatches():
    saved = TrainConfig(lr=1e-3)
    assert identity_mismatches(saved, {"lr": 1e-3, "steps": 99, "eval_every": 5}) == []
    assert identity_mismatches(saved, {"lr": 2e-3})[0].startswith("--lr 0.002")


def test_model_names():
    assert build_model("BST-MF-unstructured", "tiny", **TINY_MODEL).config.kernel == "unstructured"
    with pytest.raises(ValueError, match="unknown model 'gpt-9'.*bst-sh-s4"):
        build_model("gpt-9")
    m = tiny_model("bst-mh-s4")
    assert isinstance(m, BlockStateForCausalLM) and m.config.variant == "mh" and m.config.hidden_size == 32


def test_parameter_groups_and_learning_rates():
    model = tiny_model("bst-mf-s4")
    groups = group_of_parameters(model)
    ssm = {n for n, p in model.named_parameters() if getattr(p, "_ssm", False)}
    assert ssm and all(groups[n] == "ssm" for n in ssm)
    assert groups["model.embed_tokens.weight"] == "no_decay"
    assert all(groups[n] == "no_decay" for n in groups if n.endswith("norm.weight") or "context_ids" in n)
    assert groups["model.layers.1.attention.qkv.weight"] == "decay"
    opt = build_optimizer(model, groups, TrainConfig(lr=3e-3, weight_decay=0.1))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["ssm"]["lr"] == 1e-3 and by_name["ssm"]["weight_decay"] == 0.0
    assert by_name["no_decay"]["weight_decay"] == 0.0 and by_name["decay"]["weight_decay"] == 0.1
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    set_lr(opt, 0.5)
    assert by_name["ssm"]["lr"] == 5e-4 and by_name["decay"]["lr"] == 1.5e-3


@pytest.mark.parametrize("name", ["bst-sh-s4", "bst-mh-unstructured", "gss-hybrid"])
def test_parameter_groups_survive_from_pretrained_and_deepcopy(name, tmp_path):
    """The SSM marks live on the layers, not on the parameter objects that from_pretrained replaces: a loaded
    or copied model trains its SSM with the SSM's learning rate."""
    model = build_model(name, size="tiny")
    groups = group_of_parameters(model)
    assert "ssm" in groups.values()
    model.save_pretrained(tmp_path)
    assert group_of_parameters(type(model).from_pretrained(tmp_path)) == groups
    assert group_of_parameters(copy.deepcopy(model)) == groups


def test_schedules():
    cfg = TrainConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg, 100) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 100) == pytest.approx(1.0)
    assert lr_factor(10, cfg, 100) == pytest.approx(1.0)
    assert lr_factor(100, cfg, 100) == pytest.approx(0.1)
    assert lr_factor(55, cfg, 100) == pytest.approx(0.55)
    assert lr_factor(50, cfg, None, progress=1.0) == pytest.approx(0.1)
    inv = TrainConfig(warmup_steps=10, schedule="inverse-sqrt")
    assert lr_factor(9, inv, None) == pytest.approx(1.0) and lr_factor(39, inv, None) == pytest.approx(0.5)
    assert lr_factor(500, TrainConfig(warmup_steps=0, schedule="constant"), 10) == 1.0


def _train_steps(model, opt, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(0, 257, (2, 32), generator=g)
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_optimizer_state_roundtrip_without_pickle(tmp_path, optimizer):
    cfg = TrainConfig(optimizer=optimizer)
    ref = tiny_model()
    opt = build_optimizer(ref, group_of_parameters(ref), cfg)
    _train_steps(ref, opt, 2)
    tensors, meta = ckpt_io.flatten_optimizer_state(opt.state_dict())
    save_file(tensors, tmp_path / "o.safetensors")
    (tmp_path / "o.json").write_text(json.dumps(meta))
    other = tiny_model()
    other.load_state_dict(ref.state_dict())
    opt2 = build_optimizer(other, group_of_parameters(other), cfg)
    state = ckpt_io.unflatten_optimizer_state(load_file(tmp_path / "o.safetensors"),
                                              json.loads((tmp_path / "o.json").read_text()), opt2.param_groups)
    opt2.load_state_dict(state)
    if optimizer == "adamw":  # fused: the step counters come back as float32 tensors on the parameters' device
        assert all(g["fused"] for g in opt2.param_groups)
        assert all(s["step"].dtype == torch.float32 and s["step"].device == p.device and float(s["step"]) == 2
                   for p, s in opt2.state.items())
    _train_steps(ref, opt, 1, seed=5)
    _train_steps(other, opt2, 1, seed=5)
    for a, b in zip(ref.parameters(), other.parameters()):
        assert torch.equal(a, b)


def _save(run_dir, step, model, keep=2, **kw):
    opt = build_optimizer(model, group_of_parameters(model), TrainConfig())
    return ckpt_io.save_checkpoint(run_dir, step, model=model, model_state=None, optimizer_state=opt.state_dict(),
                                   trainer_state={"step": step, "run_id": "abc"}, train_config={}, tokenizer=None,
                                   keep=keep, **kw)


def test_checkpoint_layout_latest_prune_and_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    for step in (1, 2, 3):
        _save(tmp_path, step, model)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0000002", "step-0000003"]
    assert ckpt_io.latest_checkpoint(tmp_path).name == "step-0000003"
    files = {p.name for p in (root / "step-0000003").iterdir()}
    assert {"model.safetensors", "config.json", "optimizer.safetensors", "optimizer.json", "trainer_state.json",
            "rng-rank0.safetensors", "rng-rank0.json"} <= files
    assert not [f for f in files if f.endswith((".pt", ".bin", ".pkl"))]  # nothing needs unpickling
    loaded = AutoModelForCausalLM.from_pretrained(root / "step-0000003")
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n
    # a kill mid-write leaves a .tmp dir and maybe a stale pointer: the newest complete checkpoint still wins
    (root / ".tmp-step-0000004").mkdir()
    (root / "latest").write_text("step-0000004\n")
    assert ckpt_io.latest_checkpoint(tmp_path).name == "step-0000003"
    fresh = tiny_model()
    torch.nn.init.zeros_(fresh.lm_head.weight)
    ckpt_io.load_model_weights(fresh, root / "step-0000003")
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)  # tied weight restored from the embedding


def test_disk_full_keeps_last_checkpoint(tmp_path, monkeypatch):
    model = tiny_model()
    _save(tmp_path, 1, model)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_io, "save_file", full)
    with pytest.raises(OSError, match="no space left.*free some space or pass another --output"):
        _save(tmp_path, 2, model)
    root = tmp_path / "checkpoints"
    assert ckpt_io.latest_checkpoint(tmp_path).name == "step-0000001"
    assert not list(root.glob(".tmp-*"))


def test_rng_state_roundtrip(tmp_path):
    import random

    import numpy as np

    tensors, meta = ckpt_io.rng_state()
    save_file(tensors, tmp_path / "r.safetensors")
    (tmp_path / "r.json").write_text(json.dumps(meta))
    expected = (torch.rand(3), random.random(), np.random.rand())
    ckpt_io.set_rng_state(load_file(tmp_path / "r.safetensors"), json.loads((tmp_path / "r.json").read_text()))
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_resolve_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt_io.resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        ckpt_io.resolve_checkpoint(tmp_path)
    _save(tmp_path / "run", 5, tiny_model())
    assert ckpt_io.resolve_checkpoint(tmp_path / "run").name == "step-0000005"
    assert math.isfinite(1.0) and Path(ckpt_io.resolve_checkpoint(tmp_path / "run")).is_dir()


def test_precision_policy():
    from contextlib import nullcontext

    from blockstate.runtime.device import autocast_factory, fast_bf16, use_bf16

    cpu = torch.device("cpu")
    assert not use_bf16("fp32", cpu) and use_bf16("bf16", cpu)
    assert use_bf16("auto", cpu) == fast_bf16(cpu)
    assert autocast_factory("fp32", cpu) is nullcontext
    with autocast_factory("bf16", cpu)():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
