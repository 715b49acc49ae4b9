"""``ssm_residual="gated"`` (beyond the paper): the SSM output also enters the residual stream, gated.

The option must keep every guarantee of the paper's layer: causality, streaming = parallel (token by token,
prefill then decode, block-aligned continuation), gradients to every parameter, and "none" must be the paper's
layer exactly (no extra parameter, same function).
"""

import pytest
import torch
from helpers.models import VARIANT_KERNELS, assert_streams_like_parallel, small_config

from blockstate import BlockStateForCausalLM
from blockstate.layers.bst import GatedSSMResidual
from blockstate.ops import fft_causal_conv

MODES = ["gated", "ffn"]
LAYERS = ["bst", "all"]  # ssm_residual_layers: the BST layers only, or every layer (SSMStreamLayer between them)


def build(variant, kernel, mode="gated", layers="bst", **overrides):
    config = small_config(variant, kernel, ssm_residual=mode, ssm_residual_layers=layers, **overrides)
    return BlockStateForCausalLM(config).eval()


def test_only_bst_layers_get_the_branch_and_none_is_the_paper_layer():
    gated = build("sh", "s4d")
    plain = BlockStateForCausalLM(small_config("sh", "s4d")).eval()
    branches = [i for i, layer in enumerate(gated.model.layers) if isinstance(layer.ssm_residual, GatedSSMResidual)]
    assert branches == gated.config.bst_layers
    assert all(layer.ssm_residual is None for layer in plain.model.layers)
    extra = sum(p.numel() for p in gated.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == len(branches) * 2 * gated.config.hidden_size ** 2
    glu = build("sh", "s4d", "ffn")  # the FFN of a BST layer gains the SSM's expansion, D x intermediate
    extra = sum(p.numel() for p in glu.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == len(branches) * glu.config.hidden_size * glu.config.intermediate_size
    assert [i for i, layer in enumerate(glu.model.layers) if layer.ssm_ffn] == glu.config.bst_layers


def test_every_layer_gets_an_ssm_and_only_bst_layers_cross_attend():
    model = build("mf", "s4d", "ffn", "all")
    assert [i for i, layer in enumerate(model.model.layers) if layer.ssm_ffn] == list(range(len(model.model.layers)))
    cross = [i for i, layer in enumerate(model.model.layers) if layer.attention.context is not None]
    assert cross == model.config.bst_layers and len(cross) < len(model.model.layers)
    plain = [layer for i, layer in enumerate(model.model.layers) if i not in cross]
    assert all(layer.context.variant == "sh" and layer.context.ssm.filters == 1 for layer in plain)


def test_invalid_value_is_refused():
    with pytest.raises(ValueError, match="ssm_residual must be one of"):
        small_config(ssm_residual="add")
    with pytest.raises(ValueError, match="ssm_residual_layers must be one of"):
        small_config(ssm_residual="ffn", ssm_residual_layers="some")
    with pytest.raises(ValueError, match='ssm_residual_layers="all" needs ssm_residual'):
        small_config(ssm_residual_layers="all")


@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant,kernel", VARIANT_KERNELS)
def test_branch_changes_the_output_and_is_causal(variant, kernel, mode, layers):
    model = build(variant, kernel, mode, layers)
    ids = torch.randint(0, 61, (1, 40))
    with torch.no_grad():
        ref = model(ids).logits
        for layer in model.model.layers:
            if layer.ssm_residual is not None:
                layer.ssm_residual.out.weight.mul_(0)
            if layer.ssm_ffn:
                layer.ffn.expand.weight.mul_(0)
        without = model(ids).logits
    assert (ref - without).abs().max() > 1e-4  # the branch is live
    model = build(variant, kernel, mode, layers)
    changed = ids.clone()
    changed[0, 30] = (changed[0, 30] + 1) % 61
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert (a[:, :30] - b[:, :30]).abs().max() < 1e-5  # nothing before the change moves (FFT round-off only)
    assert (a[:, 31:] - b[:, 31:]).abs().amax(-1).min() > 1e-5  # and every later position does


@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant,kernel", VARIANT_KERNELS)
def test_streaming_equals_parallel(variant, kernel, mode, layers):
    model = build(variant, kernel, mode, layers)
    assert_streams_like_parallel(model)


@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", ["sh", "mh", "mf"])
def test_gradients_reach_every_parameter(variant, mode, layers):
    model = build(variant, "s4d", mode, layers).train()
    ids = torch.randint(0, 61, (2, 40))
    model(ids, labels=ids).loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead


@pytest.mark.parametrize("kernel", ["s4d", "unstructured", "explicit"])
def test_mean_filter_equals_the_mean_of_the_filter_outputs(kernel):
    model = build("mf", kernel)
    ssm = model.model.layers[0].context.ssm
    u = torch.randn(2, 40, model.config.hidden_size)
    full = fft_causal_conv(u.transpose(1, 2), ssm.kernel(40), ssm.skip)  # (B, D, C, L)
    assert (ssm.mean_filter(u) - full.mean(2).transpose(1, 2)).abs().max() < 1e-5
