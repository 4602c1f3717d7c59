"""Clean stops: SIGTERM, SIGUSR1 and a first Ctrl-C make every rank stop at the same place.

During training every rank saves a checkpoint at the next step boundary and the stage ends with
Stopped (exit code 3, train/resume.py); before training (data, model, evaluation before) it stops
at the next point every rank passes (`stop_here`), also with exit code 3; a second Ctrl-C stops at
once. Installed for a whole stage by run_stage (train/stage.py).
"""

from __future__ import annotations

import logging
import signal

from transformers import TrainerCallback

from mistral_align.errors import Stopped
from mistral_align.rundir.checkpoints import checkpoint_problem, checkpoints

log = logging.getLogger("mistral_align")

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


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
        close_process_group(state)
        saved = f"newest checkpoint {ckpt}" if ckpt else "no checkpoint yet"
        raise Stopped(f"stopped by {self.signal} {where}; {saved}; to continue, run the same command with "
                      f"run.dir={stage.run.dir}")


def close_process_group(state) -> None:
    # Every rank stops at the same point; closing the group keeps a rank from aborting at exit.
    state.wait_for_everyone()
    if state.num_processes > 1:
        state.destroy_process_group()
