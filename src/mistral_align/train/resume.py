"""Resuming inside a stage: which checkpoint a launch starts from, and training from it.

    resume = resume_point(stage, data.fingerprint)     # the newest complete checkpoint (or none)
    result = train_from(resume, trainer, stage, stop)  # trainer.train(resume_from_checkpoint=...)

The choice is made on the main process and is the same on every rank. A resumed stage reports the
mean step loss over all its launches, as one that ran through would (the checkpoint marker keeps
the loss sum so far, train/checkpointing.py).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import broadcast_object_list

from mistral_align.errors import NonFiniteError, RunDirError, Stopped
from mistral_align.rundir.checkpoints import INCOMPLETE, checkpoint_problem, checkpoints, marker_facts, newest_complete
from mistral_align.train.signals import StopOnSignal, close_process_group

log = logging.getLogger("mistral_align")


@dataclass
class ResumePoint:
    checkpoint: str | None = None
    step: int = 0
    loss_sum: float = 0.0
    nonfinite_skipped: int = 0


def recorded_facts(run_dir: Path, section: str | None) -> dict:
    """What earlier launches of this stage recorded in manifest.json (its section of it), if anything."""
    try:
        manifest = json.loads((Path(run_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return (manifest.get(section) or {}) if section else manifest


def resume_point(stage, fingerprint: str | None = None) -> ResumePoint:
    """Where the stage starts (decided on the main process, the same on every rank): run.resume=auto
    the newest complete checkpoint of this stage; never: step 0 (its old checkpoints removed); a path:
    that checkpoint, which must be complete. A checkpoint trained on other data (the stage's data
    fingerprint in manifest.json differs) is refused unless run.allow_config_change."""
    run, mode = stage.run, stage.cfg.run.resume
    ckpt_dir = stage.out_dir / "checkpoints"
    chosen: list = [None]
    if run.state.is_main_process:
        try:
            shutil.rmtree(ckpt_dir / INCOMPLETE, ignore_errors=True)
            if mode == "never":
                for old in checkpoints(ckpt_dir):
                    shutil.rmtree(old, ignore_errors=True)
                ckpt = None
            elif mode == "auto":
                ckpt = newest_complete(ckpt_dir, remove_bad=True)
            else:
                ckpt = Path(mode).expanduser().absolute()
                problem = checkpoint_problem(ckpt)
                if problem:
                    raise RunDirError(f"run.resume: {ckpt} cannot be resumed from: {problem}")
            before = (recorded_facts(run.dir, stage.section).get("data") or {}).get("fingerprint")
            if ckpt is not None and fingerprint and before and before != fingerprint and not stage.cfg.run.allow_config_change:
                raise RunDirError(
                    f"{run.dir}: the {stage.name} data changed since this stage started (data fingerprint "
                    f"{before} -> {fingerprint}); use a new run.dir, or run.allow_config_change=true to continue anyway"
                )
            if ckpt is None:
                chosen = [{"checkpoint": None}]
            else:
                facts = marker_facts(ckpt)
                chosen = [{"checkpoint": str(ckpt), "step": facts["step"], "loss_sum": facts.get("loss_sum", 0.0),
                           "nonfinite_skipped": facts.get("nonfinite_skipped", 0)}]
                log.info("%s: resuming from %s (step %d)", stage.name.upper(), ckpt, facts["step"])
        except RunDirError as e:
            chosen = [{"error": str(e)}]
    if run.state.num_processes > 1:
        broadcast_object_list(chosen, from_process=0)
    if "error" in chosen[0]:
        raise RunDirError(chosen[0]["error"])
    return ResumePoint(**chosen[0])


def train_from(resume: ResumePoint, trainer, stage, stop: StopOnSignal):
    """trainer.train from `resume`, stopping cleanly on a signal (`stop`, installed by run_stage: raises
    Stopped after the checkpoint is saved). Returns the TrainOutput, its training_loss over the whole
    stage even when resumed."""
    from transformers.trainer_utils import TrainOutput

    trainer.add_callback(stop)
    trainer.nonfinite.resumed_loss_sum = resume.loss_sum
    trainer.nonfinite.skipped = resume.nonfinite_skipped
    try:
        result = trainer.train(resume_from_checkpoint=resume.checkpoint)
    except NonFiniteError:
        # The progress bar is left open mid-line; close it so the error starts a line of its own.
        for callback in trainer.callback_handler.callbacks:
            if getattr(callback, "training_bar", None) is not None:
                callback.training_bar.close()
        # Every rank raises it at the same step (train/nonfinite.py): close the process group
        # cleanly, as a clean stop does, so no rank aborts at exit.
        if stage.run.state.num_processes > 1:
            stage.run.state.destroy_process_group()
        raise
    if stop.stopped_at is not None:
        ckpt = stage.out_dir / "checkpoints" / f"checkpoint-{stop.stopped_at}"
        close_process_group(stage.run.state)
        raise Stopped(
            f"stopped by {stop.signal} at step {stop.stopped_at} of {trainer.state.max_steps}, checkpoint "
            f"saved in {ckpt}; to resume, run the same command with run.dir={stage.run.dir}"
        )
    skipped = trainer.nonfinite.skipped
    if (resume.checkpoint is not None or skipped) and result.global_step:
        # The stage's mean step loss: over its earlier launches too, and without skipped steps
        # (they added 0 to the sum; train/nonfinite.py).
        ran = result.global_step - resume.step
        counted = result.global_step - skipped
        loss = (resume.loss_sum + result.training_loss * ran) / counted if counted > 0 else float("nan")
        result = TrainOutput(result.global_step, loss, result.metrics)
    return result
