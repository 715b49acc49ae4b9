"""blockstate: the Block-State Transformer (Fathi et al., arXiv 2306.09539) in PyTorch.

``import blockstate`` registers BlockStateConfig / BlockStateForCausalLM with the Hugging Face Auto classes.
"""

from blockstate.models import BlockStateConfig, BlockStateForCausalLM, BlockStateModel

__version__ = "0.1.0"
__all__ = ["BlockStateConfig", "BlockStateForCausalLM", "BlockStateModel", "__version__"]
