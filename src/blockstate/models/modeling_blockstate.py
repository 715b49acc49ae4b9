"""BlockStateForCausalLM: token embedding -> BST / Block Transformer layers -> norm -> LM head (spec section 6).

No absolute position embeddings anywhere: the first layer's SSM supplies position, RoPE works inside blocks.
Any sequence length works: the attention pads the last block internally and trims it again, and causality makes
the result on the real tokens identical to the unpadded computation.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import transformers.initialization as init
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from blockstate.layers import BlockTransformerLayer, BSTLayer, RMSNorm, SSMStreamLayer
from blockstate.layers.cache import BlockStateCache, gather_positions, no_grad_step
from blockstate.layers.gss import GatedStateSpaceLayer
from blockstate.layers.recurrent import BlockRecurrentLayer
from blockstate.models.common import (
    BlockStateCausalLMOutput,
    check_attention_mask,
    enable_gradient_checkpointing,  # noqa: F401 - the trainer and its benchmark import it from here
    padding_runs,
    run_layer,
)
from blockstate.models.configuration_blockstate import BlockStateConfig
from blockstate.models.static_decode import StaticDecoder, check_static_decode


class BlockStatePreTrainedModel(PreTrainedModel):
    config_class = BlockStateConfig
    config: BlockStateConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True  # every layer loop goes through run_layer
    _no_split_modules = ["BSTLayer", "BlockTransformerLayer", "SSMStreamLayer", "GatedStateSpaceLayer"]
    # from_pretrained(dtype=bf16 / fp16) loads the SSM parameters (every module named ``ssm``) in fp32, as
    # ``model.to(dtype)`` keeps them (LongConvSSM._apply): the kernels lose their long tails in half precision
    _keep_in_fp32_modules_strict = ["ssm"]

    def _init_weights(self, module: nn.Module) -> None:
        # Children are initialised before parents (and a loaded tensor is never initialised again), so each Linear reads
        # its own scheme from flags its owner set at construction (see BlockTransformerLayer, ImplicitKernel); the
        # kernels, context states and per-head projections initialise their own tensors (``init_parameters``).
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


class TokenEmbeddingAccessors:
    """Input-embedding accessors of every base model here (``self.embed_tokens``)."""

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value


class BlockStateModel(TokenEmbeddingAccessors, BlockStatePreTrainedModel):
    """The stack without the LM head: returns the final normed hidden states (B, L, D)."""

    gradient_checkpointing = False  # gradient_checkpointing_enable() sets it (on the instance) for run_layer

    def __init__(self, config: BlockStateConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(build_layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                cache: BlockStateCache | None = None, lengths: torch.Tensor | None = None,
                **kwargs) -> BaseModelOutput:
        """Parallel pass over (B, L). With ``cache`` (prefill), every layer also keeps what decoding from
        position lengths[b] needs (row b holds lengths[b] real tokens followed by padding)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, L) or inputs_embeds (B, L, D)")
        if inputs_embeds is None:
            check_input_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        elif (not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3
              or inputs_embeds.shape[-1] != self.config.hidden_size or not inputs_embeds.is_floating_point()
              or inputs_embeds.shape[0] * inputs_embeds.shape[1] == 0):
            raise ValueError(f"inputs_embeds must be a non-empty float tensor (batch, length, hidden_size="
                             f"{self.config.hidden_size}), got {getattr(inputs_embeds, 'dtype', type(inputs_embeds))} "
                             f"{tuple(getattr(inputs_embeds, 'shape', ()))}")
        start, host_lengths = 0, None
        if cache is not None:
            host = cache.positions_on_host()  # positions are decided on the host: no sync per call
            start = int(host.max())
            if lengths is None:
                lengths = torch.full((inputs_embeds.shape[0],), inputs_embeds.shape[1], device=inputs_embeds.device)
                host_lengths = torch.full((inputs_embeds.shape[0],), inputs_embeds.shape[1])
            if start and (bool((host != start).any()) or start % self.config.block_size):
                raise ValueError("a parallel continuation must start on a block boundary at the same position in "
                                 "every row; decode token by token otherwise")
        x = self.dropout(inputs_embeds)
        for i, layer in enumerate(self.layers):
            if cache is None:
                x = run_layer(self, layer.__call__, x, None, lengths, start)
            else:  # a prefill keeps no graph: nothing to checkpoint
                x = layer(x, cache.layers[i], lengths, start)
        if cache is not None:  # padded rows' lengths live on the device: their mirror is read once, lazily
            cache.set_position(start + lengths, None if host_lengths is None else start + host_lengths)
        return BaseModelOutput(last_hidden_state=self.norm(x))

    def allocate_inference_cache(self, batch_size: int, device: torch.device | None = None) -> BlockStateCache:
        device = device or self.embed_tokens.weight.device
        return BlockStateCache(position=torch.zeros(batch_size, dtype=torch.long, device=device),
                               layers=[layer.allocate_inference_cache() for layer in self.layers])

    @no_grad_step
    def step(self, input_ids: torch.LongTensor, cache: BlockStateCache) -> torch.Tensor:
        """One token per row, (B,) -> final hidden states (B, D); advances ``cache.position``."""
        x = self.embed_tokens(input_ids)
        host, length = cache.positions_on_host(), cache.get_seq_length()
        for layer, layer_cache in zip(self.layers, cache.layers):
            layer_cache.host_position = host  # the layers' shape decisions read it (LayerCache.positions_on_host)
            x = layer.step(x, layer_cache, cache.position)
            layer_cache.host_position = None
        cache.set_position(cache.position + 1, host + 1, length + 1)
        return self.norm.step(x)


def build_layer(config: BlockStateConfig, index: int) -> nn.Module:
    """The layout is config data: ``bst_layers`` are BST layers, ``recurrent_layers`` (the Block-Recurrent
    baseline) walk their blocks in sequence, the rest are plain Block Transformer layers (with
    ``ssm_residual_layers="all"``, each with an SSM of its own feeding the stream; with ``plain_layers="gss"``,
    gated state space layers)."""
    if index in getattr(config, "recurrent_layers", ()):
        return BlockRecurrentLayer(config)
    if index in config.bst_layers:
        return BSTLayer(config)
    if getattr(config, "plain_layers", "block") == "gss":
        return GatedStateSpaceLayer(config)
    if getattr(config, "ssm_residual_layers", "bst") == "all":
        return SSMStreamLayer(config)
    return BlockTransformerLayer(config)


# Value checks (token ids and labels in range) read a tensor's values on the host. For a CPU tensor that costs a
# reduction; for one on an accelerator it is a host-device synchronisation that stalls every training step (issue
# 16), so there they run only when asked for (BLOCKSTATE_DEVICE_CHECKS=1 or ``set_device_value_checks(True)``).
# Callers that hold the batch on the host check it there before the transfer (training/steps.py); an id out of
# range on CUDA without the check still fails, as the embedding's device-side assert.
_DEVICE_VALUE_CHECKS = os.environ.get("BLOCKSTATE_DEVICE_CHECKS", "") not in ("", "0")


def set_device_value_checks(enabled: bool) -> bool:
    """Also check ids / labels that live on an accelerator (one host sync each); returns the previous setting."""
    global _DEVICE_VALUE_CHECKS
    previous, _DEVICE_VALUE_CHECKS = _DEVICE_VALUE_CHECKS, bool(enabled)
    return previous


def reads_values(t: torch.Tensor) -> bool:
    """Whether a value check of ``t`` runs: always on the host, on a device only with device checks on."""
    return t.device.type == "cpu" or _DEVICE_VALUE_CHECKS


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """One clear error instead of an index error (or a CUDA device assert) deep inside the embedding."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a torch integer tensor of shape (batch, length), got "
                         f"{type(input_ids).__name__}; use torch.tensor(ids)")
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor of shape (batch, length), got {input_ids.dtype} "
                         f"{tuple(input_ids.shape)}; add a batch dimension with input_ids[None] if needed")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty (length 0): pass at least one token")
    if input_ids.shape[0] == 0:
        raise ValueError("input_ids is empty (batch size 0): pass at least one row")
    if not reads_values(input_ids):
        return
    if input_ids.numel() <= 64:  # a decoding step: one read of the values, not a reduction and two reads
        values = input_ids.reshape(-1).tolist()
        lo, hi = min(values), max(values)
    else:
        lo, hi = (int(v) for v in torch.aminmax(input_ids))
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"input_ids must lie in [0, {vocab_size - 1}] (vocab_size={vocab_size}), got values in "
                         f"[{lo}, {hi}]; the tokenizer and the model's vocab_size disagree")


class LMHeadAccessors:
    """Embedding accessors of every causal LM here: ``self.model.embed_tokens`` in, ``self.lm_head`` out."""

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value


class BlockStateForCausalLM(LMHeadAccessors, BlockStatePreTrainedModel, GenerationMixin):
    """``model(input_ids, labels=None)`` -> logits (B, L, V) fp32 and, with labels, the mean next-token loss.

    Labels follow the Hugging Face convention: the same ids as the input (shifted inside), -100 = ignored.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    carries_state = False  # see blockstate.registry: stateful baselines carry segments through ``carry=``

    def __init__(self, config: BlockStateConfig):
        super().__init__(config)
        self.model = BlockStateModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, labels: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: BlockStateCache | None = None,
                use_cache: bool | None = None, inputs_embeds: torch.Tensor | None = None,
                return_dict: bool | None = None, static_cache: bool = False, compile_decode: bool = False,
                **kwargs) -> BlockStateCausalLMOutput:
        """Parallel forward; or, with ``use_cache``, a parallel prefill that returns a cache; or, given a cache
        that has seen tokens, recurrent decoding of ``input_ids`` one token at a time (equal to the parallel
        forward over the whole stream). ``attention_mask`` (B, L) marks one contiguous run of real tokens per row
        (left or right padding); each row is computed as if it stood alone. ``static_cache=True`` with a prefill:
        decode from fixed buffers, in a CUDA graph on CUDA (``blockstate.models.static_decode``); with
        ``compile_decode=True`` too, the decode step compiled with ``torch.compile``."""
        if cache is not None and cache.get_seq_length() > 0 and not self._continues_in_parallel(cache, input_ids):
            if input_ids is None:
                raise ValueError("decoding with a cache needs input_ids")
            check_input_ids(input_ids, self.config.vocab_size)
            if cache.static is not None:  # the static step returns logits (the head is part of the graph)
                steps = [cache.static.step(input_ids[:, t]) for t in range(input_ids.shape[1])]
                logits = steps[0].unsqueeze(1) if len(steps) == 1 else torch.stack(steps, 1)
            else:
                steps = [self.model.step(input_ids[:, t], cache) for t in range(input_ids.shape[1])]
                head = self.lm_head
                if len(steps) == 1 and type(head) is nn.Linear and not head._forward_hooks:
                    logits = F.linear(steps[0], head.weight, head.bias).unsqueeze(1)  # (B, D): one product
                else:
                    logits = head(steps[0].unsqueeze(1) if len(steps) == 1 else torch.stack(steps, 1))
                logits = logits if logits.dtype is torch.float32 else logits.float()
            loss = None if labels is None else causal_lm_loss(logits, labels)
            return BlockStateCausalLMOutput(loss=loss, logits=logits, cache=cache)

        starts = lengths = None
        check_attention_mask(attention_mask, input_ids)
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            if input_ids is None:
                raise ValueError("attention_mask with padding needs input_ids")
            starts, lengths = padding_runs(attention_mask)
            input_ids = gather_positions(input_ids, starts, input_ids.shape[1])  # real tokens first
            input_ids = input_ids * (torch.arange(input_ids.shape[1], device=input_ids.device) < lengths[:, None])
        if cache is not None and cache.get_seq_length() > 0 and starts is not None:
            raise ValueError("attention_mask padding is only supported for the first (prefill) call")
        if compile_decode and not static_cache:
            raise ValueError("compile_decode=True compiles the static decode step: pass static_cache=True with it")
        if static_cache:
            check_static_decode(self)
        if use_cache and cache is None:
            batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
            cache = self.model.allocate_inference_cache(batch)
        hidden = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, cache=cache,
                            lengths=lengths).last_hidden_state
        logits = self.lm_head(hidden).float()
        if starts is not None:  # back to the caller's layout; padding positions get zero logits
            t = torch.arange(logits.shape[1], device=logits.device)[None, :]
            real = (t >= starts[:, None]) & (t < (starts + lengths)[:, None])
            logits = gather_positions(logits, -starts, logits.shape[1]) * real[..., None]
        loss = None if labels is None else causal_lm_loss(logits, labels)
        if static_cache and cache is not None:
            cache.static = StaticDecoder(self, cache, compile=compile_decode)
        return BlockStateCausalLMOutput(loss=loss, logits=logits, cache=cache if use_cache or cache else None)

    def _continues_in_parallel(self, cache: BlockStateCache, input_ids: torch.Tensor | None) -> bool:
        """A chunk of at least one block that starts on a block boundary in every row runs in parallel mode with
        the carried state (segment streaming); anything else is decoded token by token. Both are exact."""
        w = self.config.block_size
        pos = cache.positions_on_host()
        return (input_ids is not None and input_ids.shape[1] >= w and bool((pos == pos[0]).all())
                and int(pos[0]) % w == 0)

    def allocate_inference_cache(self, batch_size: int, device: torch.device | None = None) -> BlockStateCache:
        """An empty cache for ``batch_size`` streams (one inference interface for every layer)."""
        return self.model.allocate_inference_cache(batch_size, device)

    # -- generate() -----------------------------------------------------------------------------------------
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our cache is built by the prefill (prepare_inputs_for_generation), not a DynamicCache

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, cache: BlockStateCache | None = None,
                                      attention_mask: torch.Tensor | None = None, use_cache: bool = True,
                                      **kwargs) -> dict:
        if cache is not None and cache.get_seq_length() > 0:
            # the cache has consumed everything but the newest token
            return {"input_ids": input_ids[:, -1:], "cache": cache, "use_cache": True}
        return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache, "use_cache": use_cache,
                "static_cache": bool(kwargs.get("static_cache", False)),
                "compile_decode": bool(kwargs.get("compile_decode", False))}


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[:, t+1] from position t, ignoring -100."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have the shape of input_ids {tuple(logits.shape[:2])}, got "
                         f"{tuple(labels.shape)}")
    if labels.dtype not in (torch.long, torch.int32):
        raise ValueError(f"labels must be an integer tensor (token ids, -100 = ignored), got {labels.dtype}")
    bad = ((labels < 0) & (labels != -100)) | (labels >= logits.shape[-1]) if reads_values(labels) else None
    if bad is not None and bool(bad.any()):  # instead of an IndexError (or a device assert) inside cross_entropy
        raise ValueError(f"labels must lie in [0, {logits.shape[-1] - 1}] (vocab_size) or be -100 (ignored), got "
                         f"e.g. {int(labels[bad][0])}")
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().long(), ignore_index=-100)
