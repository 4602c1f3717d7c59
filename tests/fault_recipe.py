"""Faults injected at a known point of a real run, instead of a test racing a signal against a step.

    python tests/fault_recipe.py RECIPE [overrides]          a subprocess (SIGKILL, several ranks)
    with_faults(monkeypatch); run_recipe_script(RECIPE, ...)        this process (runfixtures.run_recipe_script)

Both read what to inject from the environment (monkeypatch.setenv in process):

NaN: NAN_STAGE (sft, dpo or both as "sft,dpo"; default sft), NAN_AT (0-based training micro-batches
of each such stage, counted per stage, e.g. "4" or "2,3"), NAN_RANK (only that rank; default every
rank), NAN_DUMP (a file the input_ids of each poisoned forward are appended to as a JSON line). A
forward hook on the model's final norm layer (a real layer, outside the gradient-checkpointed
decoder layers, so it runs once per forward) multiplies its output by NaN on those training
forwards; evaluation and DPO reference forwards (no grad) are not counted. The loss and the
gradients of those micro-batches are then NaN, exactly as a real overflow makes them.

Signal: SIGNAL (TERM, KILL, ...), SIGNAL_STAGE (sft or dpo, default sft), SIGNAL_STEP (N),
SIGNAL_WHEN (saved: once checkpoint-N is complete, renamed into place; saving: while it is being
saved, its files written aside but not yet marked complete), SIGNAL_TO (self: this process, on
every rank or only SIGNAL_RANK; launcher: rank SIGNAL_RANK (default 0) sends it to the `accelerate
launch` process that started it, which passes it on to its ranks; group: rank SIGNAL_RANK (default
0) sends it to that launcher and every process it started, itself last, as a lost node would be
killed or stopped). SIGNAL_STAMP: a file the sending rank writes the time it sent the signal to.
A real signal through the real handlers, at a step the test knows.
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _rank() -> str:
    return os.environ.get("RANK", "0")


# -- NaN ---------------------------------------------------------------------------------------------


def final_norm(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.norm


def add_nan_hook(model):
    at = {int(i) for i in os.environ.get("NAN_AT", "").split(",") if i}
    rank = os.environ.get("NAN_RANK")
    if rank is not None and _rank() != rank:
        return model
    calls, seen = [0], {}

    def remember_ids(module, args, kwargs):
        seen["input_ids"] = kwargs.get("input_ids")

    def hook(module, args, output):
        if not (module.training and torch.is_grad_enabled()):
            return None
        calls[0] += 1
        if calls[0] - 1 not in at:
            return None
        if os.environ.get("NAN_DUMP") and seen.get("input_ids") is not None:
            with open(os.environ["NAN_DUMP"], "a") as f:
                f.write(json.dumps(seen["input_ids"].tolist()) + "\n")
        return output * float("nan")

    model.register_forward_pre_hook(remember_ids, with_kwargs=True)
    final_norm(model).register_forward_hook(hook)
    return model


# -- signals ---------------------------------------------------------------------------------------


def _processes_of(pid: int) -> list[int]:
    from runfixtures import processes_of

    return processes_of(pid)


def send_signal() -> None:
    sig = getattr(signal, "SIG" + os.environ["SIGNAL"])
    if os.environ.get("SIGNAL_STAMP") and os.environ.get("SIGNAL_RANK", "0") == _rank():
        Path(os.environ["SIGNAL_STAMP"]).write_text(repr(time.time()))  # when it was sent, for the test's clock
    to, rank = os.environ.get("SIGNAL_TO", "self"), os.environ.get("SIGNAL_RANK")
    if to == "self":
        if rank in (None, _rank()):
            os.kill(os.getpid(), sig)
        return
    if _rank() != (rank or "0"):
        return
    launcher = os.getppid()  # accelerate launch runs torchrun's agent in its own process: the ranks' parent
    if to == "launcher":
        os.kill(launcher, sig)
        return
    everyone = _processes_of(launcher)
    for pid in [p for p in everyone if p != os.getpid()] + [os.getpid()]:
        os.kill(pid, sig)


def _is_stage(trainer, stage: str) -> bool:
    from trl import DPOTrainer

    return isinstance(trainer, DPOTrainer) == (stage == "dpo")


def signalling_on_save(on_save):
    """AtomicCheckpoints.on_save, sending the signal before (saving) or after (saved) checkpoint N."""
    stage, step = os.environ.get("SIGNAL_STAGE", "sft"), int(os.environ["SIGNAL_STEP"])
    when = os.environ.get("SIGNAL_WHEN", "saved")

    def patched(self, args, state, control, **kwargs):
        ours = state.global_step == step and _is_stage(self.trainer, stage)
        if ours and when == "saving":
            send_signal()
        control = on_save(self, args, state, control, **kwargs)
        if ours and when == "saved":
            send_signal()
        return control

    return patched


@contextlib.contextmanager
def signal_guard(sig: int):
    """While a test sends `sig` to its own process: were the run's handler missing, the signal would
    end the whole test session; this handler, which the run's own replaces while it runs, fails the
    test instead."""

    def reached_the_test(signum, frame):
        raise AssertionError(f"{signal.Signals(signum).name} reached no handler of the run")

    previous = signal.signal(sig, reached_the_test)
    try:
        yield reached_the_test
    finally:
        signal.signal(sig, previous)


# -- installing them -------------------------------------------------------------------------------


def _poisoned(build_model):
    return lambda self: add_nan_hook(build_model(self))


def with_faults(monkeypatch=None) -> None:
    """Install the faults the environment asks for (monkeypatch: undone after the test)."""
    from mistral_align.train.checkpointing import AtomicCheckpoints
    from mistral_align.train.dpo import DPOStage
    from mistral_align.train.sft import SFTStage

    setattr_ = monkeypatch.setattr if monkeypatch is not None else setattr
    if os.environ.get("NAN_AT"):
        for stage in os.environ.get("NAN_STAGE", "sft").split(","):
            stage_class = {"sft": SFTStage, "dpo": DPOStage}[stage]
            setattr_(stage_class, "build_model", _poisoned(stage_class.build_model))
    if os.environ.get("SIGNAL"):
        setattr_(AtomicCheckpoints, "on_save", signalling_on_save(AtomicCheckpoints.on_save))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests"))
    with_faults()
    recipe = ROOT / "recipes" / sys.argv[1]
    sys.argv = [str(recipe), *sys.argv[2:]]
    runpy.run_path(str(recipe), run_name="__main__")
