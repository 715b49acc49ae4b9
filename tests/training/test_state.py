"""TrainState's checkpoint format and TrainConfig's one declaration per field (flags, groups, checks)."""

import argparse
import dataclasses

import pytest

from blockstate.cli.train import add_setting_flags
from blockstate.training.config import GROUPS, KINDS, MUTABLE, TrainConfig
from blockstate.training.state import TrainState

# the keys of trainer_state.json in the order every checkpoint so far has them (resume reads older runs)
STATE_KEYS = ["run_id", "step", "total_steps", "tokens", "train_seconds", "warmup_end_seconds", "world_size",
              "global_batch", "seq_len", "loader", "schedule", "skipped_steps", "data_fingerprint"]


class Loader:
    def __init__(self):
        self.position = {"epoch": 0, "index": 0}

    def state_dict(self):
        return dict(self.position)

    def load_state_dict(self, state):
        self.position = dict(state)


def test_state_dict_keeps_the_checkpoint_format_and_round_trips():
    state = TrainState(run_id="r1", step=7, total_steps=10, tokens=700, train_seconds=1.5, warmup_end_seconds=0.5,
                       world_size=1, global_batch=4, seq_len=64, schedule="cosine", skipped_steps=1,
                       data_fingerprint="abc", loader=Loader())
    state.loader.position = {"epoch": 1, "index": 3}
    saved = state.state_dict()
    assert list(saved) == STATE_KEYS and saved["schedule"] == {"kind": "cosine", "step": 7}
    fresh = TrainState(global_batch=4, total_steps=99, loader=Loader())
    fresh.load_state_dict(saved, total_steps=False)  # this launch gave its own budget
    assert (fresh.step, fresh.tokens, fresh.train_seconds, fresh.skipped_steps) == (7, 700, 1.5, 1)
    assert fresh.total_steps == 99 and fresh.warmup_end_seconds == 0.5 and fresh.loader.position["index"] == 3
    fresh.load_state_dict(saved)
    assert fresh.total_steps == 10


def test_an_old_state_without_newer_keys_resumes_and_a_changed_batch_is_refused():
    old = {"step": 3, "tokens": 300, "train_seconds": 2.0, "global_batch": 4, "loader": {"epoch": 0, "index": 1}}
    state = TrainState(global_batch=4, loader=Loader())
    state.load_state_dict(old)
    assert state.skipped_steps == 0 and state.warmup_end_seconds is None and state.total_steps is None
    with pytest.raises(ValueError, match="global batch of 4 segments"):
        TrainState(global_batch=8, loader=Loader()).load_state_dict(old)


def test_every_field_is_declared_once_with_a_flag_a_group_and_a_kind():
    p = argparse.ArgumentParser()
    add_setting_flags(p)
    dests = {a.dest for a in p._actions if a.option_strings and a.dest != "help"}
    fields = dataclasses.fields(TrainConfig)
    assert dests == {f.name for f in fields}
    assert all(f.metadata["group"] in GROUPS and f.metadata["kind"] in KINDS for f in fields)
    assert "batch_size" in MUTABLE and "lr" not in MUTABLE and "model" not in MUTABLE
    # only the flags given reach the namespace (a --config file keeps the rest)
    assert vars(p.parse_args(["--lr", "1e-3", "--no-packing"])) == {"lr": 1e-3, "packing": False}


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "--batch-size must be a positive integer, got 0"),
    ("eval_every", -1, "--eval-every must be a non-negative integer, got -1"),
    ("optimizer", "sgd", "--optimizer must be one of adamw, adafactor, got 'sgd'"),
    ("optimizer", 3, "--optimizer must be a string, got 3"),
    ("beta2", 1.0, "--beta2 must be in [0, 1), got 1.0"),
    ("dropout", "x", "--dropout must be a number, got 'x'"),
    ("ssm_lr", 0.0, "--ssm-lr must be a positive number, got 0.0"),
    ("weight_decay", float("inf"), "--weight-decay must be a finite number >= 0, got inf"),
    ("text_field", "", "--text-field must be a field name, got ''"),
    ("model_args", [], "model_args must be a mapping of model-config fields, got []"),
    ("seq_len", 1, "--seq-len must be at least 2 (one input and one target), got 1"),
])
def test_checks_derived_from_the_declarations_keep_their_messages(field, value, message):
    with pytest.raises(ValueError) as info:
        TrainConfig(**{field: value}).validate()
    assert str(info.value) == message


def test_nullable_fields_take_none():
    TrainConfig(steps=None, ssm_lr=None, dropout=None, output=None, suffixes=None).validate()
