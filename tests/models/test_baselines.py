"""The baselines' own contracts: carried state equals one long pass where the architecture says it should, resets,
the recurrent cell's gate, GSS against a direct-convolution reference, configs."""

import pytest
import torch
import torch.nn.functional as F
from helpers.models import VOCAB, build, small_overrides

from blockstate.layers.common import RMSNorm
from blockstate.layers.gss import GatedStateSpaceLayer
from blockstate.layers.recurrent import BlockRecurrentLayer
from blockstate.models import (
    BlockRecurrentConfig,
    BlockRecurrentForCausalLM,
    BlockTransformerConfig,
    GatedStateSpaceConfig,
    SegmentCarry,
    map_carry,
)
from blockstate.ops import causal_conv_reference

STATEFUL = ["slide", "transformer-xl", "brect"]


def run_segments(model, x: torch.Tensor, cuts: list[int], **kwargs) -> torch.Tensor:
    """Logits of x fed as consecutive segments [cuts[i], cuts[i+1]), each continuing from the previous carry."""
    carry, logits = None, []
    for a, b in zip(cuts[:-1], cuts[1:]):
        out = model(x[:, a:b], carry=carry, **kwargs)
        logits.append(out.logits)
        carry = out.carry
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("name,cuts", [
    ("slide", [0, 16, 32, 48]),  # whole blocks
    ("slide", [0, 13, 32, 41]),  # sliding attention is relative: any offset continues exactly
    ("transformer-xl", [0, 16, 32]),  # window = segment = 16: segment two sees all of segment one
    ("brect", [0, 16, 32, 48]),  # blocks are sequential; state and keys/values carry
])
def test_carry_equals_one_long_sequence(name, cuts):
    model = build(name)
    x = torch.randint(0, VOCAB, (2, cuts[-1]))
    with torch.no_grad():
        whole = model(x).logits
        pieces = run_segments(model, x, cuts)
    assert (pieces - whole).abs().max() < 1e-5


def test_transformer_xl_window_is_the_segment():
    model = build("transformer-xl")
    assert model.config.block_size == 16 == model.config.max_train_length // 2
    x = torch.randint(0, VOCAB, (1, 32))
    y = x.clone()
    y[:, 1] = (x[:, 1] + 1) % VOCAB
    with torch.no_grad():  # the first token of segment two sees token 1 of segment one, through the carry
        a = model(x[:, 16:], carry=model(x[:, :16]).carry).logits
        b = model(y[:, 16:], carry=model(y[:, :16]).carry).logits
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("name", STATEFUL)
def test_reset_drops_the_carry_row_by_row(name):
    model = build(name)
    x = torch.randint(0, VOCAB, (3, 32))
    with torch.no_grad():
        carry = model(x[:, :16]).carry
        continued = model(x[:, 16:], carry=carry).logits
        fresh = model(x[:, 16:]).logits
        out = model(x[:, 16:], carry=carry, reset=torch.tensor([True, False, True]))
        assert torch.allclose(out.logits[[0, 2]], fresh[[0, 2]], atol=1e-6)
        assert torch.allclose(out.logits[1], continued[1], atol=1e-6)
        assert not torch.allclose(fresh[1], continued[1], atol=1e-4)
        everything = model(x[:, 16:], carry=carry, reset=torch.ones(3, dtype=torch.bool))
        assert torch.allclose(everything.logits, fresh, atol=1e-6)
        # the carries of reset rows equal a fresh run's, the others a continued run's
        ref_fresh, ref_cont = model(x[:, 16:]).carry, model(x[:, 16:], carry=carry).carry
        for got, f, c in zip(out.carry.keys, ref_fresh.keys, ref_cont.keys):
            assert torch.allclose(got[[0, 2]], f[[0, 2]], atol=1e-6) and torch.allclose(got[1], c[1], atol=1e-6)


@pytest.mark.parametrize("name", ["slide", "brect"])
def test_carry_length_matches_the_overlapping_segments_of_the_data_pipeline(name):
    """With overlap=1 segment two starts with segment one's last token; carrying after L - 1 tokens makes the pair
    equal one pass over the stream (BRecT: L - 1 a multiple of W)."""
    model = build(name)
    seg = 17  # L - 1 = 16 = 2 blocks
    x = torch.randint(0, VOCAB, (2, 2 * seg - 1))
    with torch.no_grad():
        whole = model(x).logits
        first = model(x[:, :seg], carry_length=seg - 1)
        second = model(x[:, seg - 1 :], carry=first.carry)
    assert (first.logits - whole[:, :seg]).abs().max() < 1e-5
    assert (second.logits - whole[:, seg - 1 :]).abs().max() < 1e-5


@pytest.mark.parametrize("name", STATEFUL)
def test_carry_is_detached_and_training_continues_from_it(name):
    model = build(name).train()
    x = torch.randint(0, VOCAB, (2, 32))
    first = model(x[:, :16], labels=x[:, :16])
    assert isinstance(first.carry, SegmentCarry) and isinstance(first.carry, tuple)
    assert all(not t.requires_grad for group in first.carry for t in group)
    second = model(x[:, 16:], labels=x[:, 16:], carry=first.carry)
    second.loss.backward()  # no graph of segment one is needed
    assert map_carry(lambda t: t.to(torch.float64), second.carry).keys[0].dtype == torch.float64


def test_short_history_cannot_be_continued():
    model = build("slide")
    x = torch.randint(0, VOCAB, (2, 5))  # fewer than W = 8 tokens
    with torch.no_grad():
        carry = model(x).carry
        with pytest.raises(ValueError, match="block_size"):
            model(x, carry=carry)
        model(x, carry=carry, reset=torch.ones(2, dtype=torch.bool))  # a reset row needs no history


def test_receptive_fields_gpt_slide_brect():
    """One layer: GPT sees everything; Slide sees the last W = 8 tokens only; BRecT reaches further through its
    recurrent state."""
    x = torch.randint(0, VOCAB, (1, 32))
    y = x.clone()
    y[:, 0] = (x[:, 0] + 1) % VOCAB
    seen = {}
    for name, extra in (("gpt", {}), ("slide", {}), ("brect", dict(recurrent_layers=[0]))):
        model = build(name, num_hidden_layers=1, **extra)
        with torch.no_grad():
            seen[name] = (model(x).logits[:, 31] - model(y).logits[:, 31]).abs().max().item() > 1e-5
    assert seen == {"gpt": True, "slide": False, "brect": True}


def test_gpt_decodes_with_the_parent_streaming_cache():
    """The plain attention LM is BlockStateForCausalLM without BST layers: its inference cache works unchanged."""
    model = build("gpt")
    x = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        whole = model(x).logits
        prefill = model(x[:, :20], use_cache=True)
        steps = model(x[:, 20:], cache=prefill.cache).logits
    assert (steps - whole[:, 20:]).abs().max() < 1e-4


def test_fixed_gate_keeps_the_state_with_weight_sigmoid_b():
    """With z forced to 0, c' = c * sigmoid(b) block after block: c_k = c_0 * g^k."""
    config = BlockRecurrentConfig(**{**small_overrides("brect"), "recurrent_layers": [0]})
    layer = BlockRecurrentLayer(config)
    layer.init_parameters(0.02)
    with torch.no_grad():
        layer.state_out.weight.zero_()
    x, c0 = torch.randn(2, 24, 32), torch.randn(2, 4, 32)
    _, state, (k, v) = layer(x, c0)
    g = torch.sigmoid(torch.tensor(config.state_gate_bias))
    assert torch.allclose(state, c0 * g**3, atol=1e-6)
    assert k.shape == v.shape == (2, 4, 8, 8)  # the last W positions, (B, H, W, d)


def test_lstm_gate_option_trains():
    model = BlockRecurrentForCausalLM(BlockRecurrentConfig(**{**small_overrides("brect"), "state_gate": "lstm"}))
    x = torch.randint(0, VOCAB, (2, 24))
    model(x, labels=x).loss.backward()
    layer = model.model.layers[1]
    assert isinstance(layer, BlockRecurrentLayer) and layer.gate_bias.shape == (2, 32)
    assert torch.equal(layer.gate_bias.detach(), torch.tensor([[-2.0], [2.0]]).expand(2, 32))  # input shut, forget open
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_gss_layer_matches_a_direct_convolution_reference():
    config = GatedStateSpaceConfig(**small_overrides("gss-hybrid"))
    torch.manual_seed(0)
    layer = GatedStateSpaceLayer(config)
    x = torch.randn(2, 19, 32)
    u = layer.norm(x)
    s = F.gelu(layer.narrow(u))
    y = causal_conv_reference(s.transpose(1, 2), layer.ssm.kernel(19), layer.ssm.skip)[:, :, 0].transpose(1, 2)
    expected = x + layer.out(layer.expand(y) * F.gelu(layer.wide(u)))
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert isinstance(layer.norm, RMSNorm)


def test_gss_hybrid_layout():
    model = build("gss-hybrid")
    kinds = [type(layer).__name__ for layer in model.model.layers]
    assert kinds == ["GatedStateSpaceLayer", "BlockTransformerLayer", "GatedStateSpaceLayer"]
    assert GatedStateSpaceConfig(num_hidden_layers=8).attention_layers == [3, 7]


@pytest.mark.parametrize("make,match", [
    (lambda: BlockTransformerConfig(carry_state=True), "attend_previous_block"),
    (lambda: BlockTransformerConfig(bst_layers=[0]), "bst_layers"),
    (lambda: BlockRecurrentConfig(state_gate="gru"), "state_gate"),
    (lambda: BlockRecurrentConfig(num_hidden_layers=4, recurrent_layers=[4]), "recurrent_layers"),
    (lambda: BlockRecurrentConfig(attend_previous_block=False, carry_state=False), "attend_previous_block"),
    (lambda: BlockRecurrentForCausalLM(BlockRecurrentConfig(carry_state=False)), "carry_state"),
    (lambda: GatedStateSpaceConfig(gss_narrow_size=0), "gss_narrow_size"),
    (lambda: GatedStateSpaceConfig(num_hidden_layers=2, attention_layers=[0, 0]), "attention_layers"),
])
def test_config_errors_name_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_brect_streaming_equals_parallel_and_generates():
    """The shared cache interface on the Block-Recurrent baseline: token by token (state updated at every block
    end) equals the parallel pass; generate() works through it."""
    model = build("brect")
    ids = torch.randint(0, VOCAB, (2, 30))  # several blocks of W=8, a partial last one
    with torch.no_grad():
        ref = model(ids).logits
        pre = model(ids[:, :11], use_cache=True)
        rest = torch.cat([model(ids[:, t : t + 1], cache=pre.cache).logits for t in range(11, 30)], 1)
    assert (torch.cat([pre.logits, rest], 1) - ref).abs().max() < 1e-4
    out = model.generate(ids[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    x = ids[:, :5]
    with torch.no_grad():
        for _ in range(6):
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, x)
