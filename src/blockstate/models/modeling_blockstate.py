"""BlockStateForCausalLM: token embedding -> BST / Block Transformer layers -> norm -> LM head (spec section 6).

No absolute position embeddings anywhere: the first layer's SSM supplies position, RoPE works inside blocks.
Any sequence length works: the attention pads the last block internally and trims it again, and causality makes
the result on the real tokens identical to the unpadded computation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import transformers.initialization as init
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from blockstate.layers import BlockTransformerLayer, BSTLayer, RMSNorm
from blockstate.models.configuration_blockstate import BlockStateConfig


class BlockStatePreTrainedModel(PreTrainedModel):
    config_class = BlockStateConfig
    config: BlockStateConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["BSTLayer", "BlockTransformerLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        # Children are initialised before parents and a tensor is never initialised twice, so each Linear reads
        # its own scheme from flags its owner set at construction (see BlockTransformerLayer, ImplicitKernel).
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "_init_fan_in_uniform", False):
                bound = 1 / math.sqrt(module.in_features)
                init.uniform_(module.weight, -bound, bound)
                if module.bias is not None:
                    init.uniform_(module.bias, -bound, bound)
                return
            if getattr(module, "_residual_output", False):
                # GPT-2 scheme: residual-branch outputs shrink with depth (2 branches per layer)
                std = std / math.sqrt(2 * self.config.num_hidden_layers)
            init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, 0.0, std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif hasattr(module, "init_parameters"):  # SSM kernels, context states, per-head projections
            module.init_parameters(std)


class BlockStateModel(BlockStatePreTrainedModel):
    """The stack without the LM head: returns the final normed hidden states (B, L, D)."""

    def __init__(self, config: BlockStateConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)
        bst = set(config.bst_layers)
        self.layers = nn.ModuleList(
            BSTLayer(config) if i in bst else BlockTransformerLayer(config) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs) -> BaseModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, L) or inputs_embeds (B, L, D)")
        if inputs_embeds is None:
            check_input_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        x = self.dropout(inputs_embeds)
        for layer in self.layers:
            x = layer(x)
        return BaseModelOutput(last_hidden_state=self.norm(x))


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """One clear error instead of an index error (or a CUDA device assert) deep inside the embedding."""
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor of shape (batch, length), got {input_ids.dtype} "
                         f"{tuple(input_ids.shape)}; add a batch dimension with input_ids[None] if needed")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty (length 0): pass at least one token")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"input_ids must lie in [0, {vocab_size - 1}] (vocab_size={vocab_size}), got values in "
                         f"[{lo}, {hi}]; the tokenizer and the model's vocab_size disagree")


class BlockStateForCausalLM(BlockStatePreTrainedModel, GenerationMixin):
    """``model(input_ids, labels=None)`` -> logits (B, L, V) fp32 and, with labels, the mean next-token loss.

    Labels follow the Hugging Face convention: the same ids as the input (shifted inside), -100 = ignored.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BlockStateConfig):
        super().__init__(config)
        self.model = BlockStateModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None, labels: torch.LongTensor | None = None,
                inputs_embeds: torch.Tensor | None = None, return_dict: bool | None = None,
                **kwargs) -> CausalLMOutput:
        hidden = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds).last_hidden_state
        logits = self.lm_head(hidden).float()
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return CausalLMOutput(loss=loss, logits=logits)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[:, t+1] from position t, ignoring -100."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have the shape of input_ids {tuple(logits.shape[:2])}, got "
                         f"{tuple(labels.shape)}")
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
