"""The sample printed after training, as functions of ids and text: thin wrappers over the one generation path
(:mod:`blockstate.generation`, Hugging Face ``generate()``); no sampler of their own."""

from __future__ import annotations

from typing import Any

from torch import nn

from blockstate.generation import SamplingConfig, generate_ids, generate_text


def sample(model: nn.Module, prompt_ids: list[int], max_new_tokens: int, *, context: int | None = None,
           temperature: float = 0.8, top_k: int | None = 40, seed: int = 0, stop_id: int | None = None,
           device: Any = None) -> list[int]:
    """Token ids continuing ``prompt_ids`` (prompt excluded), stopping early at ``stop_id`` (e.g. EOS).

    ``context`` keeps only the prompt's last ``context`` tokens; ``device`` is ignored (the model's own is
    used). Seeded, and the caller's RNG streams are left as they were."""
    prompt = list(prompt_ids)[-context:] if context else list(prompt_ids)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=max(0.0, temperature), top_k=top_k, seed=seed)
    return generate_ids(model, prompt, cfg, stop_id)


def sample_text(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int, *, context: int | None = None,
                temperature: float = 0.8, top_k: int | None = 40, seed: int = 0, device: Any = None) -> str:
    """Prompt text -> prompt + sampled continuation. The prompt follows a document separator, as every
    training document does."""
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=max(0.0, temperature), top_k=top_k, seed=seed)
    return prompt + generate_text(model, tokenizer, prompt, cfg)
