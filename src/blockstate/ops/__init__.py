"""Pure functions: each fast path with a readable reference beside it (the test oracle)."""

from blockstate.ops.dss import dss_as_s4d, dss_init, dss_kernel, dss_kernel_reference
from blockstate.ops.fftconv import causal_conv_reference, fft_causal_conv, fft_causal_conv_tokens, fft_size
from blockstate.ops.implicit import decay_rates, exponential_decay, positional_features, squash_smooth
from blockstate.ops.s4d import (
    s4d_discretize,
    s4d_final_state,
    s4d_init,
    s4d_kernel,
    s4d_kernel_reference,
    s4d_state_response,
    s4d_step,
    s4d_update_,
    s4d_vandermonde,
)
from blockstate.ops.s4d_chunked import s4d_block_ends, s4d_chunk_size, s4d_chunked_bank, s4d_chunked_conv

__all__ = [
    "causal_conv_reference",
    "decay_rates",
    "dss_as_s4d",
    "dss_init",
    "dss_kernel",
    "dss_kernel_reference",
    "exponential_decay",
    "fft_causal_conv",
    "fft_causal_conv_tokens",
    "fft_size",
    "positional_features",
    "s4d_block_ends",
    "s4d_chunk_size",
    "s4d_chunked_bank",
    "s4d_chunked_conv",
    "s4d_discretize",
    "s4d_final_state",
    "s4d_init",
    "s4d_kernel",
    "s4d_kernel_reference",
    "s4d_state_response",
    "s4d_step",
    "s4d_update_",
    "s4d_vandermonde",
    "squash_smooth",
]
