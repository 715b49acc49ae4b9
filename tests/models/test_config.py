"""Configuration validation and presets."""

import pytest

from blockstate.models import BlockStateConfig, preset_config
from blockstate.models.configuration_blockstate import default_bst_layers
from blockstate.registry import count_model_parameters, parameter_table


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(hidden_size=30, num_attention_heads=4), "num_attention_heads"),
        (dict(block_size=0), "block_size"),
        (dict(block_size=-3), "block_size"),
        (dict(bst_layers=[0, 4], num_hidden_layers=4), "bst_layers"),
        (dict(bst_layers=[-1]), "bst_layers"),
        (dict(bst_layers=[1, 1]), "bst_layers"),
        (dict(variant="xx"), "variant"),
        (dict(kernel="s5"), "kernel"),
        (dict(ssm_state_size=15), "ssm_state_size"),
        (dict(num_context_states=0), "num_context_states"),
        (dict(hidden_dropout=1.5), "hidden_dropout"),
        (dict(position_encoding="alibi"), "position_encoding"),
        (dict(previous_block="all"), "previous_block"),
        (dict(vocab_size=0), "vocab_size"),
    ],
)
def test_bad_config_raises_value_error_naming_field(overrides, field):
    with pytest.raises(ValueError, match=field) as info:
        BlockStateConfig(**overrides)
    message = str(info.value)
    if field in ("variant", "kernel"):
        assert "must be one of" in message  # names the allowed values


def test_default_bst_layers():
    assert default_bst_layers(12) == [0, 6, 8]
    assert default_bst_layers(4) == [0, 2]
    assert default_bst_layers(1) == [0]


def test_presets_and_parameter_counts():
    tiny = preset_config("tiny", "mf", "s4d")
    assert tiny.variant == "mf" and tiny.hidden_size == 256
    assert preset_config("tiny", hidden_size=128).hidden_size == 128
    from blockstate import BlockStateForCausalLM

    assert count_model_parameters("bst-mf-s4", "tiny") == sum(p.numel()
                                                               for p in BlockStateForCausalLM(tiny).parameters())
    with pytest.raises(ValueError, match="size"):
        preset_config("huge")


def test_paper_presets_near_reported_sizes():
    ratio = {r["name"]: r["parameters"]["paper"] / r["paper"] for r in parameter_table(sizes=["paper"]) if r["paper"]}
    assert 18e6 <= count_model_parameters("bst-sh-s4", "small") <= 22e6
    # SH within 5% of the paper; MH and MF add only SSM filters here (see README, "Parameter counts")
    assert abs(ratio["bst-sh-s4"] - 1) < 0.05
    assert abs(ratio["bst-sh-unstructured"] - 1) < 0.05
    for name in ["bst-mh-s4", "bst-mf-s4", "bst-mf-unstructured"]:
        assert 0.88 < ratio[name] < 1.0
