"""Configs, Hugging Face wrappers, presets."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from blockstate.models.configuration_blockstate import BlockStateConfig, default_bst_layers
from blockstate.models.modeling_blockstate import (
    BlockStateForCausalLM,
    BlockStateModel,
    BlockStatePreTrainedModel,
    causal_lm_loss,
)
from blockstate.models.presets import SIZES, count_parameters, parameter_table, preset_config

AutoConfig.register(BlockStateConfig.model_type, BlockStateConfig, exist_ok=True)
AutoModel.register(BlockStateConfig, BlockStateModel, exist_ok=True)
AutoModelForCausalLM.register(BlockStateConfig, BlockStateForCausalLM, exist_ok=True)

__all__ = [
    "BlockStateConfig",
    "BlockStateForCausalLM",
    "BlockStateModel",
    "BlockStatePreTrainedModel",
    "SIZES",
    "causal_lm_loss",
    "count_parameters",
    "parameter_table",
    "preset_config",
    "default_bst_layers",
]
