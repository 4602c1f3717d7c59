"""Checkpoints complete or invisible, through the Trainer's public `on_save` hook.

The trainer's `output_dir` is `<stage>/checkpoints/.incomplete` (train/args.py), so transformers
writes `checkpoint-N` there. Once every rank has written its part, the main process writes the
marker (rundir/checkpoints.py) with what a resumed launch needs (the step, the loss sum so far, the
skipped non-finite steps), renames the folder to `<stage>/checkpoints/checkpoint-N` and keeps the
newest `save_total_limit` complete checkpoints. A launch killed mid-save leaves only an
`.incomplete` folder, which the next launch removes (train/resume.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback

from mistral_align.files import follow_umask
from mistral_align.rundir.checkpoints import INCOMPLETE, rotate, write_marker


def checkpoint_dirs(ckpt_dir: Path) -> tuple[Path, Path]:
    """(where the trainer writes a checkpoint, where a complete one is kept) for a stage's checkpoints/."""
    return Path(ckpt_dir) / INCOMPLETE, Path(ckpt_dir)


class AtomicCheckpoints(TrainerCallback):
    """After the trainer saved `checkpoint-N` aside: marker, rename into place, rotation (see above)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        trainer, policy = self.trainer, self.trainer.nonfinite
        aside = Path(args.output_dir)
        final = aside.parent
        name = f"checkpoint-{state.global_step}"
        # The stage's loss sum so far: the mean over ranks of what each reported, as the trainer logs it.
        mine = policy.loss_sum if policy.loss_sum is not None else torch.zeros((), device=args.device)
        loss_sum = policy.resumed_loss_sum + float(trainer.accelerator.gather(mine.reshape(1)).mean().item())
        trainer.accelerator.wait_for_everyone()  # every rank's files (rng_state_<rank>.pth) are written
        if args.should_save:
            follow_umask(aside / name)  # safetensors writes 0600, the trainer's other files follow the umask
            write_marker(aside / name, {"step": state.global_step, "loss_sum": loss_sum,
                                        "nonfinite_skipped": policy.skipped})
            shutil.rmtree(final / name, ignore_errors=True)
            os.replace(aside / name, final / name)
            rotate(final, args.save_total_limit)
        trainer.accelerator.wait_for_everyone()
        return control
