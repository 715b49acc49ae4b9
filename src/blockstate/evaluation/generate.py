"""A simple sampler: the model's parallel forward on the growing sequence (the last ``context`` tokens).

Quadratic in the sample length, which is fine for the few hundred tokens of a training run's sample; streaming
generation with carried SSM state lives elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def sample(model: nn.Module, prompt_ids: list[int], max_new_tokens: int, *, context: int = 512,
           temperature: float = 0.8, top_k: int | None = 40, seed: int = 0, stop_id: int | None = None,
           device: torch.device | str = "cpu") -> list[int]:
    """Token ids continuing ``prompt_ids`` (prompt excluded). Stops early at ``stop_id`` (e.g. EOS).

    Uses its own generator, so sampling never disturbs the training RNG streams.
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty: pass at least one token (e.g. the EOS id)")
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids[:, -context:]).logits[0, -1].float().cpu()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        if stop_id is not None and nxt == stop_id:
            break
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]], device=ids.device)], dim=1)
    model.train(was_training)
    return out


def sample_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int, **kwargs) -> str:
    """Prompt text -> prompt + sampled continuation, decoded. The prompt follows a document separator, as every
    training document does."""
    ids = [tokenizer.eos_id] + tokenizer.encode(prompt)
    new = sample(model, ids, max_new_tokens, stop_id=tokenizer.eos_id, **kwargs)
    return tokenizer.decode(ids[1:] + new)
