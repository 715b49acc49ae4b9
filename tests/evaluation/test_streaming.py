"""Streaming evaluation equals one long parallel pass."""

import pytest
import torch
import torch.nn.functional as F
from helpers.models import small_config

from blockstate import BlockStateForCausalLM
from blockstate.evaluation.streaming import stream_chunk_size, stream_document_nll


@pytest.mark.parametrize("variant,kernel", [("sh", "s4d"), ("mf", "s4d"), ("mh", "unstructured")])
def test_stream_document_nll_equals_parallel(variant, kernel):
    torch.manual_seed(0)
    model = BlockStateForCausalLM(small_config(variant, kernel, attend_previous_block=True)).eval()
    doc = torch.randint(0, 61, (203,))
    with torch.no_grad():
        logits = model(doc[None]).logits[0]
    expected = F.cross_entropy(logits[:-1], doc[1:], reduction="sum").item()
    result = stream_document_nll(model, doc.numpy(), chunk=20)  # rounded to 16: 13 chunks
    assert result.tokens == 202
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert stream_chunk_size(model, 20) == 16 and stream_chunk_size(model, 3) == 8
