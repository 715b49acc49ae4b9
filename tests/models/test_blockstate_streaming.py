"""Recurrent (streaming) inference equals the parallel forward, for every variant x kernel."""

import pytest
import torch
from helpers.models import VARIANT_KERNELS, small_config

from blockstate import BlockStateForCausalLM

LENGTH = 45  # crosses several blocks of W=8 and exceeds max_train_length=32


def build(variant, kernel, **overrides):
    return BlockStateForCausalLM(small_config(variant, kernel, **overrides)).eval()


def decode_all(model, ids, cache):
    return torch.cat([model(ids[:, t : t + 1], cache=cache).logits for t in range(ids.shape[1])], dim=1)


@pytest.mark.parametrize("variant,kernel", VARIANT_KERNELS)
@pytest.mark.parametrize("previous", [False, "window", "full"])
def test_token_by_token_equals_parallel(variant, kernel, previous):
    mode = previous or "window"
    model = build(variant, kernel, attend_previous_block=bool(previous), previous_block=mode)
    ids = torch.randint(0, 61, (2, LENGTH))
    with torch.no_grad():
        ref = model(ids).logits
        cache = model.allocate_inference_cache(2)
        first = model(ids[:, :1], cache=cache, use_cache=True)  # a fresh cache: the first token is a prefill
        rest = decode_all(model, ids[:, 1:], first.cache)
    out = torch.cat([first.logits, rest], dim=1)
    assert (out - ref).abs().max() < 1e-4


@pytest.mark.parametrize("variant,kernel", VARIANT_KERNELS)
@pytest.mark.parametrize("prefix", [1, 8, 13, 33])
def test_prefill_then_decode_equals_parallel(variant, kernel, prefix):
    model = build(variant, kernel, attend_previous_block=prefix == 13)
    ids = torch.randint(0, 61, (2, LENGTH))
    with torch.no_grad():
        ref = model(ids).logits
        pre = model(ids[:, :prefix], use_cache=True)
        rest = decode_all(model, ids[:, prefix:], pre.cache)
    assert (pre.logits - ref[:, :prefix]).abs().max() < 1e-4
    assert (rest - ref[:, prefix:]).abs().max() < 1e-4


@pytest.mark.parametrize("variant,kernel", VARIANT_KERNELS)
def test_left_padded_batch_equals_each_row_alone(variant, kernel):
    """Prompts of different lengths, left-padded, prefilled together and decoded together: every row's logits
    equal that row's own parallel forward."""
    model = build(variant, kernel, attend_previous_block=variant == "sh")
    lengths, total, new = [21, 9, 16], 21, 20
    streams = [torch.randint(0, 61, (n + new,)) for n in lengths]
    prompt = torch.zeros(3, total, dtype=torch.long)
    mask = torch.zeros(3, total, dtype=torch.long)
    for b, n in enumerate(lengths):
        prompt[b, total - n :] = streams[b][:n]
        mask[b, total - n :] = 1
    with torch.no_grad():
        pre = model(prompt, attention_mask=mask, use_cache=True)
        cont = torch.stack([s[n:] for s, n in zip(streams, lengths)])
        rest = decode_all(model, cont, pre.cache)
        for b, n in enumerate(lengths):
            ref = model(streams[b][None]).logits[0]
            assert (pre.logits[b, total - n :] - ref[:n]).abs().max() < 1e-4
            assert (rest[b] - ref[n:]).abs().max() < 1e-4


def test_s4d_cache_memory_is_constant():
    model = build("mf", "s4d", attend_previous_block=True)
    sizes = []
    with torch.no_grad():
        cache = model(torch.randint(0, 61, (1, 3)), use_cache=True).cache
        for _ in range(60):
            model(torch.randint(0, 61, (1, 1)), cache=cache)
            sizes.append(cache.nbytes())
    assert len(set(sizes[8:])) == 1  # after the first block the buffers never grow


def test_cache_reorder_for_beam_search():
    model = build("sh", "s4d")
    ids = torch.randint(0, 61, (3, 20))
    with torch.no_grad():
        cache = model(ids[:, :12], use_cache=True).cache
        cache.reorder_cache(torch.tensor([2, 2, 0]))
        out = decode_all(model, ids[[2, 2, 0], 12:], cache)
        ref = model(ids[[2, 2, 0]]).logits[:, 12:]
    assert (out - ref).abs().max() < 1e-4


def test_bad_attention_mask():
    model = build("sh", "s4d")
    with pytest.raises(ValueError, match="contiguous"):
        model(torch.ones(1, 5, dtype=torch.long), attention_mask=torch.tensor([[1, 0, 1, 1, 1]]))
    with pytest.raises(ValueError, match="no tokens"):
        model(torch.ones(1, 5, dtype=torch.long), attention_mask=torch.zeros(1, 5, dtype=torch.long))


@pytest.mark.parametrize("variant,kernel", VARIANT_KERNELS)
@pytest.mark.parametrize("previous", [False, True])
def test_segment_streaming_equals_one_long_pass(variant, kernel, previous):
    """A long document scored in chunks with the SSM state and block cache carried equals one parallel pass:
    block-aligned chunks run in parallel mode, others fall back to token-by-token decoding."""
    model = build(variant, kernel, attend_previous_block=previous)
    ids = torch.randint(0, 61, (2, 90))
    with torch.no_grad():
        ref = model(ids).logits
        cache, outs, start = None, [], 0
        for size in (16, 24, 8, 5, 3, 16, 18):  # parallel, parallel, parallel, steps, steps, parallel, parallel
            out = model(ids[:, start : start + size], cache=cache, use_cache=True)
            cache, start = out.cache, start + size
            outs.append(out.logits)
    assert start == 90
    assert (torch.cat(outs, 1) - ref).abs().max() < 1e-4
