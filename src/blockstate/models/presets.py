"""Named model sizes, for every variant x kernel, and their parameter counts.

- ``tiny``:  trains usefully in minutes on 2 CPU cores (bytes vocabulary).
- ``small``: ~20M parameters (an 8k BPE vocabulary).
- ``paper``: the paper's ~200M setting: 12 layers, D=1024, 8 heads, W=512, L=4096, S=32, N=16, 32k vocabulary.

Counting builds the model on the meta device, so even ``paper`` costs no memory.
"""

from __future__ import annotations

from typing import Any

import torch

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

# The paper's reported sizes (Table 1), for the variant x kernel pairs it trained at ~200M.
PAPER_PARAMETERS = {("sh", "s4d"): 202e6, ("mh", "s4d"): 218e6, ("mf", "s4d"): 217e6,
                    ("sh", "unstructured"): 206e6, ("mf", "unstructured"): 221e6}


def preset_config(size: str = "tiny", variant: str = "sh", kernel: str = "s4d", **overrides: Any) -> BlockStateConfig:
    """The config of a named size for a variant and kernel; keyword overrides win over the preset."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    return BlockStateConfig(**{**SIZES[size], "variant": variant, "kernel": kernel, **overrides})


def count_parameters(config: BlockStateConfig) -> int:
    """Number of distinct parameters (tied embeddings counted once), without allocating them."""
    from blockstate.models.modeling_blockstate import BlockStateForCausalLM

    with torch.device("meta"):
        model = BlockStateForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def parameter_table(sizes: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per size x variant x kernel: parameter count, and the paper's figure where it reported one."""
    from blockstate.layers import KERNELS, VARIANTS

    rows = []
    for size in sizes or list(SIZES):
        for variant in VARIANTS:
            for kernel in KERNELS:
                n = count_parameters(preset_config(size, variant, kernel))
                paper = PAPER_PARAMETERS.get((variant, kernel)) if size == "paper" else None
                rows.append(dict(size=size, variant=variant, kernel=kernel, parameters=n, paper=paper,
                                 ratio=None if paper is None else n / paper))
    return rows
