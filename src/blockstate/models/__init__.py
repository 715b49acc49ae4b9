"""Configs, Hugging Face wrappers and named sizes: the BST model and the paper's baselines (spec section 8).

Names and parameter counts of the registered models are ``blockstate.registry``'s (it imports this package)."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from blockstate.models.baselines import (
    BlockRecurrentForCausalLM,
    BlockTransformerForCausalLM,
    GatedStateSpaceForCausalLM,
    GatedStateSpaceModel,
)
from blockstate.models.configuration_baselines import (
    BlockRecurrentConfig,
    BlockTransformerConfig,
    GatedStateSpaceConfig,
)
from blockstate.models.configuration_blockstate import (
    BlockLMConfig,
    BlockStateConfig,
    SSMKernelConfig,
    default_bst_layers,
)
from blockstate.models.modeling_blockstate import (
    BlockStateForCausalLM,
    BlockStateModel,
    BlockStatePreTrainedModel,
    causal_lm_loss,
)
from blockstate.models.presets import SIZES, preset_config
from blockstate.models.stateful import SegmentCarry, SegmentLMOutput, map_carry

AutoConfig.register(BlockStateConfig.model_type, BlockStateConfig, exist_ok=True)
AutoModel.register(BlockStateConfig, BlockStateModel, exist_ok=True)
AutoModelForCausalLM.register(BlockStateConfig, BlockStateForCausalLM, exist_ok=True)
for _config, _model in ((BlockTransformerConfig, BlockTransformerForCausalLM),
                        (BlockRecurrentConfig, BlockRecurrentForCausalLM),
                        (GatedStateSpaceConfig, GatedStateSpaceForCausalLM)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForCausalLM.register(_config, _model, exist_ok=True)
AutoModel.register(GatedStateSpaceConfig, GatedStateSpaceModel, exist_ok=True)

__all__ = [
    "SIZES",
    "BlockLMConfig",
    "BlockRecurrentConfig",
    "BlockRecurrentForCausalLM",
    "BlockStateConfig",
    "BlockStateForCausalLM",
    "BlockStateModel",
    "BlockStatePreTrainedModel",
    "BlockTransformerConfig",
    "BlockTransformerForCausalLM",
    "GatedStateSpaceConfig",
    "GatedStateSpaceForCausalLM",
    "GatedStateSpaceModel",
    "SSMKernelConfig",
    "SegmentCarry",
    "SegmentLMOutput",
    "causal_lm_loss",
    "default_bst_layers",
    "map_carry",
    "preset_config",
]
