"""Block attention against plain full-sequence references."""

import pytest
import torch
import torch.nn.functional as F

from blockstate.layers import BlockAttention
from blockstate.layers.common import apply_rope, rope_cos_sin


def reference_masked_attention(attn: BlockAttention, h: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Self-attention over the whole sequence with absolute RoPE positions and an explicit (L, L) mask."""
    bsz, length, _ = h.shape
    q, k, v = attn.qkv(h).unflatten(-1, (3, attn.num_heads, attn.head_dim)).unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    cos, sin = rope_cos_sin(torch.arange(length), attn.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return attn.out(out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("length", [5, 16, 29])
def test_block_causal_attention_equals_masked_reference(length):
    torch.manual_seed(0)
    attn = BlockAttention(32, 4, block_size=8)
    h = torch.randn(2, length, 32)
    t = torch.arange(length)
    allowed = (t[None, :] <= t[:, None]) & (t[None, :] // 8 == t[:, None] // 8)
    assert torch.allclose(attn(h), reference_masked_attention(attn, h, allowed), atol=1e-5)


@pytest.mark.parametrize("length", [8, 21, 32])
def test_previous_block_option_is_a_sliding_window(length):
    """With attend_previous_block each token sees exactly the previous W tokens (itself included), with the
    true relative positions for RoPE."""
    torch.manual_seed(0)
    attn = BlockAttention(32, 4, block_size=8, attend_previous_block=True)
    h = torch.randn(2, length, 32)
    t = torch.arange(length)
    allowed = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - 8)
    assert torch.allclose(attn(h), reference_masked_attention(attn, h, allowed), atol=1e-5)


def test_carried_keys_values_continue_the_window_across_segments():
    torch.manual_seed(0)
    attn = BlockAttention(32, 4, block_size=8, attend_previous_block=True)
    h = torch.randn(2, 40, 32)
    full = attn(h)
    first, kv = attn(h[:, :24], return_kv=True)
    second = attn(h[:, 24:], past_kv=kv)
    assert torch.allclose(torch.cat([first, second], 1), full, atol=1e-5)
    with pytest.raises(ValueError, match="attend_previous_block"):
        BlockAttention(32, 4, block_size=8)(h, past_kv=kv)


def test_huge_block_is_full_causal_attention_without_padding_cost():
    torch.manual_seed(0)
    attn = BlockAttention(32, 4, block_size=10**9)
    h = torch.randn(1, 13, 32)
    t = torch.arange(13)
    assert torch.allclose(attn(h), reference_masked_attention(attn, h, t[None, :] <= t[:, None]), atol=1e-5)


@pytest.mark.parametrize("length", [8, 21, 32])
def test_full_previous_block_is_transformer_xl_memory(length):
    """previous_window=False: every token sees its whole previous block and its own block causally."""
    torch.manual_seed(0)
    attn = BlockAttention(32, 4, block_size=8, attend_previous_block=True, previous_window=False)
    h = torch.randn(2, length, 32)
    t = torch.arange(length)
    allowed = (t[None, :] <= t[:, None]) & (t[None, :] // 8 >= t[:, None] // 8 - 1)
    assert torch.allclose(attn(h), reference_masked_attention(attn, h, allowed), atol=1e-5)
