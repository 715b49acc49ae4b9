"""Segment streaming evaluation: score a whole document, however long, with the full left context.

The document is fed in block-aligned chunks; the model's cache carries the SSM state and the block keys/values
from chunk to chunk, so memory stays that of one chunk (plus, for non-S4D kernels, the input history) and the
result equals one parallel pass over the whole document (tested). This is how a BST model is scored on
contexts of a million tokens on one machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class StreamResult:
    nll: float  # summed over scored tokens, nats
    tokens: int

    @property
    def loss(self) -> float:
        return self.nll / max(1, self.tokens)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def supports_streaming(model: nn.Module) -> bool:
    return hasattr(model, "allocate_inference_cache")


def stream_chunk_size(model: nn.Module, chunk: int) -> int:
    """Round ``chunk`` down to whole blocks, so every chunk continues in parallel mode."""
    block = int(getattr(model.config, "block_size", 1))
    if block > chunk:
        return block
    return chunk - chunk % block


@torch.no_grad()
def stream_document_nll(model: nn.Module, tokens: np.ndarray | torch.Tensor, chunk: int = 4096) -> StreamResult:
    """Sum of -log p(t[i+1] | t[..i]) over the document (every token after the first scored once)."""
    if not supports_streaming(model):
        raise ValueError(f"{type(model).__name__} has no streaming cache: evaluate it without --stream")
    device = next(model.parameters()).device
    ids = torch.as_tensor(np.array(tokens, dtype=np.int64), device=device).view(1, -1)
    total = ids.shape[1]
    if total < 2:
        return StreamResult(0.0, 0)
    chunk = stream_chunk_size(model, chunk)
    cache, nll = None, 0.0
    for start in range(0, total - 1, chunk):
        piece = ids[:, start : min(start + chunk, total - 1)]
        out = model(piece, cache=cache, use_cache=True)
        cache = out.cache
        targets = ids[0, start + 1 : start + 1 + piece.shape[1]]
        nll += float(F.cross_entropy(out.logits[0].float(), targets, reduction="sum"))
    return StreamResult(nll, total - 1)


def evaluate_streaming(model: nn.Module, data, chunk: int = 4096, log=None) -> dict:
    """Every document of a TokenizedSplit scored with its whole left context (``stream_document_nll``).

    Returns a summary like EvalResult's, with ``length`` = "document" (the context is the whole document)."""
    nll, tokens, nbytes = 0.0, 0, 0
    for doc, doc_bytes in data.documents():  # each document follows its separator, as in training
        r = stream_document_nll(model, np.concatenate([[data.eos_id], doc]), chunk)
        nll, tokens, nbytes = nll + r.nll, tokens + r.tokens, nbytes + doc_bytes
    loss = nll / max(1, tokens)
    return {"length": "document", "chunk": stream_chunk_size(model, chunk), "loss": loss,
            "ppl": math.exp(min(loss, 700.0)), "bpb": nll / (math.log(2) * max(1, nbytes)), "tokens": tokens,
            "bytes": nbytes, "documents": data.num_documents}
