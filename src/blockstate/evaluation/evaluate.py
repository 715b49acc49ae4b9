"""Perplexity and bits per byte of a causal LM on a tokenised split, at any evaluation length.

Protocol (the same for validation during training and for ``blockstate eval``):

- every document of the split is evaluated whole, on its own (no packing, no context from other documents);
- a document is cut into consecutive segments of ``length`` tokens; consecutive segments share exactly one
  boundary token (the last input of segment k is the first input of segment k+1), so the *targets* never
  overlap and every token of every document is scored exactly once, with the context available inside its
  segment (no sliding window);
- the first token of a document is predicted from the document separator (EOS), which is never a target;
- a document shorter than ``length`` is one shorter segment, scored as it is (not dropped, not padded into the
  loss);
- a model that carries state across segments (``model.carries_state``: Slide, Transformer-XL, BRecT) reads each
  document's segments in order and carries its state from one segment to the next within the document (never
  across documents), which is how such models see context beyond a segment;
- token perplexity = exp(summed NLL / scored tokens); bits per byte = summed NLL / (ln 2 * UTF-8 bytes of the
  documents), which does not depend on the tokenizer, so models with different tokenizers compare.

The per-position statistics average the loss of each position inside a segment over all segments, which shows
how much a model gains from context (and whether it degrades past its training length).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from blockstate.data import IGNORE_INDEX, TokenizedSplit, eval_batches
from blockstate.registry import carries_state


@dataclasses.dataclass
class EvalResult:
    length: int
    nll: float  # summed negative log-likelihood, nats
    tokens: int  # scored tokens
    bytes: int  # UTF-8 bytes of the evaluated documents
    documents: int
    segments: int
    position_nll: list[float] | None = None  # summed NLL per position inside a segment (target index)
    position_count: list[int] | None = None

    @property
    def loss(self) -> float:
        return self.nll / max(1, self.tokens)

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bpb(self) -> float:
        return self.nll / (math.log(2) * max(1, self.bytes))

    def position_loss(self) -> list[float]:
        if not self.position_nll or not self.position_count:
            return []
        return [s / c if c else float("nan") for s, c in zip(self.position_nll, self.position_count)]

    def summary(self) -> dict[str, Any]:
        return {"length": self.length, "loss": self.loss, "ppl": self.ppl, "bpb": self.bpb, "tokens": self.tokens,
                "bytes": self.bytes, "documents": self.documents, "segments": self.segments}


def head_documents(data: TokenizedSplit, max_tokens: int) -> TokenizedSplit:
    """The first documents of a split holding at most ``max_tokens`` tokens (at least one document): a fixed,
    whole-document subset, so its bits per byte are exact (used for validation during training)."""
    if max_tokens <= 0 or data.num_tokens <= max_tokens:
        return data
    sizes = np.diff(data.offsets) - 1
    k = max(1, int(np.searchsorted(np.cumsum(sizes), max_tokens, side="right")))
    return TokenizedSplit(data.tokens[: data.offsets[k]], data.offsets[: k + 1], data.doc_bytes[:k], data.eos_id,
                          data.vocab_size, f"{data.name}[:{k}]", data.stats)


def eval_batch_size(length: int, batch_tokens: int) -> int:
    return max(1, batch_tokens // length)


@torch.no_grad()
def evaluate(model: nn.Module, data: TokenizedSplit, length: int, *, batch_tokens: int = 16384,
             device: torch.device | str = "cpu", autocast: Callable[[], AbstractContextManager] | None = None,
             rank: int = 0, world_size: int = 1, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
             positions: bool = True, progress: bool = False) -> EvalResult:
    """Score every token of ``data`` once at segment length ``length`` (see the module doc).

    With ``world_size > 1`` each rank scores its share of segments and ``reduce`` (an in-place all-reduce sum)
    combines the sums; every rank runs the same number of batches (FSDP needs all ranks in every forward).
    """
    if length < 2:
        raise ValueError(f"evaluation length must be at least 2 tokens, got {length}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    batch = eval_batch_size(length, batch_tokens)
    sums = torch.zeros(3, dtype=torch.float64)  # nll, tokens, segments
    pos_nll = torch.zeros(length - 1, dtype=torch.float64)
    pos_cnt = torch.zeros(length - 1, dtype=torch.float64)
    stateful = carries_state(model)
    if stateful:  # one lane per document at most: more lanes would only run idle rows
        batch = max(1, min(batch, -(-data.num_documents // world_size)))
    batches = eval_batches(data, length, batch, rank=rank, world_size=world_size, contiguous=stateful)
    carry = None
    if progress:
        from tqdm.auto import tqdm

        total = -(-_num_eval_segments(data, length) // (batch * world_size))
        batches = tqdm(batches, total=total, desc=f"eval L={length}", leave=False, unit="batch")
    for b in batches:
        ids, labels = b["input_ids"].to(device), b["labels"].to(device)
        kwargs = {}
        if stateful:  # segments overlap by one token: carry the state after length - 1 of them
            kwargs = {"carry": carry, "reset": b["reset"].to(device), "carry_length": length - 1}
        with autocast() if autocast else nullcontext():
            out = model(input_ids=ids, **kwargs)
        logits, carry = out.logits, getattr(out, "carry", None)
        targets = labels[:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                              reduction="none").view(targets.shape).double().cpu()
        mask = (targets != IGNORE_INDEX).cpu()
        nll = nll * mask
        sums += torch.tensor([nll.sum().item(), mask.sum().item(), mask.any(1).sum().item()], dtype=torch.float64)
        if positions:
            width = nll.shape[1]
            pos_nll[:width] += nll.sum(0)
            pos_cnt[:width] += mask.sum(0)
    if reduce is not None and world_size > 1:
        packed = reduce(torch.cat([sums, pos_nll, pos_cnt]))
        sums, pos_nll, pos_cnt = packed[:3], packed[3:length + 2], packed[length + 2:]
    model.train(was_training)
    return EvalResult(length=length, nll=float(sums[0]), tokens=int(sums[1]), bytes=data.num_bytes,
                      documents=data.num_documents, segments=int(sums[2]),
                      position_nll=pos_nll.tolist() if positions else None,
                      position_count=[int(c) for c in pos_cnt.tolist()] if positions else None)


def _num_eval_segments(data: TokenizedSplit, length: int) -> int:
    from blockstate.data import num_segments

    return int(num_segments(np.diff(data.offsets), length).sum())
