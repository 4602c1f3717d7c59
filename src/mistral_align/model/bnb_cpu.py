"""A guard for bitsandbytes 4-bit layers on CPUs with AVX512-BF16.

bitsandbytes 0.50 repacks a Linear4bit's weight into a CPU inference layout the first time the
layer runs in eval mode without gradients (an evaluation before training, a generation). The
repacking is permanent, and the repacked path (`gemv_4bit`) has no autograd kernel: training after
it silently drops the gradient through every frozen 4-bit weight. Evaluating before training is
part of every recipe here, so the repacking is switched off for each layer.
"""

from __future__ import annotations

import torch


def disable_cpu_inference_repacking(model: torch.nn.Module) -> int:
    """Turn the eval-time repacking off on every Linear4bit in `model`; returns how many layers."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # bitsandbytes is optional at run time when nothing is quantised
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count
