"""What only the BST language model has: its HF auto classes, the loss, the context states of each variant, block
locality and the previous-block option, the implicit filter past the training length, input errors. Causality,
reach, any length, gradients, save/load and overfitting for every variant x kernel: tests/models/test_harness.py;
bf16 autocast: tests/models/test_numerics.py."""

import pytest
import torch
from helpers.models import small_config
from transformers import AutoConfig, AutoModelForCausalLM

from blockstate import BlockStateConfig, BlockStateForCausalLM
from blockstate.layers import ContextStates, ImplicitKernel


def build(variant="sh", kernel="s4d", **overrides) -> BlockStateForCausalLM:
    return BlockStateForCausalLM(small_config(variant, kernel, **overrides)).eval()


def test_auto_classes_registered():
    config = AutoConfig.for_model("blockstate", hidden_size=64, num_attention_heads=4)
    assert isinstance(config, BlockStateConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), BlockStateForCausalLM)


def test_loss_matches_manual_shifted_cross_entropy():
    model = build()
    x = torch.randint(0, 61, (2, 19))
    labels = x.clone()
    labels[0, 5:9] = -100
    out = model(x, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 61)
    target = labels[:, 1:].reshape(-1)
    keep = target != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], target[keep])
    assert torch.allclose(out.loss, expected)
    assert out.logits.shape == (2, 19, 61) and out.logits.dtype == torch.float32


def test_mf_context_states_are_shifted_block_summaries():
    """Block 0 sees only the learned initial context; block k the SSM output at the last position of block k-1."""
    config = small_config("mf")
    ctx = ContextStates(config)
    u = torch.randn(2, 29, 32)  # 4 blocks of W=8, the last one partial
    states = ctx(u)
    y = ctx.ssm(u)  # (B, D, S, L): the FFT path; the layer takes only the block ends, through the S4D state
    assert states.shape == (2, 4, 4, 32)
    assert torch.allclose(states[:, 0], (ctx.initial_context + ctx.context_ids).expand(2, -1, -1))
    for k in range(1, 4):
        expected = y[..., k * 8 - 1].transpose(1, 2) + ctx.context_ids
        assert torch.allclose(states[:, k], expected, atol=1e-5, rtol=1e-4)
    # and block 0 truly ignores the tokens: changing every token leaves its states unchanged
    assert torch.equal(ctx(torch.randn(2, 29, 32))[:, 0], states[:, 0])


def test_sh_and_mh_context_states_are_aligned():
    u = torch.randn(2, 20, 32)
    sh = ContextStates(small_config("sh"))
    assert sh(u).shape == (2, 20, 32)
    mh = ContextStates(small_config("mh"))
    out = mh(u)
    assert out.shape == (2, 20, 4, 32)  # one D-vector per position and head (filter h -> head h)
    assert not torch.allclose(out[:, :, 0], out[:, :, 1])


def test_block_locality_and_previous_block_option():
    """Without SSM layers and without the previous-block option, a block cannot see earlier blocks;
    with the option, the first tokens of block 1 see the end of block 0."""
    x = torch.randint(0, 61, (1, 16))
    y = x.clone()
    y[:, 7] = (x[:, 7] + 1) % 61
    for prev, visible in ((False, False), (True, True)):
        model = build(bst_layers=[], attend_previous_block=prev)
        with torch.no_grad():
            diff = (model(x).logits[:, 8] - model(y).logits[:, 8]).abs().max()
        assert (diff > 1e-4) == visible
    # with the option, token 15 (last of block 1) sees exactly positions 8..15: position 7 is outside its window
    model = build(bst_layers=[], attend_previous_block=True, num_hidden_layers=1)
    with torch.no_grad():
        assert (model(x).logits[:, 15] - model(y).logits[:, 15]).abs().max() < 1e-6


def test_implicit_filter_extends_past_training_length():
    """t is in units of the training length: a longer request extends the same filter instead of stretching it."""
    k = ImplicitKernel(channels=4, filters=2, max_train_length=32)
    short, long = k(32), k(128)
    assert long.shape == (4, 2, 128)
    assert torch.allclose(long[..., :32], short, atol=1e-6)
    assert long[..., 96:].abs().max() < long[..., :32].abs().max()  # decays beyond t = 1


def test_bad_input_ids_give_clear_errors():
    model = build()
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[1, 2, 61]]))
    with pytest.raises(ValueError, match="shape"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
