"""The model registry: names, errors, presets and parameter budgets, the CLI table, the trainer's factory."""

import pytest
import torch

import blockstate
from blockstate.cli.main import main
from blockstate.models import SIZES, BlockStateForCausalLM
from blockstate.registry import (
    REFERENCE_MODEL,
    TUNED_SETTINGS,
    carries_state,
    count_model_parameters,
    create_model,
    get_model_entry,
    list_models,
    model_config,
    model_name,
    parameter_table,
    register_model,
)

BASELINES = ["gpt", "slide", "transformer-xl", "brect", "gss-hybrid"]


def test_every_name_the_issue_asks_for_is_registered():
    bst = [f"bst-{v}-{k}" for v in ("sh", "mh", "mf") for k in ("s4", "unstructured", "explicit")]
    tuned = ["bst-sh-s4-gated"]  # the preset chosen by blockstate ablate
    assert list_models() == bst + tuned + BASELINES
    assert blockstate.list_models() == list_models() and blockstate.create_model is create_model


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="known models: bst-sh-s4, .*gss-hybrid") as err:
        create_model("bst-xx-s4")
    assert "did you mean 'b" in str(err.value)
    with pytest.raises(ValueError, match="did you mean 'slide'"):
        get_model_entry("slid")


def test_names_are_forgiving_about_case_underscores_and_s4d():
    assert get_model_entry("BST_SH_S4D").name == "bst-sh-s4"
    assert get_model_entry(" Transformer_XL ").name == "transformer-xl"


def test_unknown_size_is_rejected_for_every_model():
    for name in ("bst-sh-s4", *BASELINES):
        with pytest.raises(ValueError, match="size must be one of"):
            model_config(name, size="huge")


@pytest.mark.parametrize("name", list_models())
def test_bst_names_build_the_bst_model_with_their_variant_and_kernel(name):
    config = model_config(name, "tiny")
    if name.startswith("bst-"):
        _, variant, kernel = name.split("-")[:3]
        assert (config.variant, config.kernel) == (variant, {"s4": "s4d"}.get(kernel, kernel))
        assert get_model_entry(name).model_class is BlockStateForCausalLM
    assert model_name(config) == name


def test_overrides_win_and_presets_keep_the_shared_pipeline_fields():
    config = model_config("slide", "small", block_size=32, vocab_size=1000)
    assert (config.block_size, config.vocab_size) == (32, 1000)
    assert config.max_train_length == SIZES["small"]["max_train_length"]
    assert config.attend_previous_block and config.carry_state
    assert model_config("gpt", "tiny").block_size >= 2**30 and not model_config("gpt", "tiny").carry_state
    # Transformer-XL: the window follows the training length unless given
    assert model_config("transformer-xl", "paper").block_size == 2048
    assert model_config("transformer-xl", "tiny", max_train_length=128).block_size == 64
    # BRecT: S = W states (512 at paper size), one recurrent layer third from the top
    paper = model_config("brect", "paper")
    assert (paper.num_state_vectors, paper.recurrent_layers, paper.state_gate) == (512, [9], "fixed")
    assert model_config("brect", "tiny", block_size=16).num_state_vectors == 16


@pytest.mark.parametrize("size", list(SIZES))
def test_baselines_match_the_bst_budget_within_5_percent(size):
    reference = count_model_parameters(REFERENCE_MODEL, size)
    for name in BASELINES:
        ratio = count_model_parameters(name, size) / reference
        assert abs(ratio - 1) < 0.05, (name, size, ratio)


def test_paper_size_baselines_match_the_papers_counts():
    assert abs(count_model_parameters("slide", "paper") / 190e6 - 1) < 0.01
    assert abs(count_model_parameters("brect", "paper") / 196e6 - 1) < 0.01
    assert count_model_parameters("gpt", "paper") == count_model_parameters("transformer-xl", "paper")


def test_parameter_table_and_cli(capsys):
    rows = parameter_table(["slide", "bst-sh-s4"], ["tiny"])
    assert [r["name"] for r in rows] == ["slide", "bst-sh-s4"]
    assert rows[0]["carries_state"] and not rows[1]["carries_state"] and rows[1]["ratio"]["tiny"] == 1.0
    assert main(["models", "--size", "tiny"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in list_models())
    assert main(["models", "--model", "nope"]) == 2
    assert "known models" in capsys.readouterr().err


def test_carries_state_helper_sees_through_wrappers():
    slide = create_model("slide", "tiny", hidden_size=32, num_attention_heads=4, intermediate_size=64)
    wrapper = torch.nn.Module()
    wrapper.module = slide
    assert carries_state(slide) and carries_state(wrapper)
    assert not carries_state(create_model("gpt", "tiny", hidden_size=32, num_attention_heads=4))
    assert not carries_state(create_model("bst-sh-s4", "tiny", hidden_size=32, num_attention_heads=4))


def test_register_a_new_model_and_refuse_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_model("slide", get_model_entry("slide").config, get_model_entry("slide").model_class)


def test_train_help_lists_every_registered_name():
    import argparse

    from blockstate.cli import train as train_cli

    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers(), "train")
    train = parser._subparsers._group_actions[0].choices["train"]
    (model_flag,) = [a for a in train._actions if "--model" in a.option_strings]
    assert all(name in model_flag.help for name in list_models())


@pytest.mark.parametrize("name", ["bst-sh-s4-gated"])
@pytest.mark.parametrize("size", ["tiny", "small", "paper"])
def test_tuned_presets_match_the_reference_count_and_are_config_data(name, size):
    config = model_config(name, size)
    assert all(getattr(config, k) == v for k, v in TUNED_SETTINGS.items())
    ratio = count_model_parameters(name, size) / count_model_parameters("bst-sh-s4", size)
    assert abs(ratio - 1) < 0.01
    # overrides still win, and the FFN is matched again for a changed shape
    ratio = (count_model_parameters(name, size, num_hidden_layers=2, bst_layers=[0])
             / count_model_parameters("bst-sh-s4", size, num_hidden_layers=2))  # the reference at that depth
    assert abs(ratio - 1) < 0.02
    assert model_config(name, size, intermediate_size=64).intermediate_size == 64


def test_a_misspelt_override_is_refused_with_the_closest_field():
    """HF configs store unknown keyword arguments silently: hiden_size=64 used to build a 256-wide model."""
    for name in list_models():
        with pytest.raises(ValueError, match=r"unknown config field 'hiden_size' .*did you mean 'hidden_size'"):
            create_model(name, size="tiny", hiden_size=64)
    with pytest.raises(ValueError, match="unknown config field 'xyzzy'.*its fields are .*hidden_size"):
        model_config("gpt", "tiny", xyzzy=1)
    with pytest.raises(ValueError, match="did you mean 'num_state_vectors'"):
        count_model_parameters("brect", "tiny", num_state_vector=8)
    # real fields (of the model's own config class) and the HF token ids still pass
    assert model_config("brect", "tiny", num_state_vectors=8).num_state_vectors == 8
    assert model_config("gss-hybrid", "tiny", gss_narrow_size=32, eos_token_id=0).gss_narrow_size == 32
    assert create_model("bst-sh-s4", "tiny", hidden_size=64, num_attention_heads=2).config.hidden_size == 64


def test_saved_configs_with_extra_keys_still_load(tmp_path):
    """The check sits at the user-facing entry points only: from_pretrained of a saved config is untouched."""
    from transformers import AutoConfig

    config = model_config("bst-sh-s4", "tiny")
    config.some_extra_key = 1  # what HF or an older version may have written
    config.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).some_extra_key == 1
