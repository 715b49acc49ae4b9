"""Property tests (hypothesis): invalid configurations raise a ValueError that names the offending field, for BST
(built three ways) and every baseline; bad forward inputs give a clear ValueError on every registered model.

Derandomized with fixed example budgets, like tests/models/test_properties.py.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from helpers.properties import BASELINES, bst_fields, examples
from hypothesis import given
from hypothesis import strategies as st

from blockstate.layers import KERNELS, VARIANTS
from blockstate.layers.gss import GSS_KERNELS
from blockstate.models import BlockStateConfig, preset_config
from blockstate.models.configuration_blockstate import POSITION_ENCODINGS, PREVIOUS_BLOCK, S4D_INITS
from blockstate.registry import create_model, list_models, model_config

# -- invalid configurations ------------------------------------------------------------------------------------
POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "block_size", "ssm_state_size", "num_context_states", "max_train_length", "filter_hidden_size",
                 "filter_num_bands")
CHOICES = {"variant": VARIANTS, "kernel": KERNELS, "position_encoding": POSITION_ENCODINGS,
           "previous_block": PREVIOUS_BLOCK, "s4d_init": S4D_INITS}
POSITIVE_FLOATS = ("ssm_dt_min", "ssm_dt_max", "rope_theta", "rms_norm_eps")
DROPOUTS = ("hidden_dropout", "attention_dropout")
BOOLS = ("attend_previous_block", "tie_word_embeddings")

# wrong types shared by every kind of field (None is left out where it means "default")
WRONG_TYPES = st.one_of(st.text(max_size=4), st.just([1]), st.just({"a": 1}), st.just(object()))
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


def not_positive_int(allow_none: bool):
    bad = st.one_of(st.integers(-10, 0), st.booleans(), st.floats(0.5, 64.0), st.sampled_from([2.0, 8.0]),
                    NON_FINITE, WRONG_TYPES)
    return st.one_of(bad, st.none()) if allow_none else bad


def not_a_choice(allowed: tuple[str, ...]):
    return st.one_of(st.text(max_size=8).filter(lambda s: s not in allowed),
                     st.sampled_from([x.upper() for x in allowed] + [None, 0, 1, True]), st.just(list(allowed[:1])))


INVALID_BST_CASES = (
    [f"positive_int:{f}" for f in POSITIVE_INTS] + [f"choice:{f}" for f in CHOICES]
    + [f"dropout:{f}" for f in DROPOUTS] + [f"positive_float:{f}" for f in POSITIVE_FLOATS]
    + [f"bool:{f}" for f in BOOLS]
    + ["not_divisible", "odd_rope_head", "odd_state", "bst_layers:out_of_range", "bst_layers:duplicated",
       "bst_layers:not_ints", "bst_layers:not_a_collection", "dt_order", "init_range"]
)


@st.composite
def invalid_bst_fields(draw, case: str) -> tuple[dict, set[str]]:
    """A random valid config with one thing broken (``case``): (fields, names one of which the error must name)."""
    fields = draw(bst_fields())
    kind, _, name = case.partition(":")
    if kind == "positive_int":
        fields[name] = draw(not_positive_int(allow_none=name != "intermediate_size"))  # None: 4 * hidden_size
        return fields, {name}
    if kind == "choice":
        fields[name] = draw(not_a_choice(CHOICES[name]))
        return fields, {name}
    if kind == "dropout":
        fields[name] = draw(st.one_of(st.floats(1.0, 1e9), st.floats(-1e9, -1e-9), st.just(1), NON_FINITE,
                                      st.none(), WRONG_TYPES))
        return fields, {name}
    if kind == "positive_float":
        fields[name] = draw(st.one_of(st.floats(-1e9, 0.0), st.integers(-5, 0), NON_FINITE, st.none(),
                                      st.booleans(), WRONG_TYPES))
        return fields, {name}
    if kind == "bool":
        fields[name] = draw(st.one_of(st.integers(), st.none(), st.floats(), WRONG_TYPES))
        return fields, {name}
    if case == "not_divisible":
        heads = draw(st.integers(2, 6))
        remainder = draw(st.integers(1, heads - 1))
        fields.update(num_attention_heads=heads, hidden_size=heads * draw(st.integers(0, 6)) + remainder,
                      position_encoding=draw(st.sampled_from(POSITION_ENCODINGS)))
        return fields, {"hidden_size", "num_attention_heads"}
    if case == "odd_rope_head":
        heads = draw(st.integers(1, 4))
        fields.update(num_attention_heads=heads, hidden_size=heads * draw(st.sampled_from([1, 3, 5, 7])),
                      position_encoding="rope")
        return fields, {"hidden_size", "num_attention_heads", "position_encoding"}
    if case == "odd_state":
        fields["ssm_state_size"] = draw(st.sampled_from([1, 3, 5, 15, 17]))
        return fields, {"ssm_state_size"}
    if kind == "bst_layers":
        layers = fields["num_hidden_layers"]
        good = st.lists(st.integers(0, layers - 1), max_size=2, unique=True)
        fields["bst_layers"] = draw({
            "out_of_range": st.tuples(good, st.sampled_from([layers, layers + 7, -1, -layers - 1]),
                                      st.booleans()).map(lambda t: t[0] + [t[1]] if t[2] else [t[1]] + t[0]),
            "duplicated": st.integers(0, layers - 1).map(lambda i: [i, i]),
            "not_ints": st.lists(st.sampled_from([0.0, 1.5, "0", None, True, False, [0]]), min_size=1, max_size=2),
            "not_a_collection": st.sampled_from([0, 1, "0", "0,1", 2.5, True, {"0": 1}]),
        }[name])
        return fields, {"bst_layers"}
    if case == "dt_order":
        low = draw(st.floats(1e-4, 1.0))
        fields.update(ssm_dt_max=low, ssm_dt_min=low * draw(st.floats(1.01, 100.0)))
        return fields, {"ssm_dt_min", "ssm_dt_max"}
    assert case == "init_range", case
    fields["initializer_range"] = draw(st.one_of(st.floats(-1e3, -1e-9), NON_FINITE, st.none(), WRONG_TYPES))
    return fields, {"initializer_range"}


def construct(via: str, fields: dict):
    if via == "config":
        return BlockStateConfig(**fields)
    if via == "from_dict":  # what from_pretrained does with a config.json
        return BlockStateConfig.from_dict(fields)
    return preset_config("tiny", **fields)  # the preset / registry path


@pytest.mark.parametrize("case", INVALID_BST_CASES)
@examples(20)
@given(data=st.data(), via=st.sampled_from(["config", "from_dict", "preset"]))
def test_invalid_bst_configs_raise_value_error_naming_the_field(case, data, via):
    fields, names = data.draw(invalid_bst_fields(case), label="broken fields")
    with pytest.raises(ValueError) as info:  # any other exception type fails the test
        construct(via, fields)
    message = str(info.value)
    assert any(name in message for name in names), (case, message)


def invalid_baseline_cases() -> list[tuple[str, str]]:
    common = ["positive_int:vocab_size", "positive_int:hidden_size", "positive_int:num_hidden_layers",
              "positive_int:num_attention_heads", "positive_int:intermediate_size", "positive_int:max_train_length",
              "choice:kernel", "choice:position_encoding", "choice:previous_block"]
    extra = {"brect": ["recurrent_layers", "num_state_vectors", "state_gate", "state_gate_bias"],
             "gss-hybrid": ["attention_layers", "gss_hidden_size", "gss_narrow_size", "gss_state_size", "gss_kernel"]}
    return [(name, case) for name in BASELINES
            for case in common + extra.get(name, ["carry_state", "bst_layers", "positive_int:block_size"])]


@st.composite
def invalid_baseline_overrides(draw, case: str) -> tuple[dict, set[str]]:
    kind, _, field = case.partition(":")
    if kind == "positive_int":
        return {field: draw(not_positive_int(allow_none=field != "intermediate_size"))}, {field}
    if kind == "choice":
        return {field: draw(not_a_choice(CHOICES[field]))}, {field}
    if case in ("recurrent_layers", "attention_layers"):
        bad = [[4], [-1], [1, 1], 0, "1", [0.0], [None], {"0": 1}] + ([[]] if case == "recurrent_layers" else [])
        return {"num_hidden_layers": 4, case: draw(st.sampled_from(bad))}, {case}
    if case in ("num_state_vectors", "gss_hidden_size", "gss_narrow_size", "gss_state_size"):
        return {case: draw(not_positive_int(allow_none=False))}, {case}  # gss_*: None = derive from hidden_size
    if case == "state_gate":
        return {case: draw(not_a_choice(("fixed", "lstm")))}, {case}
    if case == "gss_kernel":
        return {case: draw(not_a_choice(GSS_KERNELS))}, {case}
    if case == "state_gate_bias":
        return {case: draw(st.one_of(NON_FINITE, st.none(), WRONG_TYPES))}, {case}
    if case == "carry_state":
        return {case: draw(st.one_of(st.integers(), st.none(), WRONG_TYPES))}, {case}
    assert case == "bst_layers", case
    return {case: draw(st.sampled_from([[0], [0, 1]]))}, {case}  # a baseline has no BST layers


@pytest.mark.parametrize("name,case", invalid_baseline_cases())
@examples(8)
@given(data=st.data())
def test_invalid_baseline_configs_raise_value_error_naming_the_field(name, case, data):
    overrides, names = data.draw(invalid_baseline_overrides(case), label="overrides")
    with pytest.raises(ValueError) as info:
        model_config(name, "tiny", **overrides)
    assert any(n in str(info.value) for n in names), (name, overrides, str(info.value))


# -- bad forward inputs ----------------------------------------------------------------------------------------
VOCAB = 23


def tiny_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    overrides = dict(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                     max_train_length=16)
    if name not in ("gpt", "transformer-xl"):
        overrides["block_size"] = 4
    if name.startswith("bst-"):
        overrides.update(num_context_states=2, bst_layers=[0])
    if name == "brect":
        overrides.update(num_state_vectors=2, recurrent_layers=[1])
    if name == "gss-hybrid":
        overrides.update(gss_hidden_size=8, gss_narrow_size=2, attention_layers=[1])
    return create_model(name, "tiny", **overrides).eval()


cached_tiny_model = functools.cache(tiny_model)  # read-only use: out-of-vocab ids never reach the model


GOOD = torch.tensor([[1, 2, 3, 4, 5]])
BAD_INPUTS = {
    "id_equal_to_vocab": (dict(input_ids=torch.tensor([[1, 2, VOCAB]])), "input_ids"),
    "negative_id": (dict(input_ids=torch.tensor([[1, -1, 2]])), "input_ids"),
    "float_ids": (dict(input_ids=torch.tensor([[1.0, 2.0]])), "input_ids"),
    "bool_ids": (dict(input_ids=torch.tensor([[True, False]])), "input_ids"),
    "1d_ids": (dict(input_ids=torch.tensor([1, 2, 3])), "input_ids"),
    "3d_ids": (dict(input_ids=torch.zeros(1, 2, 3, dtype=torch.long)), "input_ids"),
    "0d_ids": (dict(input_ids=torch.tensor(3)), "input_ids"),
    "empty_sequence": (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), "input_ids"),
    "empty_batch": (dict(input_ids=torch.zeros(0, 5, dtype=torch.long)), "input_ids"),
    "python_list": (dict(input_ids=[[1, 2, 3]]), "input_ids"),
    "labels_out_of_vocab": (dict(input_ids=GOOD, labels=torch.tensor([[1, 2, 3, 4, VOCAB + 5]])), "labels"),
    "labels_negative": (dict(input_ids=GOOD, labels=torch.tensor([[1, 2, -3, 4, 5]])), "labels"),
    "labels_float": (dict(input_ids=GOOD, labels=GOOD.float()), "labels"),
    "labels_wrong_shape": (dict(input_ids=GOOD, labels=GOOD[:, :3]), "labels"),
}
BST_ONLY_BAD_INPUTS = {
    "embeds_2d": (dict(inputs_embeds=torch.zeros(5, 8)), "inputs_embeds"),
    "embeds_wrong_width": (dict(inputs_embeds=torch.zeros(1, 5, 7)), "inputs_embeds"),
    "embeds_integer": (dict(inputs_embeds=torch.zeros(1, 5, 8, dtype=torch.long)), "inputs_embeds"),
    "embeds_empty": (dict(inputs_embeds=torch.zeros(1, 0, 8)), "inputs_embeds"),
    "ids_and_embeds": (dict(input_ids=GOOD, inputs_embeds=torch.zeros(1, 5, 8)), "input"),
    "mask_wrong_shape": (dict(input_ids=GOOD, attention_mask=torch.tensor([[0, 1, 1]])), "attention_mask"),
}


@pytest.mark.parametrize("name", list_models())
def test_bad_forward_inputs_raise_clear_value_errors(name):
    model = tiny_model(name)
    cases = {**BAD_INPUTS, **(BST_ONLY_BAD_INPUTS if name.startswith("bst-") or name == "gpt" else {})}
    for case, (kwargs, word) in cases.items():
        try:
            with torch.no_grad():
                model(**kwargs)
        except ValueError as error:
            assert word in str(error), (name, case, str(error))
        except Exception as error:  # e.g. an IndexError deep inside torch
            pytest.fail(f"{name}, {case}: {type(error).__name__} instead of a ValueError: {error}")
        else:
            pytest.fail(f"{name}, {case}: accepted")
    with torch.no_grad():  # the good input still works, labels with -100 (ignored) included
        labels = GOOD.clone()
        labels[0, 2] = -100
        out = model(GOOD, labels=labels)
    assert out.logits.shape == (1, 5, VOCAB) and torch.isfinite(out.loss)


@pytest.mark.parametrize("name", list_models())
@examples(5)
@given(length=st.integers(1, 12), batch=st.integers(1, 3), data=st.data())
def test_any_out_of_vocab_id_is_a_value_error(name, length, batch, data):
    ids = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=batch * length, max_size=batch * length))
    position = data.draw(st.integers(0, batch * length - 1))
    ids[position] = data.draw(st.one_of(st.integers(VOCAB, 2**40), st.integers(-(2**40), -1)), label="bad id")
    model = cached_tiny_model(name)
    with pytest.raises(ValueError, match="vocab_size"), torch.no_grad():
        model(torch.tensor(ids).view(batch, length))
