"""The shared pieces' decoding steps equal their parallel forward."""

from __future__ import annotations

import torch

from blockstate.layers.common import FeedForward, RMSNorm


def test_feed_forward_step_equals_forward_and_follows_its_weights():
    """``FeedForward.step`` reads the up projection from a scaled, transposed copy (the faster side for a one-row
    product) and adds the residual in its last product: the same output as ``forward`` (plus the residual), and
    the copy follows an in-place update and a replaced parameter."""
    torch.manual_seed(0)
    ffn = FeedForward(16, 64).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.allclose(ffn.step(x), ffn(x), atol=1e-6)
        residual = torch.randn(3, 16)
        assert torch.allclose(ffn.step(x, residual=residual), residual + ffn(x), atol=1e-6)
        assert ffn.step_up_weight().shape == (16, 64) and ffn.step_up_weight().is_contiguous()
        ffn.up.weight.mul_(2.0)
        assert torch.allclose(ffn.step(x), ffn(x), atol=1e-6)
        ffn.up.weight = torch.nn.Parameter(torch.randn(64, 16))
        assert torch.allclose(ffn.step(x), ffn(x), atol=1e-6)
    for width in (8, 16):  # up is not the longer side: read as (intermediate, D), like the parameter
        narrow = FeedForward(16, width).eval()
        with torch.no_grad():
            assert narrow.step_up_weight().shape == (width, 16)
            assert torch.allclose(narrow.step(x), narrow(x), atol=1e-6)
            assert torch.allclose(narrow.step(x, residual=x), x + narrow(x), atol=1e-6)


def test_feed_forward_step_in_training_is_forward():
    torch.manual_seed(0)
    ffn = FeedForward(16, 64, dropout=0.5).train()
    x = torch.randn(3, 16)
    torch.manual_seed(1)
    a = ffn.step(x)
    torch.manual_seed(1)
    assert torch.equal(a, ffn(x))


def test_rms_norm_step_equals_forward():
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 16)
    assert torch.allclose(norm.step(x), norm(x), atol=1e-6)
