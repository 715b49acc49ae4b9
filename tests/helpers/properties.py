"""Hypothesis settings and strategies shared by the property tests (tests/models/test_properties*.py)."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from blockstate.layers import KERNELS, VARIANTS
from blockstate.models.configuration_blockstate import POSITION_ENCODINGS, PREVIOUS_BLOCK, S4D_INITS
from blockstate.registry import list_models


def examples(n: int):
    """A fixed, reproducible budget of ``n`` examples per test."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=True,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no slow "explain" phase
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


BASELINES = [n for n in list_models() if not n.startswith("bst-")]


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
