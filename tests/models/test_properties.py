"""Property tests (hypothesis) over random configurations: valid ones run, are causal and finite; invalid ones
raise a ValueError that names the offending field; bad forward inputs give a clear ValueError.

Every test here is derandomized (the same examples on every run, no example database) with a fixed, bounded
number of examples, so CI is reproducible. Models are tiny (D <= 32, <= 3 layers, L <= ~80): the whole file
(about 1,600 examples) takes about 10 s on one thread.
"""

from __future__ import annotations

import functools
import math
import random

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from blockstate.layers import KERNELS, VARIANTS
from blockstate.layers.gss import GSS_KERNELS
from blockstate.models import BlockStateConfig, BlockStateForCausalLM, preset_config
from blockstate.models.configuration_blockstate import POSITION_ENCODINGS, PREVIOUS_BLOCK, S4D_INITS
from blockstate.registry import create_model, list_models, model_config


def examples(n: int):
    """A fixed, reproducible budget of ``n`` examples per test."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=True,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no slow "explain" phase
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


BASELINES = [n for n in list_models() if not n.startswith("bst-")]




# -- valid configurations --------------------------------------------------------------------------------------
def chooser(draw) -> random.Random:
    """A seeded RNG for the categorical choices of one example. Hypothesis's own ``sampled_from`` favours the first
    options (it generates and shrinks towards them): 60 examples once covered no MF variant and had no BST layer in
    two thirds of them. A drawn seed spreads the choices evenly and stays reproducible."""
    return random.Random(draw(st.integers(0, 2**32 - 1), label="choice seed"))


@st.composite
def bst_fields(draw, variant: str | None = None, kernel: str | None = None) -> dict:
    """Keyword arguments of a random *valid* BlockStateConfig: every variant x kernel, small sizes, any subset of
    BST layers (empty and all included), every attention / position option."""
    rng = chooser(draw)
    position = rng.choice(POSITION_ENCODINGS)
    heads = draw(st.integers(1, 4))
    head_dim = rng.choice([2, 4, 6, 8] if position == "rope" else [1, 2, 3, 5, 8])
    layers = draw(st.integers(1, 3))
    mode = rng.choices(["all", "some", "none"], weights=[4, 4, 2])[0]
    bst_layers = {"all": list(range(layers)), "none": [],
                  "some": sorted(rng.sample(range(layers), rng.randint(1, layers)))}[mode]
    return dict(
        vocab_size=draw(st.integers(2, 40)),
        hidden_size=heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=draw(st.integers(1, 48)),
        block_size=draw(st.integers(1, 12)),
        variant=variant or rng.choice(VARIANTS),
        kernel=kernel or rng.choice(KERNELS),
        bst_layers=bst_layers,
        ssm_state_size=rng.choice([2, 4, 8, 16]),
        num_context_states=draw(st.integers(1, 5)),
        max_train_length=draw(st.integers(1, 40)),
        s4d_init=rng.choice(S4D_INITS),
        filter_hidden_size=draw(st.integers(1, 16)),
        filter_num_bands=draw(st.integers(1, 6)),
        attend_previous_block=rng.random() < 0.5,
        previous_block=rng.choice(PREVIOUS_BLOCK),
        position_encoding=position,
        initializer_range=rng.choice([0.02, 0.2]),  # 0.2: larger activations, leaks show more
    )


LENGTH_KINDS = ("1", "W-1", "W", "W+1", "past_train_length", "any")


def draw_length_and_cut(draw, block: int, train_length: int) -> tuple[int, int]:
    """A sequence length at the edges (1, W-1, W, W+1, beyond the training length, or anything up to 64) and where
    its future starts (at or next to a block boundary, or anywhere; never 0 when length > 1: a cut at 0 checks
    nothing before it)."""
    rng = chooser(draw)
    kind = rng.choice(LENGTH_KINDS)
    length = {"1": 1, "W-1": block - 1, "W": block, "W+1": block + 1, "any": rng.randint(1, 64),
              "past_train_length": train_length + rng.randint(1, 2 * block + 5)}[kind]
    length = max(1, length)
    event(f"length {kind}")  # pytest --hypothesis-show-statistics: what the examples covered
    if length == 1:
        return 1, 0
    edges = sorted({min(max(1, c), length - 1) for c in (block - 1, block, block + 1, length - 1)})
    return length, rng.choice(edges + [rng.randint(1, length - 1)] * 2)


def random_ids(vocab: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randint(0, vocab, shape)


def check_forward_and_causality(model: torch.nn.Module, vocab: int, batch: int, length: int, cut: int) -> None:
    """Shapes, dtype, finiteness of the logits and the loss; causality: changing tokens at positions >= cut
    leaves the logits before cut unchanged and changes them at cut; the prefix alone gives the same logits."""
    x = random_ids(vocab, (batch, length))
    y = x.clone()
    y[:, cut:] = (x[:, cut:] + torch.randint(1, vocab, y[:, cut:].shape)) % vocab  # every future token differs
    with torch.no_grad():
        out = model(x, labels=x)
        a, b = out.logits, model(y).logits
    assert a.shape == (batch, length, vocab) and a.dtype == torch.float32
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    if length > 1:
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    # The FFT spreads rounding (not information) over all positions: measured <= 2e-7 relative over these
    # examples; a leak through attention or a wrapped FFT measured >= 4e-5 (3e-6 in the weakest example).
    tol = 3e-6 * max(1.0, float(a.abs().max()))
    if cut > 0:
        assert (a[:, :cut] - b[:, :cut]).abs().max() <= tol, "earlier logits depend on future tokens"
    assert not torch.equal(a[:, cut], b[:, cut]), "the logits at the cut ignore the token there"
    if cut > 0:
        with torch.no_grad():
            prefix = model(x[:, :cut]).logits
        assert (prefix - a[:, :cut]).abs().max() <= tol, "a prefix alone differs from the same prefix in context"


@pytest.mark.parametrize("variant,kernel", [(v, k) for v in VARIANTS for k in KERNELS])
@examples(30)
@given(data=st.data())
def test_valid_bst_configs_run_finite_and_causal(variant, kernel, data):
    fields = data.draw(bst_fields(variant, kernel), label="config")
    length, cut = draw_length_and_cut(data.draw, fields["block_size"], fields["max_train_length"])
    batch = data.draw(st.integers(1, 3), label="batch")
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    config = BlockStateConfig(**fields)
    layers = config.num_hidden_layers
    event("bst layers " + ("none" if not config.bst_layers else "all" if len(config.bst_layers) == layers else "some"))
    assert config.bst_layers == fields["bst_layers"]
    model = BlockStateForCausalLM(config).eval()
    kinds = [type(layer).__name__ for layer in model.model.layers]
    assert [i for i, kind in enumerate(kinds) if kind == "BSTLayer"] == fields["bst_layers"]
    check_forward_and_causality(model, fields["vocab_size"], batch, length, cut)


@st.composite
def baseline_overrides(draw, name: str) -> dict:
    """Small valid overrides for a registry baseline."""
    rng = chooser(draw)
    heads = draw(st.integers(1, 3))
    layers = draw(st.integers(1, 3))
    overrides = dict(vocab_size=draw(st.integers(2, 40)), hidden_size=heads * rng.choice([2, 4, 8]),
                     num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=draw(st.integers(1, 32)),
                     max_train_length=draw(st.integers(2, 40)))
    if name not in ("gpt", "transformer-xl"):  # gpt: full attention; transformer-xl: W = max_train_length / 2
        overrides["block_size"] = draw(st.integers(1, 10))
    if name == "brect":
        overrides.update(num_state_vectors=draw(st.integers(1, 6)),
                         recurrent_layers=sorted(rng.sample(range(layers), rng.randint(1, layers))),
                         state_gate=rng.choice(["fixed", "lstm"]))
    if name == "gss-hybrid":
        overrides.update(gss_hidden_size=draw(st.integers(2, 32)), gss_narrow_size=draw(st.integers(1, 8)),
                         attention_layers=sorted(rng.sample(range(layers), rng.randint(0, layers))),
                         gss_kernel=rng.choice(GSS_KERNELS), gss_state_size=draw(st.integers(1, 8)))
    return overrides


@pytest.mark.parametrize("name", BASELINES)
@examples(20)
@given(data=st.data())
def test_valid_baseline_configs_run_finite_and_causal(name, data):
    overrides = data.draw(baseline_overrides(name), label="overrides")
    config = model_config(name, "tiny", **overrides)
    block = min(config.block_size, 64)  # gpt: one block of any length
    length, cut = draw_length_and_cut(data.draw, block, config.max_train_length)
    batch = data.draw(st.integers(1, 3), label="batch")
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    model = create_model(name, "tiny", **overrides).eval()
    check_forward_and_causality(model, overrides["vocab_size"], batch, length, cut)


@pytest.mark.parametrize("variant", VARIANTS)
@examples(10)
@given(data=st.data())
def test_streaming_equals_parallel_on_random_configs(variant, data):
    """Prefill of any length, then token-by-token decoding, reproduces the parallel forward."""
    fields = data.draw(bst_fields(variant), label="config")
    event(f"kernel {fields['kernel']}")
    length = data.draw(st.integers(2, 3 * fields["block_size"] + 4), label="length")
    prefill = data.draw(st.integers(1, length - 1), label="prefill")
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    model = BlockStateForCausalLM(BlockStateConfig(**fields)).eval()
    ids = random_ids(fields["vocab_size"], (2, length))
    with torch.no_grad():
        ref = model(ids).logits
        pre = model(ids[:, :prefill], use_cache=True)
        rest = [model(ids[:, t : t + 1], cache=pre.cache).logits for t in range(prefill, length)]
    out = torch.cat([pre.logits, *rest], dim=1)
    assert (out - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))


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
