import pytest
import torch

from blockstate.layers import KERNELS, VARIANTS
from blockstate.models import BlockStateConfig

VARIANT_KERNELS = [(v, k) for v in VARIANTS for k in KERNELS]

# Tests run many small ops on tiny models: one thread is as fast, and immune to OpenMP threads spinning against
# other processes on a shared machine (which slowed single tests here from about 1 s to 45 s).
torch.set_num_threads(1)


def small_config(variant: str = "sh", kernel: str = "s4d", **overrides) -> BlockStateConfig:
    """A model small enough for exhaustive tests: 3 layers (BST at 0 and 2), W=8, trained length 32."""
    base = dict(vocab_size=61, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, block_size=8,
                max_train_length=32, num_context_states=4, bst_layers=[0, 2], variant=variant, kernel=kernel)
    return BlockStateConfig(**{**base, **overrides})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
