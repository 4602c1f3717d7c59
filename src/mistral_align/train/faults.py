"""Runs that survive being killed: a lock on the run directory, a refusal to continue a run with
settings that change training, checkpoints that are complete or invisible, resuming inside a stage,
and clean stops on SIGTERM / SIGUSR1 / Ctrl-C.

    lock_run_dir(run_dir, state)                 # open_run: one launch per run directory
    check_same_training(run_dir, cfg, ...)       # open_run: a changed config is refused, keys named
    resume = resume_point(stage)                 # run_stage: the newest complete checkpoint (or none)
    result = train(trainer, resume, stage, stop) # trainer.train(resume_from_checkpoint=...), clean stops

Checkpoints (`AtomicCheckpoints`, mixed into both trainers): every rank writes a checkpoint into
`checkpoints/.incomplete/checkpoint-N`; after a barrier the main process writes `COMPLETE.json`
there (the size and sha256 of every file) and renames the folder to `checkpoints/checkpoint-N`.
A checkpoint without that marker, or whose files differ from it, is reported and skipped, never
loaded. `save_total_limit` counts complete checkpoints only.

Clean stops: SIGTERM, SIGUSR1 and a first Ctrl-C make every rank save a checkpoint at the next
step boundary and exit with EXIT_STOPPED (3); before training (data, model, evaluation before) they
stop at the next point every rank passes, also with exit code 3; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import platform
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from mistral_align.errors import NonFiniteError, RunDirError, Stopped

log = logging.getLogger("mistral_align")

MARKER = "COMPLETE.json"
INCOMPLETE = ".incomplete"
LOCK = "run.lock"
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


# -- one launch per run directory ------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


def acquire_lock(run_dir: Path) -> Path:
    """Create <run_dir>/run.lock holding this process's pid and host; a lock left by a dead process on
    this host is taken over; a live one (or one from another host) is refused with RunDirError."""
    path = Path(run_dir) / LOCK
    me = {"pid": os.getpid(), "host": platform.node()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            pid, host = holder.get("pid"), holder.get("host")
            if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
                log.warning("run directory %s: taking over the lock of a dead launch (pid %d on %s)", run_dir, pid, host)
                path.unlink(missing_ok=True)
                continue
            if pid == me["pid"] and host == me["host"]:
                return path
            raise RunDirError(
                f"{run_dir} is in use by another launch (pid {pid} on host {host}, see {path}); wait for it "
                "to finish, use another run.dir, or delete the lock file if that process is gone"
            )
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise RunDirError(f"{run_dir}: could not take the lock {path}")


def release_lock(run_dir: Path) -> None:
    path = Path(run_dir) / LOCK
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if holder.get("pid") == os.getpid() and holder.get("host") == platform.node():
        path.unlink(missing_ok=True)


# -- a run directory continues only the training it started ----------------------------------------

# Keys that do not change what is trained: where things go, what is logged, how often it is saved,
# what is evaluated. Everything else (model, quant, peft, run.seed, each stage's data, train and
# objective) must match the run directory's config.yaml.
_RUN_KEYS_THAT_MATTER = ("run.seed",)
# on_nonfinite only acts on a NaN step: switching a run stopped by one to skip must resume it. Kernels
# and batch layouts change how a step is computed, not the loss (tested equal to the padded path).
_TRAIN_KEYS_THAT_DO_NOT = ("logging_steps", "eval_steps", "save_steps", "save_total_limit",
                           "per_device_eval_batch_size", "dataloader_num_workers", "on_nonfinite",
                           "use_liger_kernel", "torch_compile")  # fmt: skip
_STAGE_KEYS_THAT_DO_NOT = ("padding_free", "shared_prompt")


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: obj}


def _ignored(key: str, cfg: Any, recipe: str) -> bool:
    from mistral_align.config import STAGES

    if key.startswith("run."):
        return key not in _RUN_KEYS_THAT_MATTER
    parts = key.split(".")
    if parts[0] in STAGES:
        stage = parts[0]
        if len(parts) > 1 and parts[1] == "eval":
            return True
        if len(parts) > 2 and parts[1] == "train" and parts[2] in _TRAIN_KEYS_THAT_DO_NOT:
            return True
        if len(parts) == 2 and parts[1] in _STAGE_KEYS_THAT_DO_NOT:
            return True
        # Synthetic data is regenerated from the synthetic.* settings (compared) into the run directory.
        if len(parts) > 2 and parts[1] == "data" and parts[2] in ("train", "eval"):
            if cfg[stage].synthetic.enabled:
                return True
        if recipe == "sft_dpo" and key == "dpo.init_from":  # the pipeline's own sft/adapter
            return True
    return False


def training_differences(stored: dict, new: dict, cfg: Any, recipe: str) -> list[str]:
    """Dotted keys whose values differ between two resolved configs, in what changes training."""
    a, b = _flatten(stored), _flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>") and not _ignored(k, cfg, recipe))


def check_same_training(run_dir: Path, cfg: Any, stages: tuple[str, ...], recipe: str) -> None:
    """Refuse (RunDirError) a run directory whose config.yaml trained with different settings."""
    from omegaconf import OmegaConf

    from mistral_align.config import STAGES
    from mistral_align.train.run_dir import redact

    path = Path(run_dir) / "config.yaml"
    if not path.is_file() or cfg.run.allow_config_change:
        return
    stored = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    new = redact(OmegaConf.to_container(cfg, resolve=True))
    for stage in STAGES:
        if stage not in stages:
            new.pop(stage, None)
    diff = training_differences(stored, new, cfg, recipe)
    if diff:
        a, b = _flatten(stored), _flatten(new)
        shown = "; ".join(f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in diff[:8])
        more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
        raise RunDirError(
            f"{run_dir} was trained with a different config ({shown}{more}); use a new run.dir, or "
            "run.allow_config_change=true to continue it anyway"
        )


def open_checks(run_dir: Path, cfg: Any, stages: tuple[str, ...], recipe: str, state) -> None:
    """Main process: take the lock and compare configs; every rank raises the same RunDirError."""
    import atexit

    message = [None]
    if state.is_main_process:
        try:
            acquire_lock(run_dir)
            atexit.register(release_lock, run_dir)
            check_same_training(run_dir, cfg, stages, recipe)
        except RunDirError as e:
            if not str(e).startswith(f"{run_dir} is in use"):
                release_lock(run_dir)
            message = [str(e)]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(message, from_process=0)
    if message[0]:
        raise RunDirError(message[0])


# -- checkpoints that are complete or invisible ----------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_marker(ckpt: Path, extra: dict | None = None) -> None:
    files = {}
    for p in sorted(Path(ckpt).rglob("*")):
        if p.is_file() and p.name != MARKER:
            files[str(p.relative_to(ckpt))] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    tmp = Path(ckpt) / (MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files, **(extra or {})}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, Path(ckpt) / MARKER)


def checkpoint_problem(ckpt: Path, hashes: bool = True) -> str | None:
    """Why `ckpt` cannot be loaded (no marker, a file missing, truncated or changed), or None."""
    marker = Path(ckpt) / MARKER
    try:
        listed = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return f"no valid {MARKER} (written partly, or by an older version)"
    for rel, facts in listed.items():
        p = Path(ckpt) / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != facts["size"]:
            return f"{rel} has {p.stat().st_size} bytes, {facts['size']} were written"
        if hashes and _sha256(p) != facts["sha256"]:
            return f"{rel} differs from what was written (sha256)"
    return None


def marker_facts(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / MARKER).read_text())


def _step(p: Path) -> int:
    try:
        return int(p.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """checkpoint-N folders, newest (highest N) first."""
    d = Path(ckpt_dir)
    found = [p for p in d.glob("checkpoint-*") if p.is_dir() and _step(p) >= 0] if d.is_dir() else []
    return sorted(found, key=_step, reverse=True)


def newest_complete(ckpt_dir: Path, remove_bad: bool = False) -> Path | None:
    """The newest checkpoint whose files match its marker; each newer broken one is reported
    (a warning naming it and why) and skipped, and removed with `remove_bad`."""
    for ckpt in checkpoints(ckpt_dir):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        log.warning("skipping checkpoint %s: %s%s", ckpt, problem, " (removed)" if remove_bad else "")
        if remove_bad:
            shutil.rmtree(ckpt, ignore_errors=True)
    return None


def rotate(ckpt_dir: Path, limit: int | None) -> None:
    """Keep the newest `limit` complete checkpoints; folders without a marker are removed too."""
    kept = 0
    for ckpt in checkpoints(ckpt_dir):
        complete = (ckpt / MARKER).is_file()
        if complete and (limit is None or kept < limit):
            kept += 1
            continue
        shutil.rmtree(ckpt, ignore_errors=True)


class AtomicCheckpoints:
    """Trainer mixin: checkpoints are written aside and renamed into place with a marker (see above).
    The marker also keeps the sum of the per-step train losses so far, so that a resumed stage
    reports the same train loss as one that ran through, and the count of skipped non-finite steps
    (train/nonfinite.py)."""

    resumed_loss_sum: float = 0.0

    def _save_checkpoint(self, model, trial):
        args = self.args
        final_dir = Path(args.output_dir)
        aside = final_dir / INCOMPLETE
        name = f"checkpoint-{self.state.global_step}"
        if args.should_save:
            shutil.rmtree(aside / name, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        tr = self._tr_loss.detach()
        if self.args.world_size > 1:  # the mean over ranks, as the trainer logs it
            from transformers.trainer_pt_utils import nested_gather

            tr = nested_gather(tr, self.args.parallel_mode).mean()
        loss_sum = self.resumed_loss_sum + self._total_loss_scalar + float(tr.item())
        object.__setattr__(args, "output_dir", str(aside))
        try:
            super()._save_checkpoint(model, trial)
        finally:
            object.__setattr__(args, "output_dir", str(final_dir))
        self.accelerator.wait_for_everyone()  # every rank's files (rng_state_<rank>.pth) are written
        if args.should_save:
            from mistral_align.model.files import follow_umask

            follow_umask(aside / name)  # safetensors writes 0600, the trainer's other files follow the umask
            skipped = self.nonfinite.skipped if hasattr(self, "nonfinite") else 0
            write_marker(aside / name, {"step": self.state.global_step, "loss_sum": loss_sum, "nonfinite_skipped": skipped})
            shutil.rmtree(final_dir / name, ignore_errors=True)
            os.replace(aside / name, final_dir / name)
            rotate(final_dir, args.save_total_limit)
        self.accelerator.wait_for_everyone()


# -- resuming inside a stage -----------------------------------------------------------------------


@dataclass
class ResumePoint:
    checkpoint: str | None = None
    step: int = 0
    loss_sum: float = 0.0
    nonfinite_skipped: int = 0


def recorded_fingerprint(run_dir: Path, section: str | None) -> str | None:
    """The data fingerprint an earlier launch of this stage recorded in manifest.json, if any."""
    try:
        manifest = json.loads((Path(run_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    facts = manifest.get(section, {}) if section else manifest
    return (facts.get("data") or {}).get("fingerprint")


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
            before = recorded_fingerprint(run.dir, stage.section)
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
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(chosen, from_process=0)
    if "error" in chosen[0]:
        raise RunDirError(chosen[0]["error"])
    return ResumePoint(**chosen[0])


# -- clean stops -------------------------------------------------------------------------------------


class StopOnSignal(TrainerCallback):
    """SIGTERM / SIGUSR1 / a first Ctrl-C: stop cleanly on every rank. Installed for the whole stage
    (run_stage): during training, save at the next step boundary, then stop; before training (data,
    model, evaluation before), stop at the next point every rank passes (`stop_here`). The ranks
    agree each time (a one-integer all-reduce) so all stop at the same place."""

    def __init__(self):
        self.signal: str | None = None
        self.stopped_at: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        for name in STOP_SIGNALS:
            self._previous[name] = signal.signal(getattr(signal, name), self._handle)

    def uninstall(self) -> None:
        for name, handler in self._previous.items():
            signal.signal(getattr(signal, name), handler)
        self._previous = {}

    def _handle(self, signum, frame):
        # Only a flag is set here: the handler may run in the middle of anything (a collective, a
        # file write), so the stop itself happens where every rank can stop together.
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.signal is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        if self.signal is None:
            self.signal = name
            log.warning("%s received: stopping cleanly at the next step boundary (saving a checkpoint) or, "
                        "before training, at the next safe point%s", name,
                        " (Ctrl-C again to stop at once)" if name == "SIGINT" else "")

    def agreed(self, device) -> bool:
        """Whether any rank has been signalled. Collective: call it on every rank at the same point."""
        import torch
        import torch.distributed as dist

        flag = self.signal is not None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        if flag:
            self.signal = self.signal or "a signal on another rank"
        return flag

    def on_step_end(self, args, state, control, **kwargs):
        if self.agreed(args.device) and state.global_step < state.max_steps:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def stop_here(self, stage, where: str) -> None:
        """Outside trainer.train, at a point every rank reaches: raise Stopped if any rank was signalled,
        naming the newest complete checkpoint of the stage (nothing new is saved here)."""
        state = stage.run.state
        if not self.agreed(state.device):
            return
        # Sizes only, not hashes: a signal comes with a deadline, and a checkpoint can be large.
        ckpt = next((c for c in checkpoints(stage.out_dir / "checkpoints") if checkpoint_problem(c, hashes=False) is None),
                    None) if state.is_main_process else None
        _close_process_group(state)
        saved = f"newest checkpoint {ckpt}" if ckpt else "no checkpoint yet"
        raise Stopped(f"stopped by {self.signal} {where}; {saved}; to continue, run the same command with "
                      f"run.dir={stage.run.dir}")


def _close_process_group(state) -> None:
    # Every rank stops at the same point; closing the group keeps a rank from aborting at exit.
    state.wait_for_everyone()
    if state.num_processes > 1:
        state.destroy_process_group()


def train(trainer, resume: ResumePoint, stage, stop: StopOnSignal):
    """trainer.train from `resume`, stopping cleanly on a signal (`stop`, installed by run_stage: raises
    Stopped after the checkpoint is saved). Returns the TrainOutput, its training_loss over the whole
    stage even when resumed."""
    from transformers.trainer_utils import TrainOutput

    trainer.add_callback(stop)
    trainer.resumed_loss_sum = resume.loss_sum
    if hasattr(trainer, "nonfinite"):
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
        _close_process_group(stage.run.state)
        raise Stopped(
            f"stopped by {stop.signal} at step {stop.stopped_at} of {trainer.state.max_steps}, checkpoint "
            f"saved in {ckpt}; to resume, run the same command with run.dir={stage.run.dir}"
        )
    skipped = trainer.nonfinite.skipped if hasattr(trainer, "nonfinite") else 0
    if (resume.checkpoint is not None or skipped) and result.global_step:
        # The stage's mean step loss: over its earlier launches too, and without skipped steps
        # (they added 0 to the sum; train/nonfinite.py).
        ran = result.global_step - resume.step
        counted = result.global_step - skipped
        loss = (resume.loss_sum + result.training_loss * ran) / counted if counted > 0 else float("nan")
        result = TrainOutput(result.global_step, loss, result.metrics)
    return result
