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

from runfixtures import adapter_max_diff, processes_of

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
    (run_dir / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": platform.node()}))  # this test holds it
    out = subprocess.run(_cmd("sft.py", run_dir), capture_output=True, text=True, timeout=600, cwd=tmp_path, env=ENV)
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"error: {run_dir} is in use by another launch (pid {os.getpid()} on host {platform.node()}" in out.stderr
    assert "Traceback" not in out.stderr and not (run_dir / "config.yaml").exists()
    assert json.loads((run_dir / LOCK).read_text())["pid"] == os.getpid()  # left to its holder


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
def test_sigterm_before_training_stops_cleanly_naming_the_newest_checkpoint(tmp_path):
    """Issue 10 item 4: a signal while the data loads or the model builds (before trainer.train) stops
    with exit code 3 and one line, not a traceback; nothing is trained, the lock is released."""
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    _fake_checkpoint(resumed / "checkpoints", 2)  # what an earlier launch left: named, never loaded
    for run_dir, saved in ((fresh, "no checkpoint yet"), (resumed, f"newest checkpoint {resumed}/checkpoints/checkpoint-2")):
        proc = subprocess.Popen(_cmd("sft.py", run_dir), cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        t0 = time.time()
        # The stage's generated data is its first write, made after the handler is installed.
        while not (run_dir / "data" / "train.jsonl").exists():
            assert proc.poll() is None and time.time() - t0 < 300, proc.stderr.read()[-4000:] if proc.stderr else ""
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == EXIT_STOPPED, err[-4000:]
        assert "Traceback" not in err
        (line,) = [x for x in err.splitlines() if x.startswith("stopped: ")]
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


# -- real runs -------------------------------------------------------------------------------------

slow = pytest.mark.slow


def _cmd(recipe: str, run_dir: Path, *overrides: str) -> list[str]:
    return [str(BIN / "python"), str(ROOT / "recipes" / recipe), "experiment=test_tiny",
            f"run.dir={run_dir}", *overrides]  # fmt: skip


def _run(cmd, cwd, expect=0, timeout=900):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=ENV)
    assert out.returncode == expect, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def _start_and_signal(cmd, cwd, ckpt_dir: Path, at_step: int, sig: int, timeout=900) -> subprocess.Popen:
    """Start the recipe, wait until checkpoint-<at_step> (or a later one) is complete, send `sig`."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while time.time() - t0 < timeout:
        done = [c for c in checkpoints(ckpt_dir) if _step(c) >= at_step and (c / MARKER).exists()]
        if done:
            proc.send_signal(sig)
            return proc
        if proc.poll() is not None:
            raise AssertionError("the run ended before the checkpoint: " + proc.stderr.read()[-4000:])
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("timed out waiting for a checkpoint")


def _train_rows(run_dir: Path, stage: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["stage"] == stage and "loss" in r]


def _report(name: str, diff: float, loss_a: float, loss_b: float) -> None:
    print(f"\nRESUME {name}: max |adapter diff| = {diff:.3g}, train loss {loss_a!r} vs {loss_b!r} "
          f"(diff {abs(loss_a - loss_b):.3g})")  # fmt: skip


@slow
def test_sft_killed_then_resumed_equals_uninterrupted_and_sigterm_stops_cleanly(tmp_path):
    # 8 steps: room for the SIGKILL two checkpoints after wherever the SIGTERM stop landed (a loaded
    # machine can take a step or two to notice the signal), before the run could finish on its own.
    steps = ("sft.train.max_steps=8", "sft.train.save_steps=1", "sft.train.save_total_limit=2",
             "sft.eval.loss_before=false")  # fmt: skip
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    _run(_cmd("sft.py", ref, *steps), tmp_path)

    # SIGTERM after the first checkpoint: a checkpoint at the next step boundary, exit 3, one line.
    proc = _start_and_signal(_cmd("sft.py", cut, *steps), tmp_path, cut / "checkpoints", 1, signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == EXIT_STOPPED, err[-4000:]
    stop_lines = [line for line in err.splitlines() if line.startswith("stopped: ")]
    assert len(stop_lines) == 1 and f"run.dir={cut}" in stop_lines[0] and "SIGTERM" in stop_lines[0]
    assert newest_complete(cut / "checkpoints") is not None
    assert not (cut / "run.lock").exists()

    # Rerun, SIGKILL after a later checkpoint (its second one), rerun again to the end.
    first = _step(newest_complete(cut / "checkpoints"))
    assert first + 2 < 8, first
    proc = _start_and_signal(_cmd("sft.py", cut, *steps), tmp_path, cut / "checkpoints", first + 2, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert (cut / "run.lock").exists() and not (cut / "summary.json").exists()  # stale lock: taken over below
    _run(_cmd("sft.py", cut, *steps), tmp_path)

    diff = adapter_max_diff(ref / "adapter", cut / "adapter")
    loss_ref = json.loads((ref / "summary.json").read_text())["sft"]["train_loss"]
    loss_cut = json.loads((cut / "summary.json").read_text())["sft"]["train_loss"]
    _report("SFT 1 process", diff, loss_ref, loss_cut)
    assert diff <= 1e-5 and abs(loss_ref - loss_cut) <= 1e-5
    rows_ref, rows_cut = _train_rows(ref, "sft"), _train_rows(cut, "sft")
    assert [s for s, _ in rows_cut] == list(range(1, 9))  # no duplicated, no lost rows
    assert max(abs(a[1] - b[1]) for a, b in zip(rows_ref, rows_cut)) <= 1e-5
    assert len(checkpoints(cut / "checkpoints")) <= 2

    # The same run directory with a setting that changes training: refused, keys named.
    out = _run(_cmd("sft.py", cut, *steps, "sft.train.lr=1e-4", "run.seed=7"), tmp_path, expect=2)
    assert "error: " in out.stderr and "run.seed" in out.stderr and "sft.train.lr" in out.stderr
    assert "Traceback" not in out.stderr


@slow
def test_pipeline_killed_inside_dpo_resumes_to_the_same_result(tmp_path):
    steps = ("sft.train.max_steps=2", "dpo.train.max_steps=5", "dpo.train.save_steps=1",
             "sft.eval.loss_before=false")  # fmt: skip
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    _run(_cmd("sft_dpo.py", ref, *steps), tmp_path)
    proc = _start_and_signal(_cmd("sft_dpo.py", cut, *steps), tmp_path, cut / "dpo" / "checkpoints", 2, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert not (cut / "dpo" / "summary.json").exists()
    out = _run(_cmd("sft_dpo.py", cut, *steps), tmp_path)
    assert "SFT stage already finished" in out.stderr and "DPO: resuming from" in out.stderr
    diff = adapter_max_diff(ref / "dpo" / "adapter", cut / "dpo" / "adapter")
    loss_ref = json.loads((ref / "dpo" / "summary.json").read_text())["dpo"]["train_loss"]
    loss_cut = json.loads((cut / "dpo" / "summary.json").read_text())["dpo"]["train_loss"]
    _report("DPO (pipeline) 1 process", diff, loss_ref, loss_cut)
    assert diff <= 1e-5 and abs(loss_ref - loss_cut) <= 1e-5
    assert [s for s, _ in _train_rows(cut, "dpo")] == [1, 2, 3, 4, 5]


def _launch(recipe: str, run_dir: Path, *overrides: str) -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "configs/accelerate/cpu_ddp.yaml"),
            str(ROOT / "recipes" / recipe), "experiment=test_tiny", f"run.dir={run_dir}", *overrides]  # fmt: skip


def _kill_group_after(cmd, cwd, ckpt_dir: Path, at_step: int) -> None:
    """SIGKILL the launcher and every rank (as a lost node would), once checkpoint-<at_step> is complete."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    t0 = time.time()
    while not any(_step(c) >= at_step and (c / MARKER).exists() for c in checkpoints(ckpt_dir)):
        assert proc.poll() is None and time.time() - t0 < 900, proc.stderr.read()[-4000:] if proc.stderr else ""
        time.sleep(0.2)
    tree = processes_of(proc.pid)[1:]  # torchrun starts each rank in a session of its own
    assert len(tree) >= 2
    for pid in [proc.pid, *tree]:
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=120)


@slow
def test_sft_two_processes_stopped_killed_then_resumed_equals_uninterrupted(tmp_path):
    steps = ("sft.train.max_steps=8", "sft.train.save_steps=1", "sft.eval.loss_before=false")  # 8: as above
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    _run(_launch("sft.py", ref, *steps), tmp_path)
    # SIGTERM to the launcher: it passes it to both ranks, which save at the next step and exit 3.
    proc = _start_and_signal(_launch("sft.py", cut, *steps), tmp_path, cut / "checkpoints", 1, signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert len([line for line in err.splitlines() if line.startswith("stopped: ")]) == 1, err[-4000:]
    first = _step(newest_complete(cut / "checkpoints"))
    assert 1 <= first and first + 2 < 8, first
    _kill_group_after(_launch("sft.py", cut, *steps), tmp_path, cut / "checkpoints", first + 2)
    assert not (cut / "summary.json").exists()  # killed for real, before the end
    out = _run(_launch("sft.py", cut, *steps), tmp_path)
    assert "SFT: resuming from" in out.stderr
    diff = adapter_max_diff(ref / "adapter", cut / "adapter")
    loss_ref = json.loads((ref / "summary.json").read_text())["sft"]["train_loss"]
    loss_cut = json.loads((cut / "summary.json").read_text())["sft"]["train_loss"]
    _report("SFT 2 processes", diff, loss_ref, loss_cut)
    assert diff <= 1e-5 and abs(loss_ref - loss_cut) <= 1e-5
    assert [s for s, _ in _train_rows(cut, "sft")] == list(range(1, 9))


@slow
def test_pipeline_two_processes_killed_inside_dpo_resumes_to_the_same_result(tmp_path):
    steps = ("sft.train.max_steps=2", "dpo.train.max_steps=4", "dpo.train.save_steps=1", "sft.eval.loss_before=false")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    _run(_launch("sft_dpo.py", ref, *steps), tmp_path)
    _kill_group_after(_launch("sft_dpo.py", cut, *steps), tmp_path, cut / "dpo" / "checkpoints", 2)
    assert not (cut / "dpo" / "summary.json").exists()  # killed for real, inside DPO
    out = _run(_launch("sft_dpo.py", cut, *steps), tmp_path)
    assert "DPO: resuming from" in out.stderr
    diff = adapter_max_diff(ref / "dpo" / "adapter", cut / "dpo" / "adapter")
    loss_ref = json.loads((ref / "dpo" / "summary.json").read_text())["dpo"]["train_loss"]
    loss_cut = json.loads((cut / "dpo" / "summary.json").read_text())["dpo"]["train_loss"]
    _report("DPO (pipeline) 2 processes", diff, loss_ref, loss_cut)
    assert diff <= 1e-5 and abs(loss_ref - loss_cut) <= 1e-5
    assert [s for s, _ in _train_rows(cut, "dpo")] == [1, 2, 3, 4]
