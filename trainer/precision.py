"""Mixed precision: the autocast context that forward passes run under, for ``train.amp`` and evaluate.

bf16 autocast keeps fp32 weights and optimizer state and needs no loss scaling. On CUDA it is the default
(``auto``). On a CPU it is opt-in (``bf16``) and only where the CPU multiplies bf16 natively (AVX512-BF16 or
AMX, as oneDNN reports): there a training step runs faster than in fp32, most with channels_last (figures:
bench/README.md); elsewhere bf16 is emulated and slower than fp32, so a ``bf16`` request on such a CPU runs
in fp32 with a warning.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import torch


def cpu_bf16_native() -> bool:
    """Whether this CPU multiplies bf16 natively (oneDNN's own check)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def autocast(device: torch.device, amp: str):
    """The context for ``amp`` (auto | bf16 | off) on ``device``: bf16 autocast or a no-op."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cpu_bf16_native():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    warnings.warn(f"amp={amp}: this {device.type} has no native bf16; running in fp32", stacklevel=2)
    return nullcontext()
