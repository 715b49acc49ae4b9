"""Text generation: one path, Hugging Face ``generate()`` with a streamer, for ``blockstate generate`` and the
sample printed after training.

``generate()`` runs a parallel prefill and then one recurrent step per token through each model's streaming
cache (constant memory for S4D models); :class:`Utf8Streamer` turns the ids into text as they arrive and holds
back an incomplete UTF-8 character (a byte-level tokenizer emits a multi-byte character one byte at a time)
until its last byte is there. The prompt follows a document separator (EOS), as every training document did,
and generation stops at the next one.

The hand-written samplers this replaced (a cached loop and a parallel re-forward) were no faster, so they
went: on the ``tiny`` BST:SH:S4 (3.8M parameters; CPU, 1 thread, a 2-core machine shared with other jobs;
200 greedy tokens after a 7-token prompt, 3 interleaved repeats) the cached loop took 10.3-12.5 ms per token
and ``generate()`` 10.6-11.5 ms, with identical tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.generation.streamers import BaseStreamer


@dataclass
class SamplingConfig:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = 40  # None or 0 = off
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int = 0
    # decode from fixed buffers, captured in a CUDA graph on CUDA (blockstate.models.static_decode); BST SH / MH
    # with S4D kernels only, others are refused in one line
    static_cache: bool = False
    # with static_cache: the decode step compiled with torch.compile (seconds once, then fewer dispatches per token)
    compile_decode: bool = False

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.compile_decode and not self.static_cache:
            raise ValueError("--compile-decode compiles the static decode step: pass --static-cache with it")
        if self.repetition_penalty <= 0:
            raise ValueError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")

    def generation_config(self, eos_id: int | None) -> Any:
        """The same settings as a ``GenerationConfig`` (complete, so no model default such as top_k=50 leaks
        in); a greedy config carries no sampling fields, which ``generate()`` would warn about."""
        from transformers import GenerationConfig

        self.validate()
        pad = eos_id if eos_id is not None else 0  # one unpadded row: the pad id is never used
        common = dict(max_new_tokens=self.max_new_tokens, eos_token_id=eos_id, pad_token_id=pad,
                      bos_token_id=eos_id, repetition_penalty=self.repetition_penalty)
        if self.temperature == 0:
            return GenerationConfig(do_sample=False, **common)
        return GenerationConfig(do_sample=True, temperature=self.temperature, top_k=self.top_k or 0,
                                top_p=self.top_p if self.top_p is not None else 1.0, **common)


def set_token_ids(model: nn.Module, eos_id: int) -> None:
    """EOS = BOS = PAD = the document separator, in the model's config and generation config, so a plain
    ``model.generate(ids)`` (and ``pipeline``) stops where training documents ended."""
    config = getattr(model, "config", None)
    if config is not None:
        config.eos_token_id = config.bos_token_id = config.pad_token_id = int(eos_id)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.eos_token_id = gen.bos_token_id = gen.pad_token_id = int(eos_id)


def can_generate(model: nn.Module) -> bool:
    check = getattr(model, "can_generate", None)
    return callable(getattr(model, "generate", None)) and (check is None or bool(check()))


class Utf8Streamer(BaseStreamer):
    """A ``generate()`` streamer that calls ``write(piece)`` with the new text after every token.

    ``decode(ids) -> str`` is the tokenizer's (special tokens dropped). Text ending in U+FFFD is a partial
    UTF-8 character: it is held back until the character completes (or generation ends). The prompt, the
    first ``put``, is skipped."""

    def __init__(self, decode: Callable[[list[int]], str], write: Callable[[str], Any] | None = None) -> None:
        self.decode = decode
        self.write = write or (lambda piece: None)
        self.ids: list[int] = []
        self.shown = ""
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1:
            if value.shape[0] > 1:
                raise ValueError("Utf8Streamer streams one sequence: generate with a batch of one")
            value = value[0]
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.ids += [int(i) for i in value.tolist()]
        text = self.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def end(self) -> None:
        self._emit(self.decode(self.ids))

    def _emit(self, text: str) -> None:
        if len(text) > len(self.shown):
            self.write(text[len(self.shown):])
        self.shown = text


@torch.no_grad()
def generate_ids(model: nn.Module, prompt_ids: list[int], cfg: SamplingConfig, eos_id: int | None,
                 streamer: BaseStreamer | None = None) -> list[int]:
    """Ids continuing ``prompt_ids`` (prompt excluded, the final EOS dropped), through ``model.generate``.

    Seeded by ``cfg.seed`` inside a forked RNG, so sampling never disturbs the caller's random streams."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: pass at least one token (e.g. the EOS id)")
    if not can_generate(model):
        raise ValueError(f"{type(model).__name__} has no generate() yet, so it cannot produce text: use another "
                         "model, or --sample-tokens 0 when training it")
    gen_config = cfg.generation_config(eos_id)
    if cfg.max_new_tokens == 0:
        return []
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed)
            extra = {"static_cache": True, "compile_decode": cfg.compile_decode} if cfg.static_cache else {}
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen_config,
                                 streamer=streamer, **extra)
    finally:
        model.train(was_training)
    new = out[0, ids.shape[1]:].tolist()
    return new[:-1] if new and eos_id is not None and new[-1] == eos_id else new


def generate_text(model: nn.Module, tokenizer: Any, prompt: str, cfg: SamplingConfig,
                  write: Callable[[str], Any] | None = None) -> str:
    """Prompt text -> the generated continuation, streamed to ``write`` piece by piece as tokens arrive.

    ``tokenizer`` is a project tokenizer (``encode`` / ``decode`` / ``eos_id``). The prompt follows a document
    separator, as every training document does; generation stops at the next separator."""
    ids = [tokenizer.eos_id] + tokenizer.encode(prompt)
    streamer = Utf8Streamer(tokenizer.decode, write)
    new = generate_ids(model, ids, cfg, tokenizer.eos_id, streamer)
    return tokenizer.decode(new)
