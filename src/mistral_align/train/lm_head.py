"""The LM head scores labelled positions only, on the CPU too: the one TRL internal we change,
changed only while our trainers run.

TRL 1.16's fused LM head (`trl.trainer.utils.add_fused_lm_head`, used by SFTTrainer and
DPOTrainer) projects hidden states through the LM head in tiles and, on Triton devices, only at
positions whose next-token label is not -100. Elsewhere it scores every position, to keep tile
shapes static for compilers. On the CPU that wastes most of a step: with a 32k vocabulary the head
dominates a small model, and prompt tokens are often half of a chat row. The loss and gradients are
the same either way (masked positions contribute 0; tests/test_sft_packing.py checks it).

The decision is the private `trl.trainer.utils._use_triton(device)`, and TRL offers no public
switch. Our trainers' `train()` / `evaluate()` / `predict()` (train/hooks.py) replace it for their
duration and put it back after, so nothing else in the process sees a changed TRL.
tests/test_trainer_mechanics.py is the canary that fails the day TRL renames or stops consulting
it; trl is pinned < 1.17 in pyproject.toml.
"""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def lm_head_scores_labelled_positions_only():
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton

    def compact(device):
        return device.type == "cpu" or original(device)

    trl_utils._use_triton = compact
    try:
        yield
    finally:
        trl_utils._use_triton = original
