"""nn.Modules: block attention, SSM kernels, the BST layer and the plain Block Transformer layer."""

from blockstate.layers.attention import BlockAttention, previous_block_mask
from blockstate.layers.bst import VARIANTS, BlockTransformerLayer, BSTLayer, ContextStates, SSMStreamLayer
from blockstate.layers.common import FeedForward, RMSNorm, ssm_parameter_names
from blockstate.layers.ssm import (
    KERNELS,
    ExplicitKernel,
    ImplicitKernel,
    LongConvSSM,
    S4DKernel,
    make_kernel,
)

__all__ = [
    "KERNELS",
    "VARIANTS",
    "BSTLayer",
    "SSMStreamLayer",
    "BlockAttention",
    "BlockTransformerLayer",
    "ContextStates",
    "ExplicitKernel",
    "FeedForward",
    "ImplicitKernel",
    "LongConvSSM",
    "RMSNorm",
    "S4DKernel",
    "make_kernel",
    "previous_block_mask",
    "ssm_parameter_names",
]
