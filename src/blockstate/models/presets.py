"""Named model sizes: the fields every registered model (BST and baselines) starts from at each size.

- ``tiny``:  trains usefully in minutes on 2 CPU cores (bytes vocabulary).
- ``small``: ~20M parameters (an 8k BPE vocabulary).
- ``paper``: the paper's ~200M setting: 12 layers, D=1024, 8 heads, W=512, L=4096, S=32, N=16, 32k vocabulary.

Names, parameter counts and the paper's figures are ``blockstate.registry``'s (``blockstate models``); this
module is data only, so the model tier does not import the registry that imports it.
"""

from __future__ import annotations

from typing import Any

from blockstate.models.configuration_blockstate import BlockStateConfig

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=257, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=1024, block_size=64, max_train_length=512, num_context_states=16),
    "small": dict(vocab_size=8192, hidden_size=384, num_hidden_layers=8, num_attention_heads=6,
                  intermediate_size=1536, block_size=128, max_train_length=2048, num_context_states=32),
    "paper": dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=12, num_attention_heads=8,
                  intermediate_size=4096, block_size=512, max_train_length=4096, num_context_states=32,
                  ssm_state_size=16, hidden_dropout=0.05),
}


def size_fields(size: str) -> dict[str, Any]:
    """A copy of the fields of a named size; ValueError naming the sizes for an unknown one."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    return dict(SIZES[size])


def preset_config(size: str = "tiny", variant: str = "sh", kernel: str = "s4d", **overrides: Any) -> BlockStateConfig:
    """The BST config of a named size for a variant and kernel; keyword overrides win over the preset."""
    return BlockStateConfig(**{**size_fields(size), "variant": variant, "kernel": kernel, **overrides})
