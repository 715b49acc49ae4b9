"""The BST language model, every variant x kernel: causality, gradients, padding, save/load, overfitting."""

import pytest
import torch
from helpers.models import VARIANT_KERNELS, small_config
from transformers import AutoConfig, AutoModelForCausalLM

from blockstate import BlockStateConfig, BlockStateForCausalLM
from blockstate.layers import ContextStates, ImplicitKernel


def build(variant="sh", kernel="s4d", **overrides) -> BlockStateForCausalLM:
    return BlockStateForCausalLM(small_config(variant, kernel, **overrides)).eval()


@pytest.mark.parametrize("variant,kernel", VARIANT_KERNELS)
@pytest.mark.parametrize("length,t", [(32, 16), (32, 13), (37, 8), (45, 30), (70, 50)])
def test_causality(variant, kernel, length, t):
    """Changing tokens at positions >= t leaves logits < t unchanged, and changing a token s < t in an earlier
    block changes the logits at t (attention is block-local here: only the SSM can carry it). Lengths cover
    multiples of W=8 and not, cut points on and off block boundaries, and lengths past max_train_length."""
    model = build(variant, kernel)
    x = torch.randint(0, 61, (2, length))
    y = x.clone()
    y[:, t:] = (x[:, t:] + 1 + torch.randint(0, 59, y[:, t:].shape)) % 61
    s = (t // 8) * 8 - 1  # the last token of the block before t's (every t here is >= W)
    z = x.clone()
    z[:, s] = (x[:, s] + 1) % 61
    with torch.no_grad():
        a, b, c = model(x).logits, model(y).logits, model(z).logits
    assert (a[:, :t] - b[:, :t]).abs().max() < 1e-5
    assert (a[:, t] - c[:, t]).abs().max() > 1e-4


@pytest.mark.parametrize("variant,kernel", VARIANT_KERNELS)
def test_padding_free_equivalence(variant, kernel):
    """Any length works: the logits of a prefix equal the prefix of the logits (internal padding is invisible),
    also for lengths beyond max_train_length and not a multiple of the block size."""
    model = build(variant, kernel)
    x = torch.randint(0, 61, (1, 75))
    with torch.no_grad():
        full = model(x).logits
        for n in (1, 7, 8, 9, 31, 33, 75):
            assert torch.allclose(model(x[:, :n]).logits, full[:, :n], atol=1e-5), n


@pytest.mark.parametrize("variant,kernel", VARIANT_KERNELS)
def test_every_parameter_gets_gradient(variant, kernel):
    model = build(variant, kernel).train()
    x = torch.randint(0, 61, (2, 29))  # several blocks, partial last block
    model(x, labels=x).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


@pytest.mark.parametrize("variant,kernel", VARIANT_KERNELS)
def test_save_load_round_trip(variant, kernel, tmp_path):
    model = build(variant, kernel)
    x = torch.randint(0, 61, (2, 21))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = BlockStateForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(auto, BlockStateForCausalLM)
    with torch.no_grad():
        ref = model(x).logits
        assert torch.equal(auto(x).logits, ref)
        assert torch.equal(ours(x).logits, ref)


def test_auto_classes_registered():
    config = AutoConfig.for_model("blockstate", hidden_size=64, num_attention_heads=4)
    assert isinstance(config, BlockStateConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), BlockStateForCausalLM)


# overfitting one batch: tests/test_all_models.py runs it over every registered model, BST variants included


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


@pytest.mark.parametrize("variant,kernel", [("sh", "s4d"), ("mf", "unstructured"), ("mh", "explicit")])
def test_bf16_autocast_forward_is_finite_and_close(variant, kernel):
    model = build(variant, kernel)
    x = torch.randint(0, 61, (2, 30))
    with torch.no_grad():
        ref = model(x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x).logits
    assert torch.isfinite(low).all()
    assert (low - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


def test_bad_input_ids_give_clear_errors():
    model = build()
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[1, 2, 61]]))
    with pytest.raises(ValueError, match="shape"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
