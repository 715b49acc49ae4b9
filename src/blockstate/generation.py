"""Streaming text generation: one parallel prefill, then one recurrent step per token (constant memory for
S4D models), yielding text as it is produced.

Models with a streaming cache (``allocate_inference_cache``) decode with it; any other causal LM falls back to a
parallel forward over the last ``context`` tokens per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SamplingConfig:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = 40
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def next_token(logits: torch.Tensor, history: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator) -> int:
    """Pick the next id from (V,) logits: repetition penalty, then temperature, top-k, top-p, as HF does."""
    logits = logits.float().clone()
    if cfg.repetition_penalty != 1.0 and history.numel():
        seen = logits[history]
        logits[history] = torch.where(seen > 0, seen / cfg.repetition_penalty, seen * cfg.repetition_penalty)
    if cfg.temperature == 0:
        return int(logits.argmax())
    logits = logits / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.numel():
        kth = torch.topk(logits, cfg.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if cfg.top_p is not None and cfg.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > cfg.top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.no_grad()
def stream_ids(model: nn.Module, prompt_ids: list[int], cfg: SamplingConfig, stop_id: int | None = None,
               context: int = 2048) -> Iterator[int]:
    """Yield sampled ids one at a time (prompt excluded), stopping at ``stop_id``."""
    cfg.validate()
    if not prompt_ids:
        raise ValueError("the prompt is empty: pass at least one token")
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    streaming = hasattr(model, "allocate_inference_cache")
    history = ids[0].cpu()
    if streaming:
        out = model(ids, use_cache=True)
        cache, logits = out.cache, out.logits[0, -1]
    for _ in range(cfg.max_new_tokens):
        if not streaming:
            logits = model(ids[:, -context:]).logits[0, -1]
        token = next_token(logits.cpu(), history, cfg, gen)
        if stop_id is not None and token == stop_id:
            return
        yield token
        history = torch.cat([history, torch.tensor([token])])
        step = torch.tensor([[token]], device=device)
        if streaming:
            logits = model(step, cache=cache).logits[0, -1]
        else:
            ids = torch.cat([ids, step], dim=1)


def stream_text(model: nn.Module, tokenizer, prompt: str, cfg: SamplingConfig) -> Iterator[str]:
    """Yield decoded text pieces as tokens arrive. The prompt follows a document separator (EOS), as every
    training document does. Incomplete multi-byte characters are held back until they complete."""
    ids = [tokenizer.eos_id] + tokenizer.encode(prompt)
    new: list[int] = []
    shown = ""
    for token in stream_ids(model, ids, cfg, stop_id=tokenizer.eos_id):
        new.append(token)
        text = tokenizer.decode(new)
        if text.endswith("\ufffd"):
            continue  # a partial UTF-8 sequence: wait for its remaining bytes
        yield text[len(shown) :]
        shown = text
    text = tokenizer.decode(new)
    if len(text) > len(shown):
        yield text[len(shown) :]
