"""The shared model harness: every check a language model here must pass, run over every registered model
(``blockstate.list_models()``: each BST variant x kernel, the tuned presets and every baseline), by name.

- causality: changing tokens at positions >= t leaves the logits before t unchanged;
- reach: changing the last token of an earlier block changes the logits at t (with block-local attention only the
  SSM, the sliding window, the carried keys/values or the recurrent state can carry it there);
- any length: the logits of a prefix are the prefix of the logits (internal padding is invisible);
- gradients reach every parameter; save_pretrained / from_pretrained round-trips bit for bit; one forward signature
  (stateless models ignore the carry keywords); a small batch is overfitted;
- streaming = parallel on every model with an inference cache: token by token, prefill then decode, a left-padded
  batch, chunks of any size; also under each attention layout the model offers (a block that sees the previous
  one) and, for GSS-Hybrid, with each of its SSM kernels.

What only one model has stays in that model's file (tests/models/test_blockstate*.py, test_baselines.py,
test_gss_hybrid.py); the same checks on an accelerator: test_device.py.
"""

import pytest
import torch
from helpers import models as small
from helpers.models import MODELS, VOCAB, decode_all
from transformers import AutoModelForCausalLM

from blockstate.layers.gss import GSS_KERNELS
from blockstate.registry import carries_state, model_config, model_name


def build(name: str, **options) -> torch.nn.Module:
    """``name``'s small test model; GSS-Hybrid with its SSM branch scaled up, so the checks see the SSM."""
    model = small.build(name, **options)
    return small.live_gss_branch(model) if name == "gss-hybrid" else model


def test_harness_covers_every_registered_model():
    assert {"bst-sh-s4", "bst-mh-s4", "bst-mf-s4", "bst-sh-unstructured", "bst-mf-unstructured", "gpt", "slide",
            "transformer-xl", "brect", "gss-hybrid"} <= set(MODELS)
    assert set(small.EXTRA) <= set(MODELS)


# (length, t): lengths on and off multiples of W = 8 and past max_train_length = 32, t on and off block boundaries
CUTS = [(32, 13), (32, 16), (37, 8), (37, 24), (45, 30), (70, 50)]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("length,t", CUTS)
def test_causal_and_reaches_past_its_block(name, length, t):
    """Changing tokens at positions >= t leaves the logits before t unchanged (up to the FFT's rounding), and
    changing the last token s of the block before t's (gpt: one block, s = t - 1) changes the logits at t."""
    model = build(name)
    x = torch.randint(0, VOCAB, (2, length))
    y = x.clone()
    y[:, t:] = (x[:, t:] + 1 + torch.randint(0, VOCAB - 2, y[:, t:].shape)) % VOCAB
    w = min(model.config.block_size, length)
    s = (t // w) * w - 1 if t >= w else t - 1
    z = x.clone()
    z[:, s] = (x[:, s] + 1) % VOCAB
    with torch.no_grad():
        a, b, c = model(x).logits, model(y).logits, model(z).logits
    assert a.shape == (2, length, VOCAB) and a.dtype == torch.float32
    assert (a[:, :t] - b[:, :t]).abs().max() < 1e-5
    assert (a[:, t] - c[:, t]).abs().max() > 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_logits_of_a_prefix_are_the_prefix_of_the_logits(name):
    """Any length works and internal padding is invisible: lengths on and off multiples of the block size, and
    beyond max_train_length."""
    model = build(name)
    x = torch.randint(0, VOCAB, (1, 75))
    with torch.no_grad():
        full = model(x).logits
        for n in (1, 7, 8, 9, 31, 33, 75):
            assert torch.allclose(model(x[:, :n]).logits, full[:, :n], atol=1e-5), n


@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_gets_gradient(name):
    model = build(name).train()
    x = torch.randint(0, VOCAB, (2, 29))  # several blocks, a partial last one
    model(x, labels=x).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


@pytest.mark.parametrize("name", MODELS)
def test_save_load_round_trip(name, tmp_path):
    """safetensors only (no pickle), and both AutoModelForCausalLM and the model's own class load it bit for bit."""
    model = build(name)
    x = torch.randint(0, VOCAB, (2, 21))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = type(model).from_pretrained(tmp_path).eval()
    assert type(auto) is type(model)
    assert model_name(auto.config) == name
    assert carries_state(auto) == carries_state(model)
    with torch.no_grad():
        ref = model(x).logits
        assert torch.equal(auto(x).logits, ref)
        assert torch.equal(ours(x).logits, ref)


@pytest.mark.parametrize("name", MODELS)
def test_same_forward_signature_and_stateless_models_ignore_carry(name):
    """Every model takes (input_ids, labels) and the carry keywords; a stateless one ignores them."""
    model = build(name)
    x = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        out = model(x, labels=x, carry=None, reset=torch.tensor([True, False]))
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        assert (getattr(out, "carry", None) is not None) == carries_state(model)
        if not carries_state(model):
            assert torch.equal(model(x, carry=object()).logits, out.logits)


@pytest.mark.parametrize("name", MODELS)
def test_overfits_one_batch(name):
    model = build(name).train()
    x = torch.randint(0, VOCAB, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):  # every model reaches ~0.05 of its first loss; 0.3 leaves a wide margin
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


# -- streaming = parallel ----------------------------------------------------------------------------------------
STREAMING = [n for n in MODELS if hasattr(small.build(n), "allocate_inference_cache")]
# attention layouts a cache must follow too: BST's block also seeing the previous W tokens ("window") or the whole
# previous block ("full"); GSS-Hybrid's attention layers take the window
LAYOUTS = {"window": dict(attend_previous_block=True), "full": dict(attend_previous_block=True, previous_block="full")}
OFFERED = {"bst": ("window", "full"), "gss-hybrid": ("window",)}


def offered(name: str) -> tuple[str, ...]:
    return OFFERED.get("bst" if name.startswith("bst-") else name, ())


def stream_cases(*layouts: str) -> list:
    """(name, options) for every streaming model: as registered, under each of ``layouts`` it offers (unless it is
    its default already), and for GSS-Hybrid the same with each of its other SSM kernels."""
    cases = []
    for name in STREAMING:
        config = model_config(name, "tiny", **small.small_overrides(name))
        kernels = [{}] + ([{"gss_kernel": k} for k in GSS_KERNELS if k != config.gss_kernel]
                          if name == "gss-hybrid" else [])
        for kernel in kernels:
            ids = [name, *kernel.values()]
            cases.append(pytest.param(name, kernel, id="-".join(ids)))
            for layout in (x for x in layouts if x in offered(name)):
                if any(getattr(config, k) != v for k, v in LAYOUTS[layout].items()):
                    cases.append(pytest.param(name, {**kernel, **LAYOUTS[layout]}, id="-".join([*ids, layout])))
    return cases


def test_streaming_covers_the_attention_baselines():
    assert {"gpt", "slide", "transformer-xl", "brect", "gss-hybrid", "bst-sh-s4"} <= set(STREAMING)


@pytest.mark.parametrize("name,options", stream_cases("window", "full"))
def test_token_by_token_equals_parallel(name, options):
    model = build(name, **options)
    ids = torch.randint(0, VOCAB, (2, 45))  # several blocks of W = 8, past max_train_length = 32
    with torch.no_grad():
        ref = model(ids).logits
        first = model(ids[:, :1], cache=model.allocate_inference_cache(2), use_cache=True)  # a fresh cache: prefill
        rest = decode_all(model, ids[:, 1:], first.cache)
    assert (torch.cat([first.logits, rest], 1) - ref).abs().max() < 1e-4


@pytest.mark.parametrize("name,options", stream_cases())
@pytest.mark.parametrize("prefix", [1, 8, 11, 13, 33])
def test_prefill_then_decode_equals_parallel(name, options, prefix):
    """Prefills that end on and inside blocks; at 13 under the "window" layout where the model offers it."""
    if prefix == 13 and "window" in offered(name):
        options = {**options, **LAYOUTS["window"]}
    model = build(name, **options)
    ids = torch.randint(0, VOCAB, (2, 45))
    with torch.no_grad():
        ref = model(ids).logits
        pre = model(ids[:, :prefix], use_cache=True)
        rest = decode_all(model, ids[:, prefix:], pre.cache)
    assert (pre.logits - ref[:, :prefix]).abs().max() < 1e-4
    assert (rest - ref[:, prefix:]).abs().max() < 1e-4


UNPADDED_ONLY = {"brect"}  # its blocks run in sequence, the prompt too: it refuses padding in one clear error


@pytest.mark.parametrize("name,options", stream_cases("window"))
def test_left_padded_batch_equals_each_row_alone(name, options):
    """Prompts of different lengths, left-padded, prefilled together and decoded together: every row's logits
    equal that row's own parallel forward."""
    model = build(name, **options)
    lengths, total, new = [21, 9, 16], 21, 20
    streams = [torch.randint(0, VOCAB, (n + new,)) for n in lengths]
    prompt = torch.zeros(3, total, dtype=torch.long)
    mask = torch.zeros(3, total, dtype=torch.long)
    for b, n in enumerate(lengths):
        prompt[b, total - n :] = streams[b][:n]
        mask[b, total - n :] = 1
    if name in UNPADDED_ONLY:
        with pytest.raises(ValueError, match="unpadded prompts"), torch.no_grad():
            model(prompt, attention_mask=mask, use_cache=True)
        return
    with torch.no_grad():
        pre = model(prompt, attention_mask=mask, use_cache=True)
        rest = decode_all(model, torch.stack([s[n:] for s, n in zip(streams, lengths)]), pre.cache)
        for b, n in enumerate(lengths):
            ref = model(streams[b][None]).logits[0]
            assert (pre.logits[b, total - n :] - ref[:n]).abs().max() < 1e-4
            assert (rest[b] - ref[n:]).abs().max() < 1e-4


@pytest.mark.parametrize("name,options", stream_cases("window"))
def test_chunked_stream_equals_one_long_pass(name, options):
    """A long document read in chunks with the cache carried equals one parallel pass: block-aligned chunks run in
    parallel from the carried state, others fall back to token-by-token decoding."""
    model = build(name, **options)
    ids = torch.randint(0, VOCAB, (2, 90))
    with torch.no_grad():
        ref = model(ids).logits
        cache, outs, start = None, [], 0
        for size in (16, 24, 8, 5, 3, 16, 18):  # parallel, parallel, parallel, steps, steps, parallel, parallel
            out = model(ids[:, start : start + size], cache=cache, use_cache=True)
            cache, start = out.cache, start + size
            outs.append(out.logits)
    assert start == 90
    assert (torch.cat(outs, 1) - ref).abs().max() < 1e-4
