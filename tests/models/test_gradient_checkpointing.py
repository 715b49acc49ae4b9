"""Gradient checkpointing the Hugging Face way (issue 16 item 3): every registered model supports it, and its
gradients equal those of the plain backward (the recomputed forward is the same computation)."""

from __future__ import annotations

import os

import pytest
import torch

from blockstate.models.modeling_blockstate import enable_gradient_checkpointing
from blockstate.registry import create_model, list_models

DEVICE = torch.device(os.environ.get("BLOCKSTATE_TEST_DEVICE", "cpu"))
# CPU kernels are deterministic, so the recomputation matches to rounding; CUDA attention backward kernels sum
# with atomics, so two plain backwards already differ in the last bits there
TOLERANCE = dict(rtol=1e-5, atol=1e-7) if DEVICE.type == "cpu" else dict(rtol=1e-4, atol=1e-6)


def gradients(model, ids, **kwargs) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, **kwargs)
    out.loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def checkpointed_calls(model) -> list[int]:
    """Counts calls of the checkpoint function the model was given (proof that the layer loops use it)."""
    calls = [0]
    for module in model.modules():
        fn = getattr(module, "_gradient_checkpointing_func", None)
        if fn is not None and not getattr(fn, "_counted", False):
            def counted(*args, _fn=fn, **kwargs):
                calls[0] += 1
                return _fn(*args, **kwargs)
            counted._counted = True
            module._gradient_checkpointing_func = counted
    return calls


@pytest.mark.parametrize("name", list_models())
def test_checkpointed_gradients_equal_plain(name):
    torch.manual_seed(0)
    # dropout on: the checkpoint replays the RNG state, so even the dropout masks are the same
    model = create_model(name, "tiny", max_train_length=64, hidden_dropout=0.1).to(DEVICE).train()
    assert model.supports_gradient_checkpointing
    ids = torch.randint(0, model.config.vocab_size, (2, 64), device=DEVICE)
    torch.manual_seed(1)
    plain = gradients(model, ids)
    carry = model(ids).carry if model.carries_state else None

    enable_gradient_checkpointing(model)
    assert model.model.gradient_checkpointing
    calls = checkpointed_calls(model)
    torch.manual_seed(1)
    checkpointed = gradients(model, ids)
    assert calls[0] == model.config.num_hidden_layers
    assert plain.keys() == checkpointed.keys()
    for key, grad in plain.items():
        torch.testing.assert_close(checkpointed[key], grad, **TOLERANCE, msg=key)

    if carry is not None:  # a continued segment (carried keys/values, recurrent state) checkpoints the same
        torch.manual_seed(2)
        with_carry = gradients(model, ids, carry=carry)
        model.model.gradient_checkpointing = False
        torch.manual_seed(2)
        reference = gradients(model, ids, carry=carry)
        for key, grad in reference.items():
            torch.testing.assert_close(with_carry[key], grad, **TOLERANCE, msg=key)


def test_checkpointing_is_off_in_eval_and_inference():
    model = create_model("bst-sh-s4", "tiny")
    enable_gradient_checkpointing(model)
    calls = checkpointed_calls(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    model.eval()
    model(ids, labels=ids).loss.backward()
    with torch.no_grad():
        out = model(ids, use_cache=True)
        model(ids[:, :1], cache=out.cache)
    assert calls[0] == 0
