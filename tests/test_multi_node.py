"""Two "nodes" on one machine: two `accelerate launch` invocations with --num_machines 2, one CPU
process each (gloo), training one run into one run directory. Then the failure drills: a node killed
(SIGKILL) or hung (SIGSTOP) mid-training, at a checkpoint the test names (tests/fault_recipe.py),
ends the other one with one line naming the lost rank and how to resume, within run.dist_timeout_s,
never after gloo's default 30 minutes; the printed resume command then finishes the run."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from mistral_align.rundir.checkpoints import _step, newest_complete

from doc_commands import as_run_here, doc_commands
from runfixtures import processes_of

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT / "src")}  # fmt: skip
ENV.pop("MISTRAL_ALIGN_RUN_DIR", None)
STEPS = ("sft.train.max_steps=6", "sft.train.save_steps=2", "sft.eval.loss_before=false")
# Node 1 (rank 1) loses itself once checkpoint-2 is complete (tests/fault_recipe.py): its launcher
# and its rank get the signal together, at a step the test knows.
LOSE_NODE_1 = {"SIGNAL_STEP": "2", "SIGNAL_TO": "group", "SIGNAL_RANK": "1"}

slow = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_node_left_running():
    """A failed assertion must not leave "nodes" training in the background."""
    yield
    while _started:
        node = _started.pop()
        if node.poll() is None:
            for pid in processes_of(node.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            node.wait()


def start_nodes(cwd: Path, port: int, *overrides: str, faults: dict | None = None) -> list[subprocess.Popen]:
    """Node 0 and node 1, as `scripts/slurm_sft.sh` starts them on two machines (the recipe through
    tests/fault_recipe.py when `faults` are given)."""
    nodes = []
    # The drill docs/launching.md shows, as written, on a free port, with the test's own run
    # directory and steps (and, for `faults`, the recipe run through tests/fault_recipe.py).
    (shown,) = doc_commands("--num_machines 2 --num_processes 2 --machine_rank $rank")
    script = [str(ROOT / "tests/fault_recipe.py"), "sft.py"] if faults else [str(ROOT / "recipes/sft.py")]
    for rank in (0, 1):
        argv = as_run_here(shown, rank=str(rank))
        argv[argv.index("--main_process_port") + 1] = str(port)
        recipe = argv.index(str(ROOT / "recipes/sft.py"))
        cmd = [*argv[:recipe], *script, *[a for a in argv[recipe + 1 :] if not a.startswith("run.dir=")],
               *STEPS, *overrides]  # fmt: skip
        nodes.append(subprocess.Popen(cmd, cwd=cwd, env={**ENV, **(faults or {})}, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True))  # fmt: skip
    _started.extend(nodes)
    return nodes


def finish(nodes: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    """Each node's exit code and stderr, once it ends."""
    errs = [n.communicate(timeout=timeout)[1] for n in nodes]
    return [(n.returncode, err) for n, err in zip(nodes, errs)]


def signal_node(node: subprocess.Popen, sig: int) -> list[int]:
    pids = processes_of(node.pid)
    for pid in pids:
        os.kill(pid, sig)
    return pids


def wait_for_the_loss(nodes: list[subprocess.Popen], stamp: Path, timeout: float = 300) -> None:
    """Until node 1 has lost itself (its rank wrote the stamp), or fail if a node ended first."""
    t0 = time.time()
    while not stamp.exists():
        if any(n.poll() is not None for n in nodes) or time.time() - t0 > timeout:
            raise AssertionError("node 1 was not lost at its checkpoint: " + finish(nodes)[0][1][-4000:])
        time.sleep(0.2)


def seconds_until_exit(node: subprocess.Popen, stamp: Path, limit: float) -> float:
    """Seconds from node 1's loss (the time its rank wrote in `stamp`) to node 0's exit."""
    lost = float(stamp.read_text())
    try:
        node.wait(timeout=max(1.0, lost + limit - time.time()))
    except subprocess.TimeoutExpired:
        signal_node(node, signal.SIGKILL)
        raise AssertionError(f"the surviving node still ran {limit:.0f} s after losing its peer") from None
    return time.time() - lost


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@slow
@pytest.mark.ranks
def test_a_killed_node_ends_the_other_in_one_line_and_the_printed_command_resumes(tmp_path):
    # Rank 0 picks the run directory (no run.dir given) and broadcasts it to node 1.
    stamp = tmp_path.parent / f"{tmp_path.name}-lost"
    nodes = start_nodes(tmp_path, free_port(), f"run.output_dir={tmp_path}", "run.dist_timeout_s=30",
                        faults={**LOSE_NODE_1, "SIGNAL": "KILL", "SIGNAL_STAMP": str(stamp)})  # the whole node
    wait_for_the_loss(nodes, stamp)
    took = seconds_until_exit(nodes[0], stamp, limit=90)
    nodes[1].wait()
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert _step(newest_complete(run_dir / "checkpoints")) == 2
    print(f"\nMULTI-NODE: SIGKILL of node 1 -> node 0 exited {nodes[0].returncode} after {took:.1f} s")
    _, err = nodes[0].communicate()
    assert nodes[0].returncode != 0 and "exitcode  : 4" in err  # the rank's EXIT_PEER_LOST, via torchrun
    lines = error_lines(err)
    assert len(lines) == 1, err[-4000:]
    assert "rank 0 on" in lines[0] and "lost contact with rank 1" in lines[0], lines[0]
    assert f"run.dir={run_dir}" in lines[0]
    assert "RuntimeError" not in err and "mistral_align/" not in err  # no traceback from the rank itself
    assert took < 30  # a closed connection is seen at the next collective, long before the timeout

    # The resume the line asks for: the same command on both nodes with that run.dir.
    resume_dir = re.search(r"run\.dir=(\S+)", lines[0]).group(1)
    results = finish(start_nodes(tmp_path, free_port(), f"run.output_dir={tmp_path}", f"run.dir={resume_dir}"))
    for code, stderr in results:
        assert code == 0, stderr[-4000:]
    assert "SFT: resuming from" in results[0][1]
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == [run_dir]  # one run directory, both times
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["num_nodes"] == 2
    assert sum(len(ranks) for ranks in manifest["hosts"].values()) == 2
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))  # each step once, from one writer
    assert "'loss'" not in results[1][1]  # node 1 does not print the trainer's logs again


@slow
@pytest.mark.ranks
def test_a_hung_node_ends_the_other_within_run_dist_timeout(tmp_path):
    timeout_s = 20
    stamp = tmp_path.parent / f"{tmp_path.name}-lost"
    nodes = start_nodes(tmp_path, free_port(), f"run.dir={tmp_path / 'run'}", f"run.dist_timeout_s={timeout_s}",
                        faults={**LOSE_NODE_1, "SIGNAL": "STOP", "SIGNAL_STAMP": str(stamp)})  # alive, sockets open, silent
    try:
        wait_for_the_loss(nodes, stamp)
        took = seconds_until_exit(nodes[0], stamp, limit=timeout_s + 60)
    finally:
        signal_node(nodes[1], signal.SIGKILL)
        nodes[1].wait()
    print(f"\nMULTI-NODE: SIGSTOP of node 1 -> node 0 exited {nodes[0].returncode} after {took:.1f} s "
          f"(run.dist_timeout_s={timeout_s})")  # fmt: skip
    _, err = nodes[0].communicate()
    lines = error_lines(err)
    assert len(lines) == 1, err[-4000:]
    assert "rank 1 on" in lines[0] and "did not answer rank 0" in lines[0], lines[0]
    assert f"run.dist_timeout_s={timeout_s}" in lines[0] and f"run.dir={tmp_path / 'run'}" in lines[0]
    assert timeout_s - 1 < took < timeout_s + 30


# -- without processes -------------------------------------------------------------------------------


def test_num_nodes_comes_from_the_launcher_then_the_scheduler(monkeypatch):
    from mistral_align.train.ranks import num_nodes

    for name in ("GROUP_WORLD_SIZE", "NUM_NODES", "SLURM_NNODES"):
        monkeypatch.delenv(name, raising=False)
    assert num_nodes() == 1
    monkeypatch.setenv("SLURM_NNODES", "4")
    assert num_nodes() == 4
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")  # torchrun: the node agents that really started
    assert num_nodes() == 2


def test_the_lost_peer_line_names_the_peer_the_timeout_and_the_resume(monkeypatch):
    import torch.distributed as dist

    import mistral_align.train.ranks as ranks
    from mistral_align.train.ranks import lost_peer_message

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(ranks, "_RUN", {"dir": "/runs/r1", "hosts": ["a", "b"], "rank": 0, "world": 2,
                                              "timeout_s": 30})  # fmt: skip
    gone = RuntimeError("[/x/gloo/gloo/transport/tcp/pair.cc:537] Read error [10.0.0.2]:41234: Connection reset by "
                        "peer. This is typically caused by a remote worker hanging. GLHF!")  # fmt: skip
    line = lost_peer_message(gone)
    assert "lost contact with rank 1 on b" in line and "Read error [10.0.0.2]:41234: Connection reset by peer" in line
    assert line.endswith("run.dir=/runs/r1") and "pair.cc" not in line and "GLHF" not in line
    silent = RuntimeError("[/x/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 30000ms for recv "
                          "operation to complete")  # fmt: skip
    assert "rank 1 on b did not answer rank 0" in lost_peer_message(silent)
    assert "run.dist_timeout_s=30 s" in lost_peer_message(silent)
    wrapped = ValueError("while saving")
    wrapped.__cause__ = gone
    assert lost_peer_message(wrapped) is not None  # found through the exception chain
    assert lost_peer_message(RuntimeError("CUDA out of memory")) is None  # a real bug keeps its traceback
