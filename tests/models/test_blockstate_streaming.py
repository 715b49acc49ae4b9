"""What only the BST cache has: its S4D state stays one size, it reorders for beam search, and attention masks
that are not one left-padded run are refused. Streaming = parallel (token by token, prefill then decode, left-padded
batches, chunks) for every variant x kernel and previous-block layout: tests/models/test_harness.py."""

import pytest
import torch
from helpers.models import decode_all, small_config

from blockstate import BlockStateForCausalLM


def build(variant, kernel, **overrides):
    return BlockStateForCausalLM(small_config(variant, kernel, **overrides)).eval()


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
