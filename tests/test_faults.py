"""Runs that survive being killed (rundir/, train/resume.py, train/signals.py, train/checkpointing.py):
the run-directory lock, refusing a changed config, checkpoints that are complete or invisible,
resuming inside a stage after SIGKILL with the same result as a run that went through, and clean
stops on SIGTERM (exit code 3)."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mistral_align.errors import EXIT_STOPPED, RunDirError
from mistral_align.rundir.checkpoints import (
    INCOMPLETE,
    MARKER,
    _step,
    checkpoints,
    newest_complete,
    rotate,
    write_marker,
)
from mistral_align.rundir.drift import check_same_training, training_differences
from mistral_align.rundir.lock import LOCK, acquire_lock, release_lock
from mistral_align.train.signals import StopOnSignal

from fault_recipe import signal_guard, with_faults
from runfixtures import adapter_max_diff, run_recipe_script

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT / "src")}  # fmt: skip
ENV.pop("MISTRAL_ALIGN_RUN_DIR", None)


# -- lock ------------------------------------------------------------------------------------------


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    lock = acquire_lock(tmp_path)
    holder = json.loads(lock.read_text())
    assert holder == {"pid": os.getpid(), "host": platform.node()}
    # Another live process holds it: refused, naming pid and host.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": platform.node()}))
        with pytest.raises(RunDirError, match=f"pid {sleeper.pid} on host {platform.node()}"):
            acquire_lock(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    # The holder is dead now: its stale lock is taken over.
    acquire_lock(tmp_path)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    release_lock(tmp_path)
    assert not lock.exists()


# -- changed config --------------------------------------------------------------------------------


def _cfg(**changes):
    base = {"model": {"name": "tiny", "architecture": {"hidden_size": 64}}, "run": {"seed": 1, "report_to": "none"},
            "sft": {"train": {"lr": 1e-3, "logging_steps": 1, "save_steps": 2}, "eval": {"max_prompts": 8},
                    "data": {"train": [{"path": "a.jsonl"}]}, "synthetic": {"enabled": False}}}  # fmt: skip
    cfg = OmegaConf.create(base)
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def test_training_differences_name_what_changes_training_only():
    stored = OmegaConf.to_container(_cfg())
    same = _cfg(**{"run.report_to": "wandb", "sft.train.logging_steps": 5, "sft.train.save_steps": 9,
                   "sft.eval.max_prompts": 2})  # fmt: skip
    assert training_differences(stored, OmegaConf.to_container(same), same, "sft") == []
    changed = _cfg(**{"run.seed": 2, "model.architecture.hidden_size": 32, "sft.train.lr": 1e-4,
                      "sft.data.train": [{"path": "b.jsonl"}]})  # fmt: skip
    diff = training_differences(stored, OmegaConf.to_container(changed), changed, "sft")
    assert diff == ["model.architecture.hidden_size", "run.seed", "sft.data.train", "sft.train.lr"]


def test_a_pipeline_rerun_with_another_seed_or_shape_is_refused_naming_the_keys(tmp_path):
    """Problem 2 of issue 10: a finished SFT stage must not be continued by DPO on a different base."""
    from hydra import compose, initialize_config_dir

    from mistral_align.rundir.layout import write_resolved_config
    from mistral_align.schema.recipe import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        first = compose("sft_dpo", overrides=["experiment=test_tiny"])
        write_resolved_config(tmp_path, first, ("sft", "dpo"))
        (tmp_path / "sft" / "adapter").mkdir(parents=True)  # SFT finished; DPO has not trained yet
        check_same_training(tmp_path, first, ("sft", "dpo"), "sft_dpo")  # the same: fine
        logging_only = compose("sft_dpo", overrides=["experiment=test_tiny", "run.report_to=tensorboard",
                                                     "sft.train.logging_steps=3", "dpo.eval.max_prompts=2",
                                                     "dpo.shared_prompt=true", "sft.train.torch_compile=true"])  # fmt: skip
        check_same_training(tmp_path, logging_only, ("sft", "dpo"), "sft_dpo")
        changed = compose("sft_dpo", overrides=["experiment=test_tiny", "run.seed=7", "model.architecture.hidden_size=32",
                                                "dpo.beta=0.5"])  # fmt: skip
        with pytest.raises(RunDirError, match=r"\(model.architecture.hidden_size: 64 -> 32; "
                                              r"run.seed: 42 -> 7\).*run.allow_config_change=true"):  # fmt: skip
            check_same_training(tmp_path, changed, ("sft", "dpo"), "sft_dpo")
        changed.run.allow_config_change = True
        check_same_training(tmp_path, changed, ("sft", "dpo"), "sft_dpo")
        # DPO's own settings may change until DPO has trained (dpo.beta above was not named).
        check_same_training(tmp_path, compose("sft_dpo", overrides=["experiment=test_tiny", "dpo.beta=0.5"]),
                            ("sft", "dpo"), "sft_dpo")


def test_a_second_launch_on_a_run_directory_in_use_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = {"pid": os.getppid(), "host": platform.node()}  # a live process that is not this one: the other launch
    (run_dir / LOCK).write_text(json.dumps(holder))
    out = run_recipe_script("sft.py", "experiment=test_tiny", f"run.dir={run_dir}", cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"error: {run_dir} is in use by another launch (pid {holder['pid']} on host {holder['host']}" in out.stderr
    assert "Traceback" not in out.stderr and not (run_dir / "config.yaml").exists()
    assert json.loads((run_dir / LOCK).read_text()) == holder  # left to its holder


# -- clean stops ---------------------------------------------------------------------------------


def test_a_first_ctrl_c_asks_for_a_checkpoint_and_a_second_stops_at_once():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    stop = StopOnSignal()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert stop.signal == "SIGINT"
        state, control = TrainerState(global_step=3, max_steps=10), TrainerControl()
        stop.on_step_end(TrainingArguments(output_dir="/tmp/unused", use_cpu=True), state, control)
        assert control.should_save and control.should_training_stop and stop.stopped_at == 3
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    finally:
        stop.uninstall()


@pytest.mark.slow
def test_sigterm_before_training_stops_cleanly_naming_the_newest_checkpoint(tmp_path, monkeypatch):
    """Issue 10 item 4: a signal while the data loads or the model builds (before trainer.train) stops
    with exit code 3 and one line, not a traceback; nothing is trained, the lock is released. The
    signal is a real SIGTERM this process sends itself once the stage's generated data is written
    (its first write, made after the handler is installed)."""
    from mistral_align.train.sft import SFTStage

    write = SFTStage.write_synthetic_data

    def write_then_sigterm(self, data_dir):
        written = write(self, data_dir)
        os.kill(os.getpid(), signal.SIGTERM)
        return written

    monkeypatch.setattr(SFTStage, "write_synthetic_data", write_then_sigterm)
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    _fake_checkpoint(resumed / "checkpoints", 2)  # what an earlier launch left: named, never loaded
    for run_dir, saved in ((fresh, "no checkpoint yet"), (resumed, f"newest checkpoint {resumed}/checkpoints/checkpoint-2")):
        with signal_guard(signal.SIGTERM) as guard:
            out = _run("sft.py", run_dir, expect=EXIT_STOPPED, cwd=tmp_path)
            assert signal.getsignal(signal.SIGTERM) is guard  # the stage put the handler it found back
        assert "Traceback" not in out.stderr
        (line,) = [x for x in out.stderr.splitlines() if x.startswith("stopped: ")]
        assert line.startswith("stopped: stopped by SIGTERM before training, ") and f"; {saved}; " in line, line
        assert line.endswith(f"to continue, run the same command with run.dir={run_dir}")
        assert not (run_dir / "run.lock").exists() and not (run_dir / "adapter").exists()
        assert not (run_dir / "metrics.jsonl").exists() or "loss" not in (run_dir / "metrics.jsonl").read_text()
    assert newest_complete(resumed / "checkpoints").name == "checkpoint-2"  # left as it was


# -- checkpoints complete or invisible -------------------------------------------------------------


def _fake_checkpoint(ckpt_dir: Path, step: int) -> Path:
    tmp = ckpt_dir / INCOMPLETE / f"checkpoint-{step}"
    tmp.mkdir(parents=True)
    for name, size in (("adapter_model.safetensors", 300), ("optimizer.pt", 500), ("trainer_state.json", 40)):
        (tmp / name).write_bytes(os.urandom(size))
    write_marker(tmp, {"step": step, "loss_sum": 1.0 * step})
    (ckpt_dir / tmp.name).parent.mkdir(exist_ok=True)
    os.replace(tmp, ckpt_dir / tmp.name)
    return ckpt_dir / tmp.name


def test_a_truncated_newest_checkpoint_is_reported_and_skipped(tmp_path, caplog):
    older, newest = _fake_checkpoint(tmp_path, 2), _fake_checkpoint(tmp_path, 4)
    assert newest_complete(tmp_path) == newest
    for f in sorted(p for p in newest.iterdir() if p.name != MARKER):
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])  # truncated
        caplog.clear()
        assert newest_complete(tmp_path) == older
        assert f"skipping checkpoint {newest}: {f.name} has" in caplog.text
        f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, other bytes
        assert newest_complete(tmp_path) == older
        f.write_bytes(data)
        assert newest_complete(tmp_path) == newest
    (newest / MARKER).unlink()  # killed before the marker: invisible
    assert newest_complete(tmp_path) == older


def test_save_total_limit_counts_complete_checkpoints_only(tmp_path):
    _fake_checkpoint(tmp_path, 1)
    _fake_checkpoint(tmp_path, 2)
    partial = tmp_path / "checkpoint-3"
    partial.mkdir()
    (partial / "optimizer.pt").write_bytes(b"x" * 10)  # a half-written one from a killed run
    rotate(tmp_path, 1)
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2"]


# -- real runs ---------------------------------------------------------------------------------------
# The recipes run in this process (runfixtures.run_recipe_script) where one process shows it; a SIGKILL ends
# its process, so a killed launch is a subprocess (tests/fault_recipe.py), and so are several ranks.
# Every signal is sent at a step the test names, from inside the run (fault_recipe.py), not raced
# against the training from outside.

slow = pytest.mark.slow
STEPS8 = ("sft.train.max_steps=8", "sft.train.save_steps=1", "sft.eval.loss_before=false")


def _args(run_dir: Path, *overrides: str) -> list[str]:
    return ["experiment=test_tiny", f"run.dir={run_dir}", *overrides]


def _run(recipe: str, run_dir: Path, *overrides: str, expect=0, cwd: Path):
    """The recipe in this process."""
    out = run_recipe_script(recipe, *_args(run_dir, *overrides), cwd=cwd)
    assert out.returncode == expect, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def _launch(launcher: list[str], recipe: str, run_dir: Path, *overrides: str, cwd: Path, expect=0,
            faults: dict | None = None) -> subprocess.CompletedProcess:
    """A subprocess: `launcher` runs tests/fault_recipe.py RECIPE (the recipe itself when no faults)."""
    script = [str(ROOT / "tests" / "fault_recipe.py"), recipe] if faults else [str(ROOT / "recipes" / recipe)]
    out = subprocess.run([*launcher, *script, *_args(run_dir, *overrides)], capture_output=True, text=True,
                         timeout=900, cwd=cwd, env={**ENV, **(faults or {})})  # fmt: skip
    if expect is not None:
        assert out.returncode == expect, out.stdout[-3000:] + out.stderr[-5000:]
    return out


PYTHON = [str(BIN / "python")]
TWO = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "configs/accelerate/cpu_ddp.yaml")]
KILLED = -signal.SIGKILL


def _train_rows(run_dir: Path, stage: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["stage"] == stage and "loss" in r]


def _same_result(name: str, ref: Path, cut: Path, stage: str) -> None:
    """The resumed run's adapter and train loss are the uninterrupted run's, within 1e-5."""
    sub = "" if (ref / "adapter").is_dir() else stage
    diff = adapter_max_diff(ref / sub / "adapter", cut / sub / "adapter")
    loss_ref = json.loads((ref / sub / "summary.json").read_text())[stage]["train_loss"]
    loss_cut = json.loads((cut / sub / "summary.json").read_text())[stage]["train_loss"]
    print(f"\nRESUME {name}: max |adapter diff| = {diff:.3g}, train loss {loss_ref!r} vs {loss_cut!r} "
          f"(diff {abs(loss_ref - loss_cut):.3g})")  # fmt: skip
    assert diff <= 1e-5 and abs(loss_ref - loss_cut) <= 1e-5


def _killed_while_saving(ckpt_dir: Path, step: int) -> None:
    """A launch SIGKILLed while it saved checkpoint-<step>: its files lie aside, unmarked, invisible."""
    aside = ckpt_dir / INCOMPLETE / f"checkpoint-{step}"
    assert aside.is_dir() and (aside / "adapter_model.safetensors").is_file() and not (aside / MARKER).exists()
    assert _step(newest_complete(ckpt_dir)) == step - 1


@slow
def test_sft_killed_then_resumed_equals_uninterrupted_and_sigterm_stops_cleanly(tmp_path, monkeypatch):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    steps = (*STEPS8, "sft.train.save_total_limit=2")
    _run("sft.py", ref, *steps, cwd=tmp_path)

    # SIGTERM once checkpoint-1 is complete: training stops at the next step boundary with a
    # checkpoint, exit 3, one line; the lock is released.
    with monkeypatch.context() as m, signal_guard(signal.SIGTERM) as guard:
        m.setenv("SIGNAL", "TERM")
        m.setenv("SIGNAL_STEP", "1")
        with_faults(m)
        out = _run("sft.py", cut, *steps, expect=EXIT_STOPPED, cwd=tmp_path)
        assert signal.getsignal(signal.SIGTERM) is guard  # the stage put the handler it found back
    stop_lines = [line for line in out.stderr.splitlines() if line.startswith("stopped: ")]
    assert len(stop_lines) == 1 and f"run.dir={cut}" in stop_lines[0] and "SIGTERM" in stop_lines[0]
    first = _step(newest_complete(cut / "checkpoints"))
    assert first == 2, first  # the step after the signal, saved
    assert not (cut / "run.lock").exists()

    # Rerun; SIGKILL while it saves checkpoint-4 (after checkpoint-3), as a lost machine would; rerun to the end.
    killed = _launch(PYTHON, "sft.py", cut, *steps, cwd=tmp_path, expect=KILLED,
                     faults={"SIGNAL": "KILL", "SIGNAL_STEP": str(first + 2), "SIGNAL_WHEN": "saving"})
    assert "SFT: resuming from" in killed.stderr
    _killed_while_saving(cut / "checkpoints", first + 2)
    assert (cut / "run.lock").exists() and not (cut / "summary.json").exists()  # stale lock: taken over below
    _run("sft.py", cut, *steps, cwd=tmp_path)

    _same_result("SFT 1 process", ref, cut, "sft")
    rows_ref, rows_cut = _train_rows(ref, "sft"), _train_rows(cut, "sft")
    assert [s for s, _ in rows_cut] == list(range(1, 9))  # no duplicated, no lost rows
    assert max(abs(a[1] - b[1]) for a, b in zip(rows_ref, rows_cut)) <= 1e-5
    assert len(checkpoints(cut / "checkpoints")) <= 2
    assert not list((cut / "checkpoints" / INCOMPLETE).glob("checkpoint-*"))  # the killed save was cleared

    # The same run directory with a setting that changes training: refused, keys named.
    out = _run("sft.py", cut, *steps, "sft.train.lr=1e-4", "run.seed=7", expect=2, cwd=tmp_path)
    assert "error: " in out.stderr and "run.seed" in out.stderr and "sft.train.lr" in out.stderr
    assert "Traceback" not in out.stderr


PIPELINE = ("sft.train.max_steps=2", "dpo.train.save_steps=1", "sft.eval.loss_before=false")


@slow
def test_pipeline_killed_inside_dpo_resumes_to_the_same_result(tmp_path):
    steps = (*PIPELINE, "dpo.train.max_steps=5")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    _run("sft_dpo.py", ref, *steps, cwd=tmp_path)
    _launch(PYTHON, "sft_dpo.py", cut, *steps, cwd=tmp_path, expect=KILLED,
            faults={"SIGNAL": "KILL", "SIGNAL_STAGE": "dpo", "SIGNAL_STEP": "2"})
    assert _step(newest_complete(cut / "dpo" / "checkpoints")) == 2 and not (cut / "dpo" / "summary.json").exists()
    out = _run("sft_dpo.py", cut, *steps, cwd=tmp_path)
    assert "SFT stage already finished" in out.stderr and "DPO: resuming from" in out.stderr
    _same_result("DPO (pipeline) 1 process", ref, cut, "dpo")
    assert [s for s, _ in _train_rows(cut, "dpo")] == [1, 2, 3, 4, 5]


@slow
@pytest.mark.ranks
def test_two_processes_stopped_in_sft_killed_in_dpo_then_resumed_equal_uninterrupted(tmp_path):
    """Two ranks, the pipeline: SIGTERM to the launcher during SFT (both ranks save at one step and
    exit 3); the rerun resumes SFT, finishes it, and is SIGKILLed with its launcher inside DPO (as a
    lost node would be); the last rerun resumes DPO to the end. Both adapters are the uninterrupted
    run's. (One pipeline where there were two tests, an SFT run stopped then killed and a pipeline
    killed inside DPO: every step of both, three launches fewer.)"""
    steps = (*STEPS8, "dpo.train.max_steps=4", "dpo.train.save_steps=1")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    _launch(TWO, "sft_dpo.py", ref, *steps, cwd=tmp_path)
    # Rank 0 sends SIGTERM to the launcher once SFT's checkpoint-1 is complete: the launcher passes
    # it to both ranks, which save at the next step and exit 3.
    out = _launch(TWO, "sft_dpo.py", cut, *steps, cwd=tmp_path, expect=None,
                  faults={"SIGNAL": "TERM", "SIGNAL_STEP": "1", "SIGNAL_TO": "launcher"})
    assert out.returncode != 0
    assert len([line for line in out.stderr.splitlines() if line.startswith("stopped: ")]) == 1, out.stderr[-4000:]
    first = _step(newest_complete(cut / "sft" / "checkpoints"))
    assert 1 <= first < 8, first
    assert not (cut / "run.lock").exists()  # released when the stopped processes exited
    assert not (cut / "sft" / "summary.json").exists()
    # SIGKILL of the launcher and both ranks once DPO's checkpoint-2 is complete.
    killed = _launch(TWO, "sft_dpo.py", cut, *steps, cwd=tmp_path, expect=KILLED,
                     faults={"SIGNAL": "KILL", "SIGNAL_STAGE": "dpo", "SIGNAL_STEP": "2", "SIGNAL_TO": "group"})
    assert "SFT: resuming from" in killed.stderr
    assert _step(newest_complete(cut / "dpo" / "checkpoints")) == 2
    assert not (cut / "dpo" / "summary.json").exists()  # killed for real, inside DPO
    out = _launch(TWO, "sft_dpo.py", cut, *steps, cwd=tmp_path)
    assert "SFT stage already finished" in out.stderr and "DPO: resuming from" in out.stderr
    _same_result("SFT 2 processes", ref, cut, "sft")
    _same_result("DPO (pipeline) 2 processes", ref, cut, "dpo")
    assert [s for s, _ in _train_rows(cut, "sft")] == list(range(1, 9))  # no duplicated, no lost rows
    assert [s for s, _ in _train_rows(cut, "dpo")] == [1, 2, 3, 4]
