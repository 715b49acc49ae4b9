"""``plain_layers="gss"`` (beyond the paper): the layers between BST layers are gated state space layers.

The stack is then GSS-Hybrid's with its attention layers made BST layers, so the comparison with GSS-Hybrid
isolates what the context states add. It must keep every guarantee of the paper's stack: causality, streaming =
parallel (token by token, prefill then decode, block-aligned continuation), gradients to every parameter, save/load.
"""

import pytest
import torch
from helpers.models import assert_streams_like_parallel, live_gss_branch, small_config

from blockstate import BlockStateForCausalLM
from blockstate.layers import BSTLayer
from blockstate.layers.gss import GatedStateSpaceLayer

GSS = dict(plain_layers="gss", num_hidden_layers=4, bst_layers=[1, 3], gss_hidden_size=48, gss_narrow_size=8,
           gss_state_size=16)
CASES = [("sh", "none"), ("sh", "ffn"), ("mh", "none"), ("mf", "none"), ("mf", "ffn")]


def build(variant="sh", residual="none", **overrides):
    torch.manual_seed(0)
    config = small_config(variant, "s4d", ssm_residual=residual, **{**GSS, **overrides})
    return live_gss_branch(BlockStateForCausalLM(config).eval())


def test_the_plain_layers_are_gss_layers_and_the_bst_layers_stay():
    model = build()
    kinds = [type(layer) for layer in model.model.layers]
    assert kinds == [GatedStateSpaceLayer, BSTLayer, GatedStateSpaceLayer, BSTLayer]
    assert model.model.layers[0].wide.out_features == 48 and model.model.layers[0].narrow.out_features == 8
    block = BlockStateForCausalLM(small_config(**{**GSS, "plain_layers": "block"}))
    assert not any(isinstance(layer, GatedStateSpaceLayer) for layer in block.model.layers)


def test_invalid_values_are_refused():
    with pytest.raises(ValueError, match="plain_layers must be one of"):
        small_config(plain_layers="mamba")
    with pytest.raises(ValueError, match='plain_layers="gss" the plain layers already are SSM layers'):
        small_config(ssm_residual="ffn", ssm_residual_layers="all", plain_layers="gss")
    with pytest.raises(ValueError, match="gss_narrow_size must be a positive integer"):
        small_config(plain_layers="gss", gss_narrow_size=0)


@pytest.mark.parametrize("variant,residual", CASES)
def test_causal_and_every_later_position_moves(variant, residual):
    model = build(variant, residual)
    ids = torch.randint(0, 61, (1, 40))
    changed = ids.clone()
    changed[0, 30] = (changed[0, 30] + 1) % 61
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert (a[:, :30] - b[:, :30]).abs().max() < 1e-5
    assert (a[:, 31:] - b[:, 31:]).abs().amax(-1).min() > 1e-5


@pytest.mark.parametrize("variant,residual", CASES)
def test_streaming_equals_parallel(variant, residual):
    model = build(variant, residual)
    assert_streams_like_parallel(model)


@pytest.mark.parametrize("variant,residual", CASES)
def test_gradients_reach_every_parameter(variant, residual):
    model = build(variant, residual).train()
    ids = torch.randint(0, 61, (2, 40))
    model(ids, labels=ids).loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead


def test_save_and_load_keep_the_stack(tmp_path):
    model = build("sh", "ffn")
    model.save_pretrained(tmp_path)
    loaded = BlockStateForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.plain_layers == "gss" and loaded.config.gss_hidden_size == 48
    ids = torch.randint(0, 61, (1, 24))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
