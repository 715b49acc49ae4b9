"""blockstate: the Block-State Transformer (Fathi et al., arXiv 2306.09539) in PyTorch.

``import blockstate`` registers every model with the Hugging Face Auto classes (and the tokenizers with
``AutoTokenizer``). One registry builds any model,
BST variants and the paper's baselines alike: ``blockstate.create_model("bst-sh-s4", size="tiny")``.
"""

import blockstate.quiet_interrupts  # noqa: F401 I001 - first (no torch): Ctrl-C while torch loads is one line
from blockstate.models import BlockStateConfig, BlockStateForCausalLM, BlockStateModel
from blockstate.registry import carries_state, create_model, list_models, model_config

from blockstate.data.hf_tokenizers import register as _register_tokenizers  # isort: skip

_register_tokenizers()  # AutoTokenizer finds the bytes and SentencePiece tokenizers of saved runs

__version__ = "0.1.0"
__all__ = [
    "BlockStateConfig",
    "BlockStateForCausalLM",
    "BlockStateModel",
    "__version__",
    "carries_state",
    "create_model",
    "list_models",
    "model_config",
]
