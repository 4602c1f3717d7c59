"""Trainable weights stay float32 where the 4-bit layers compute in float32.

TRL 1.16's trainers cast a quantised model's trainable parameters (the LoRA adapter, and any
`modules_to_save`) to bfloat16 when they are built. That is right on GPUs, where 4-bit layers
compute in bfloat16. Where they compute in float32 (the CPU presets, `quant.compute_dtype=float32`)
the cast only rounds the adapter and makes every step slower. Both trainers' constructors
(`keep_float32=True`, train/hooks.py) record the exact float32 values before TRL builds the trainer
and put them back after, so a new adapter starts from its exact initialisation and a loaded SFT
adapter from its exact trained values.
"""

from __future__ import annotations

import torch


def trainable_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Exact float32 copies of the trainable parameters, by name."""
    return {n: p.detach().to(torch.float32).clone() for n, p in model.named_parameters() if p.requires_grad}


def restore_trainable(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> int:
    """Put the snapshot's values (and dtype) back; returns how many parameters were restored."""
    restored = 0
    for name, param in model.named_parameters():
        if name in snapshot:
            param.data = snapshot[name].to(param.device)
            restored += 1
    return restored
