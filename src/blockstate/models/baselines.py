"""The paper's baselines as Hugging Face causal LMs built from the project's own layers (spec section 8).

- ``BlockTransformerForCausalLM``: ``BlockStateForCausalLM`` with no BST layers, which is literally the BST model
  minus the SSM: GPT (one block as long as the sequence), Slide (W x 2W sliding tile), Transformer-XL (window =
  half a training segment). With ``carry_state`` it carries each layer's last W keys/values into the next segment.
  Without a carry (and for generation) it is the parent's forward unchanged, streaming cache included.
- ``BlockRecurrentForCausalLM``: the same sliding stack with ``BlockRecurrentLayer`` at ``recurrent_layers``; the
  recurrent state and the keys/values carry across segments (BRecT, Rec:fixed:skip).
- ``GatedStateSpaceForCausalLM``: ``GatedStateSpaceLayer`` stack with a ``BlockTransformerLayer`` at
  ``attention_layers`` (GSS-Hybrid); nothing carried; streams and generates as the BST model does.

Every model takes ``forward(input_ids, labels=None, ...)`` and returns fp32 logits (B, L, V) and the mean
next-token loss, like the BST model; the carry interface is described in ``blockstate.registry``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from blockstate.layers import BlockTransformerLayer, RMSNorm
from blockstate.layers.cache import BlockStateCache
from blockstate.layers.gss import GatedStateSpaceLayer
from blockstate.layers.recurrent import BlockRecurrentLayer, carry_block_layer
from blockstate.models.common import BlockStateCausalLMOutput, check_attention_mask, run_layer
from blockstate.models.configuration_baselines import (
    BlockRecurrentConfig,
    BlockTransformerConfig,
    GatedStateSpaceConfig,
)
from blockstate.models.modeling_blockstate import (
    BlockStateForCausalLM,
    BlockStateModel,
    BlockStatePreTrainedModel,
    causal_lm_loss,
    check_input_ids,
)
from blockstate.models.stateful import SegmentCarry, SegmentLMOutput, SegmentStateMixin, right_padding_only
from blockstate.models.static_decode import check_static_decode


def _inference_call(kwargs: dict) -> bool:
    """Generation-style calls (an inference cache, or embeddings instead of ids) take the parent's path."""
    return kwargs.get("cache") is not None or bool(kwargs.get("use_cache")) or kwargs.get("inputs_embeds") is not None


class BlockTransformerForCausalLM(SegmentStateMixin, BlockStateForCausalLM):
    """GPT / Slide / Transformer-XL: a Block Transformer LM; ``carries_state`` follows ``config.carry_state``."""

    config_class = BlockTransformerConfig

    def __init__(self, config: BlockTransformerConfig):
        super().__init__(config)
        self.carries_state = bool(config.carry_state)

    def forward(self, input_ids: torch.LongTensor | None = None, labels: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None, *, carry: SegmentCarry | None = None,
                reset: torch.Tensor | None = None, carry_length: int | None = None,
                **kwargs) -> SegmentLMOutput | CausalLMOutput:
        """Stateful (``carries_state``): one segment from ``carry`` (see ``blockstate.registry``), returning
        ``output.carry``. Otherwise, or for inference with ``cache``/``use_cache``: the parent's forward."""
        inference = _inference_call(kwargs)
        if not self.carries_state or inference:  # a stateless model ignores carry/reset, like every other one
            if inference and carry is not None and self.carries_state:
                raise ValueError("carry= and an inference cache exclude each other: pass one of them")
            return super().forward(input_ids, labels=labels, attention_mask=attention_mask, **kwargs)
        right_padding_only(attention_mask, input_ids)
        return self.segment_forward(input_ids, labels, carry, reset, carry_length)

    def _segment(self, input_ids: torch.LongTensor, carry: SegmentCarry | None) -> tuple[torch.Tensor, SegmentCarry]:
        x = self.model.dropout(self.model.embed_tokens(input_ids))
        keys, values, states = [], [], []
        recurrent = 0
        for i, layer in enumerate(self.model.layers):
            past = None if carry is None else (carry.keys[i], carry.values[i])
            if isinstance(layer, BlockRecurrentLayer):
                state = None if carry is None else carry.states[recurrent]
                x, state, (k, v) = run_layer(self.model, layer.__call__, x, state, past)
                states.append(state)
                recurrent += 1
            else:
                x, (k, v) = run_layer(self.model, carry_block_layer, layer, x, past)
            keys.append(k)
            values.append(v)
        logits = self.lm_head(self.model.norm(x)).float()
        return logits, SegmentCarry(tuple(keys), tuple(values), tuple(states))


class BlockRecurrentForCausalLM(BlockTransformerForCausalLM):
    """Block-Recurrent Transformer: a sliding stack whose ``recurrent_layers`` walk their blocks in sequence."""

    config_class = BlockRecurrentConfig
    _no_split_modules = ["BlockTransformerLayer", "BlockRecurrentLayer"]

    def __init__(self, config: BlockRecurrentConfig):
        if not config.carry_state:
            raise ValueError("a Block-Recurrent Transformer always carries its state: carry_state must be True")
        super().__init__(config)  # build_layer puts BlockRecurrentLayer at config.recurrent_layers

    def forward(self, input_ids: torch.LongTensor | None = None, labels: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None, *, carry: SegmentCarry | None = None,
                reset: torch.Tensor | None = None, carry_length: int | None = None, **kwargs) -> SegmentLMOutput:
        if kwargs.get("static_cache"):
            check_static_decode(self)  # one line: its blocks are sequential
        if _inference_call(kwargs):
            return self.recurrent_forward(input_ids, labels, attention_mask, kwargs.get("cache"))
        right_padding_only(attention_mask, input_ids)
        return self.segment_forward(input_ids, labels, carry, reset, carry_length)


    @torch.no_grad()
    def recurrent_forward(self, input_ids: torch.LongTensor | None, labels: torch.LongTensor | None,
                          attention_mask: torch.Tensor | None,
                          cache: BlockStateCache | None) -> BlockStateCausalLMOutput:
        """Inference with the shared cache interface. Its blocks are sequential by design, so the prompt is read
        token by token too (no parallel prefill); the logits equal the parallel forward's."""
        if input_ids is None:
            raise ValueError("the Block-Recurrent Transformer needs input_ids (B, L)")
        check_attention_mask(attention_mask, input_ids)
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("the Block-Recurrent Transformer's cache takes unpadded prompts: generate one prompt "
                             "length at a time")
        check_input_ids(input_ids, self.config.vocab_size)
        if cache is None:
            cache = self.allocate_inference_cache(input_ids.shape[0], input_ids.device)
        hidden = torch.stack([self.model.step(input_ids[:, t], cache) for t in range(input_ids.shape[1])], 1)
        logits = self.lm_head(hidden).float()
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return BlockStateCausalLMOutput(loss=loss, logits=logits, cache=cache)


class GatedStateSpaceModel(BlockStateModel):
    """Embedding -> GSS layers and block-attention layers -> final norm. Only the layers differ from the BST
    stack: the parallel forward (with a cache: prefill or block-aligned continuation), ``step`` and
    ``allocate_inference_cache`` are ``BlockStateModel``'s, which every layer here serves alike."""

    config_class = GatedStateSpaceConfig
    _no_split_modules = ["BlockTransformerLayer", "GatedStateSpaceLayer"]

    def __init__(self, config: GatedStateSpaceConfig):
        BlockStatePreTrainedModel.__init__(self, config)  # not BlockStateModel's: it would build BST layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)
        attention = set(config.attention_layers)
        self.layers = nn.ModuleList(
            BlockTransformerLayer(config) if i in attention else GatedStateSpaceLayer(config)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()


class GatedStateSpaceForCausalLM(BlockStateForCausalLM):
    """GSS-Hybrid causal LM; stateless (``carry``/``reset`` are accepted and ignored). Its forward, streaming
    cache and ``generate()`` are the BST model's (left/right padding, prefill, token-by-token decoding, beam
    reordering): the GSS layers' SSM decodes as a recurrence, the attention layers keep their blocks' keys/values."""

    config_class = GatedStateSpaceConfig
    carries_state = False
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _no_split_modules = ["BlockTransformerLayer", "GatedStateSpaceLayer"]

    def __init__(self, config: GatedStateSpaceConfig):
        BlockStatePreTrainedModel.__init__(self, config)  # not BlockStateForCausalLM's: it builds the BST stack
        self.model = GatedStateSpaceModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
