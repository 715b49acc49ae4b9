"""Config tiers (issue 14): the baselines' configs have the fields they read and none of BST's own; a config.json
saved when they inherited BST's still loads; a BST-only override is refused naming the model and the field, in
the registry and across the rows of ``blockstate compare``; ``blockstate presets`` is ``blockstate models``."""

import json

import pytest
import torch
from helpers.training import write_corpus
from transformers import AutoModelForCausalLM

from blockstate.cli.main import main
from blockstate.models import BlockStateConfig, BlockTransformerConfig, GatedStateSpaceConfig
from blockstate.registry import create_model, known_fields, list_models, model_config

BST_ONLY = {"variant", "kernel", "num_context_states", "ssm_residual", "ssm_residual_layers"}
KERNEL_SETTINGS = {"ssm_state_size", "s4d_init", "ssm_dt_min", "ssm_dt_max", "filter_hidden_size", "filter_num_bands"}
SHARED = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "block_size",
          "max_train_length", "hidden_dropout", "attention_dropout", "position_encoding", "attend_previous_block"}
SMALL = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64)


@pytest.mark.parametrize("name", list_models())
def test_each_config_has_the_fields_its_model_reads(name):
    fields = set(model_config(name, "paper").to_dict())
    assert SHARED <= fields
    if name.startswith("bst-"):
        assert BST_ONLY | KERNEL_SETTINGS <= fields
    elif name == "gss-hybrid":  # its narrow branch runs the project's SSM kernels too
        assert KERNEL_SETTINGS <= fields and not BST_ONLY & fields
    else:
        assert not (BST_ONLY | KERNEL_SETTINGS) & fields


def test_known_fields_follow_the_config_tiers():
    assert BST_ONLY | KERNEL_SETTINGS <= known_fields(BlockStateConfig)
    assert not (BST_ONLY | KERNEL_SETTINGS) & known_fields(BlockTransformerConfig)
    assert KERNEL_SETTINGS <= known_fields(GatedStateSpaceConfig)
    assert not BST_ONLY & known_fields(GatedStateSpaceConfig)


@pytest.mark.parametrize("name,extra", [("slide", {}), ("brect", dict(num_state_vectors=4)),
                                        ("gss-hybrid", dict(gss_hidden_size=64, gss_narrow_size=8))])
def test_a_config_json_saved_with_bst_fields_still_loads(name, extra, tmp_path):
    """Checkpoints saved while the baselines' configs inherited BST's fields have them in config.json."""
    torch.manual_seed(0)
    model = create_model(name, "tiny", **SMALL, **extra)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.update(variant="sh", kernel="s4d", ssm_state_size=16, num_context_states=16, s4d_init="lin",
                 ssm_residual="none", filter_hidden_size=64, bst_layers=[])
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    for (key, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_a_bst_only_override_is_refused_for_a_baseline():
    with pytest.raises(ValueError, match="unknown config field 'num_context_states' for model gpt"):
        model_config("gpt", "tiny", num_context_states=4)
    with pytest.raises(ValueError, match="unknown config field 'variant' for model gss-hybrid"):
        model_config("gss-hybrid", "tiny", variant="mf")
    with pytest.raises(ValueError, match="bst_layers must be empty"):
        model_config("gss-hybrid", "tiny", bst_layers=[0])
    assert model_config("gss-hybrid", "tiny", ssm_state_size=32).ssm_state_size == 32  # a field GSS has


def test_compare_refuses_a_model_arg_one_row_lacks(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", n_docs=4)
    argv = ["compare", "--models", "bst-sh-s4,slide", "--corpora", str(corpus), "--tokens", "2048", "--runs",
            str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
            "--no-progress", "--model-arg", "ssm_state_size=32"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown --model-arg 'ssm_state_size' for model slide" in err
    assert not (tmp_path / "runs").exists()


def test_presets_is_an_alias_of_models(capsys):
    assert main(["models", "--size", "tiny", "--model", "gpt", "--model", "bst-sh-s4"]) == 0
    models = capsys.readouterr().out
    assert main(["presets", "--size", "tiny", "--model", "gpt", "--model", "bst-sh-s4"]) == 0
    assert capsys.readouterr().out == models and "bst-sh-s4" in models
