"""Configs as data: the fields every model here shares, the SSM kernel settings, and BlockStateConfig.

- ``BlockLMConfig``: what every model (BST and the baselines) reads: the token embedding, the stack of pre-norm
  block-attention + FFN layers (width, depth, heads, FFN, block size W, RoPE, dropouts) and the training length.
- ``SSMKernelConfig``: adds the settings of the SSM kernels (``kernel_from_config``, the DSS kernel): BST and GSS.
- ``BlockStateConfig``: adds what only BST reads: the variant, the kernel family, the BST layers, S, ``ssm_residual``.

Each config class validates its own fields (``validate_fields``, called once every field is set). The
baselines' configs (``configuration_baselines``) extend the first two.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

from blockstate.layers.bst import VARIANTS
from blockstate.layers.gss import GSS_KERNELS
from blockstate.layers.ssm import KERNELS

POSITION_ENCODINGS = ("rope", "none")
PREVIOUS_BLOCK = ("window", "full")
S4D_INITS = ("lin", "inv")
SSM_RESIDUALS = ("none", "gated", "ffn")
SSM_RESIDUAL_LAYERS = ("bst", "all")
PLAIN_LAYERS = ("block", "gss")
LAYER_COLLECTIONS = (list, tuple, range, set, frozenset)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    """A finite int or float (not a bool, a string or None)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def default_bst_layers(num_layers: int) -> list[int]:
    """The first layer (the SSM right after the embedding supplies position) and two in the upper half:
    layers 0, 6 and 8 of 12, the paper's layout as best recalled (spec section 6)."""
    return sorted({0, num_layers // 2, (2 * num_layers) // 3} & set(range(num_layers)))


class BlockLMConfig(PretrainedConfig):
    """The fields every model here shares (the config of no registered model by itself).

    Args:
        vocab_size: number of token ids.
        hidden_size: model width D.
        num_hidden_layers: number of layers.
        num_attention_heads: heads H (hidden_size must divide by it).
        intermediate_size: FFN width (default 4 * hidden_size).
        block_size: block (window) length W.
        max_train_length: training segment length L (the implicit filter measures time in units of it; the
            Transformer-XL preset's window is L/2).
        attend_previous_block: block self-attention also sees the previous block (W x 2W tile).
        previous_block: with attend_previous_block, ``"window"``: each token sees the previous W tokens (sliding
            window); ``"full"``: every token sees the whole previous block (Transformer-XL memory).
        position_encoding: ``"rope"`` inside blocks, or ``"none"``.
        hidden_dropout / attention_dropout: residual-branch and attention-probability dropout.
    """

    def __init__(
        self,
        vocab_size: int = 257,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: int | None = None,
        block_size: int = 64,
        max_train_length: int = 512,
        attend_previous_block: bool = False,
        previous_block: str = "window",
        position_encoding: str = "rope",
        rope_theta: float = 10000.0,
        hidden_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        if intermediate_size is None and _is_int(hidden_size):
            intermediate_size = 4 * hidden_size  # else validate_fields names hidden_size
        self.intermediate_size = intermediate_size
        self.block_size = block_size
        self.max_train_length = max_train_length
        self.attend_previous_block = attend_previous_block
        self.previous_block = previous_block
        self.position_encoding = position_encoding
        self.rope_theta = rope_theta
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.tie_word_embeddings = tie_word_embeddings
        self.validate_fields()  # the subclass's too: its own fields are set before it calls this __init__
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def positive(self, *names: str) -> None:
        """ValueError naming the first of ``names`` that is not a positive integer."""
        for name in names:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def choose(self, choices: dict[str, tuple]) -> None:
        """ValueError naming the first field whose value is not one of its allowed values."""
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")

    def validate_fields(self) -> None:
        """Raise ValueError naming the field, its value and what is allowed."""
        self.positive("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                      "block_size", "max_train_length")
        self.choose({"position_encoding": POSITION_ENCODINGS, "previous_block": PREVIOUS_BLOCK})
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); pick e.g. num_attention_heads="
                f"{max(h for h in range(1, self.num_attention_heads + 1) if self.hidden_size % h == 0)}"
            )
        if self.position_encoding == "rope" and (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(
                f"hidden_size / num_attention_heads = {self.hidden_size // self.num_attention_heads} must be even "
                "for position_encoding='rope'; change the sizes or set position_encoding='none'"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if not _is_real(value) or not value > 0:
                raise ValueError(f"{name} must be a finite positive number, got {value!r}")
        if not _is_real(self.initializer_range) or self.initializer_range < 0:
            raise ValueError(f"initializer_range must be a finite number >= 0, got {self.initializer_range!r}")
        for name in ("attend_previous_block", "tie_word_embeddings"):
            if not isinstance(getattr(self, name, False), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")


class SSMKernelConfig(BlockLMConfig):
    """``BlockLMConfig`` plus the settings of the SSM kernels (``blockstate.layers.ssm.kernel_from_config``).

    Args (beyond ``BlockLMConfig``):
        ssm_state_size: N, real states per S4D filter (N/2 conjugate-pair modes).
        s4d_init: ``"lin"`` or ``"inv"`` (S4D's initialisations of A; the DSS kernel's too).
        ssm_dt_min / ssm_dt_max: range of the initial step sizes dt (log-uniform).
        filter_hidden_size / filter_num_bands: the implicit (unstructured) filter's MLP width and frequencies.
        gss_hidden_size / gss_narrow_size / gss_kernel / gss_state_size: the gated state space layer's widths and
            kernel (``blockstate.layers.gss``), read by GSS-Hybrid and by BST with ``plain_layers="gss"``:
            the wide branch F (default 4 * hidden_size), the narrow branch H that runs the SSM (default
            hidden_size // 4), its kernel (``"dss"``, the GSS paper's DSS-EXP, or ``"s4d"`` / ``"unstructured"``
            / ``"explicit"``) and the DSS kernel's complex modes N shared by the narrow channels (default 512).
    """

    def __init__(self, ssm_state_size: int = 16, s4d_init: str = "lin", ssm_dt_min: float = 1e-3,
                 ssm_dt_max: float = 1e-1, filter_hidden_size: int = 64, filter_num_bands: int = 16,
                 gss_hidden_size: int | None = None, gss_narrow_size: int | None = None, gss_kernel: str = "dss",
                 gss_state_size: int = 512, **kwargs):
        # None: GSS-Hybrid's config fills in its defaults; a BST config keeps None (the layer then uses them), so
        # a BST checkpoint's config differs from another only where the user set something
        self.gss_hidden_size, self.gss_narrow_size = gss_hidden_size, gss_narrow_size
        self.gss_kernel, self.gss_state_size = gss_kernel, gss_state_size
        self.ssm_state_size = ssm_state_size
        self.s4d_init = s4d_init
        self.ssm_dt_min = ssm_dt_min
        self.ssm_dt_max = ssm_dt_max
        self.filter_hidden_size = filter_hidden_size
        self.filter_num_bands = filter_num_bands
        super().__init__(**kwargs)

    def validate_fields(self) -> None:
        super().validate_fields()
        self.positive("ssm_state_size", "filter_hidden_size", "filter_num_bands")
        self.choose({"s4d_init": S4D_INITS})
        if self.gss_kernel not in GSS_KERNELS:
            raise ValueError(f"gss_kernel must be one of {list(GSS_KERNELS)}, got {self.gss_kernel!r}")
        for name in ("gss_hidden_size", "gss_narrow_size", "gss_state_size"):
            value = getattr(self, name)
            if value is None and name != "gss_state_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.ssm_state_size % 2:
            raise ValueError(f"ssm_state_size must be even (N/2 conjugate-pair modes), got {self.ssm_state_size}")
        for name in ("ssm_dt_min", "ssm_dt_max"):
            value = getattr(self, name)
            if not _is_real(value) or not value > 0:
                raise ValueError(f"{name} must be a finite positive number, got {value!r}")
        if not 0 < self.ssm_dt_min <= self.ssm_dt_max:
            raise ValueError(f"ssm_dt_min/ssm_dt_max must satisfy 0 < min <= max, got "
                             f"{self.ssm_dt_min}, {self.ssm_dt_max}")


class BlockStateConfig(SSMKernelConfig):
    """Configuration of a Block-State Transformer language model: every architectural choice is config data.

    Args (beyond ``SSMKernelConfig`` and ``BlockLMConfig``: width, depth, heads, FFN, W, L, the previous block,
    RoPE, dropouts; N, the S4D initialisation and dt range, the implicit filter):
        variant: how context states are formed: ``"sh"`` single-head, ``"mh"`` multi-head, ``"mf"`` multi-filter.
        kernel: SSM kernel family: ``"s4d"`` (structured), ``"unstructured"`` (implicit filter), ``"explicit"``.
        bst_layers: indices of the BST layers; the others are plain Block Transformer layers (default: the first
            and two in the upper half, ``default_bst_layers``).
        num_context_states: S, filters (and context states per block) of the MF variant.
        ssm_residual: ``"none"`` (the paper: the SSM output only feeds the context states); beyond the paper,
            ``"gated"``: each BST layer also adds W_o(GELU(W_g u) * y) to the residual stream, y the SSM output
            averaged over its filters, as gated state-space layers do; ``"ffn"``: each BST layer's FFN becomes a
            GLU whose gate is the SSM output (see ``blockstate.layers.bst``).
        ssm_residual_layers: with ``ssm_residual``, ``"bst"``: only the BST layers; ``"all"``: the other layers
            too, each with an SSM of its own that feeds only the stream (no context states; beyond the paper).
        plain_layers: the layers that are not BST layers: ``"block"``, Block Transformer layers (the paper);
            ``"gss"``, gated state space layers (``gss_*`` fields; beyond the paper: GSS-Hybrid's stack with its
            attention layers made BST layers).
    """

    model_type = "blockstate"

    def __init__(self, variant: str = "sh", kernel: str = "s4d", bst_layers: list[int] | None = None,
                 num_context_states: int = 32, ssm_residual: str = "none", ssm_residual_layers: str = "bst",
                 plain_layers: str = "block", **kwargs):
        self.variant = variant
        self.kernel = kernel
        if bst_layers is None:  # a bad num_hidden_layers is reported by validate_fields
            layers = kwargs.get("num_hidden_layers", 4)
            bst_layers = default_bst_layers(layers) if _is_int(layers) else []
        # any collection of indices (a JSON list, a tuple, a range); anything else is reported by validate_fields
        self.bst_layers = list(bst_layers) if isinstance(bst_layers, LAYER_COLLECTIONS) else bst_layers
        self.num_context_states = num_context_states
        self.ssm_residual = ssm_residual
        self.ssm_residual_layers = ssm_residual_layers
        self.plain_layers = plain_layers
        super().__init__(**kwargs)

    def validate_fields(self) -> None:
        super().validate_fields()
        self.positive("num_context_states")
        self.choose({"variant": VARIANTS, "kernel": KERNELS, "ssm_residual": SSM_RESIDUALS,
                     "ssm_residual_layers": SSM_RESIDUAL_LAYERS, "plain_layers": PLAIN_LAYERS})
        if self.ssm_residual_layers == "all" and self.plain_layers == "gss":
            raise ValueError('ssm_residual_layers="all" gives Block Transformer layers an SSM; with '
                             'plain_layers="gss" the plain layers already are SSM layers: use one of the two')
        if self.ssm_residual_layers == "all" and self.ssm_residual == "none":
            raise ValueError('ssm_residual_layers="all" needs ssm_residual "gated" or "ffn" (the branch by which '
                             "each layer's SSM reaches the stream)")
        if not isinstance(self.bst_layers, list):
            raise ValueError(f"bst_layers must be a list of layer indices, got {self.bst_layers!r}")
        bad = [i for i in self.bst_layers if isinstance(i, bool) or not isinstance(i, int)
               or not 0 <= i < self.num_hidden_layers]
        if bad or len(set(self.bst_layers)) != len(self.bst_layers):
            raise ValueError(
                f"bst_layers must be distinct layer indices in [0, {self.num_hidden_layers - 1}] "
                f"(num_hidden_layers={self.num_hidden_layers}), got {self.bst_layers}"
            )
        self.bst_layers = sorted(self.bst_layers)
