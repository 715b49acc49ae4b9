"""Model FLOPs of a step and the accelerator's peak, for model FLOPs utilisation (MFU) in ``bench train``.

FLOPs are counted by torch's ``FlopCounterMode`` over one real step (forward and backward): matmuls, attention
(SDPA counted as dense, masks ignored) and convolutions; FFTs and elementwise work are not model FLOPs by the usual
convention (PaLM's MFU), so the FFT convolutions of the SSMs count as nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets; the first name that occurs
# in the device name wins, so the more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0),
    ("H800", 989.0), ("H20", 148.0), ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 125.0), ("A10", 125.0), ("RTX 6000 Ada", 364.0),
    ("4090", 165.0), ("MI300X", 1307.0), ("MI250", 362.0),
)


def peak_bf16_flops(device: torch.device) -> tuple[float | None, str]:
    """(peak dense bf16 FLOP/s, the device's name) for a CUDA device; (None, name) when unknown or on CPU."""
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops * 1e12, name
    return None, name


def step_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call of ``step`` (forward + backward as the step runs them), counted op by op."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def mfu(flops: int | None, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak; None when either is unknown."""
    if not flops or not peak or seconds <= 0:
        return None
    return flops / seconds / peak
