"""Experiment tracking for real, offline: the SFT recipe with wandb (no API key -> offline run files
under the run directory, holding the logged train loss), wandb disabled by config, and tensorboard.
The wandb runs are fresh processes; the others run the recipe in this process.

Every run goes through a recording proxy (HTTP(S)_PROXY and WANDB_BASE_URL point at a local socket)
so that any attempt to reach the network shows up as a connection and fails the test."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runfixtures import run_recipe_script

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_FAKE_SECRET_123"

pytestmark = pytest.mark.slow


class Trap:
    """A local TCP listener standing in for every proxy and the wandb server; records who connects."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.hits: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    self.hits.append(conn.recv(200) or b"<connected>")
                except OSError:
                    self.hits.append(b"<connected>")

    def collect(self) -> list[bytes]:
        """Stop serving and also count connections still waiting in the listen backlog."""
        self._stop.set()
        self._thread.join(5)
        self.sock.setblocking(False)
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return self.hits
            conn.close()
            self.hits.append(b"<connected>")

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def trap():
    t = Trap()
    yield t
    t.close()


def run_sft(tmp_path: Path, trap: Trap, *overrides: str, extra_env: dict | None = None, monkeypatch=None):
    """The SFT recipe with every proxy pointing at the trap: in this process (monkeypatch given), or in
    a fresh one, which wandb needs (its service process keeps the environment it was started with)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HTTP_PROXY": trap.url, "HTTPS_PROXY": trap.url, "http_proxy": trap.url, "https_proxy": trap.url,
           "WANDB_BASE_URL": trap.url}
    for k in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_DISABLED", "MISTRAL_ALIGN_RUN_DIR",
              "NO_PROXY", "no_proxy", "TENSORBOARD_LOGGING_DIR"):
        env.pop(k, None)
    env.update(extra_env or {})
    runs = tmp_path / "runs"
    args = ["experiment=test_tiny", f"run.output_dir={runs}", *overrides]
    if monkeypatch is None:
        out = subprocess.run([sys.executable, str(ROOT / "recipes/sft.py"), *args], capture_output=True, text=True,
                             timeout=300, cwd=tmp_path, env=env)  # fmt: skip
    else:
        for k in set(os.environ) - set(env):
            monkeypatch.delenv(k)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        out = run_recipe_script("sft.py", *args, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    hits = trap.collect()
    assert hits == [], f"the run tried the network: {hits}"
    dirs = [p for p in runs.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    # nothing lands in the working directory: trackers write under the run directory only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"], list(tmp_path.iterdir())
    return dirs[0], out


def logged_losses(run: Path) -> list[float]:
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in metrics if "loss" in m]


def wandb_records(path: Path):
    """Records of a wandb transaction log (`run-<id>.wandb`): a LevelDB-style log of `Record`
    protobufs. wandb 0.31 no longer ships a Python reader (the writer lives in wandb-core), so the
    framing is decoded here: a 7-byte file header, then 32 KiB blocks of chunks, each with a 7-byte
    header (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0), data[:7]
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer, zero padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def assert_no_secret(tmp_path: Path, *texts: str):
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert SECRET.encode() not in p.read_bytes(), p
    for text in texts:
        assert SECRET not in text


def test_wandb_offline_without_key(tmp_path, trap):
    run, out = run_sft(tmp_path, trap, "run.report_to=wandb", "run.wandb_project=tracking-test",
                       extra_env={"HF_TOKEN": SECRET})
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run / "wandb").iterdir()) if (run / "wandb").exists() else run
    assert not list((run / "wandb").glob("run-*"))  # no online run
    (log,) = offline[0].glob("run-*.wandb")

    records = list(wandb_records(log))
    kinds = [r.WhichOneof("record_type") for r in records]
    (run_record,) = [r.run for r in records if r.HasField("run")]
    assert run_record.project == "tracking-test"
    assert run_record.display_name == run.name
    history = [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.HasField("history")]
    wandb_losses = [h["train/loss"] for h in history if "train/loss" in h]
    losses = logged_losses(run)
    assert len(losses) == 4
    assert wandb_losses == pytest.approx(losses)
    assert any("eval/loss" in h for h in history)
    assert "config" in kinds
    exits = [r.exit for r in records if r.HasField("exit")]
    assert exits and exits[-1].exit_code == 0  # the run was finished, not cut off

    assert_no_secret(tmp_path, out.stdout, out.stderr)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: a connect is refused at once
    return port


WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"  # fake, 40 characters like a real one


def test_wandb_with_a_key_and_no_server_logs_offline_with_one_warning(tmp_path, trap):
    """WANDB_API_KEY set, the wandb server unreachable: wandb used to retry for about 90 s and then
    fail with a CommError traceback after the model had loaded. Now the main process tries one
    connection first (3 s at most) and logs offline, saying so once; the key is written nowhere."""
    unreachable = f"http://127.0.0.1:{closed_port()}"
    run, out = run_sft(tmp_path, trap, "run.report_to=wandb", "sft.train.max_steps=2",
                       extra_env={"WANDB_API_KEY": WANDB_KEY, "WANDB_BASE_URL": unreachable,
                                  "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"})
    assert len(list((run / "wandb").glob("offline-run-*/run-*.wandb"))) == 1, list(run.rglob("*"))
    assert not list((run / "wandb").glob("run-*"))  # no online run
    warnings = [line for line in out.stderr.splitlines() if "cannot be reached" in line]
    assert len(warnings) == 1 and unreachable in warnings[0] and "logging offline" in warnings[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "CommError" not in out.stderr
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert WANDB_KEY.encode() not in p.read_bytes(), p
    assert WANDB_KEY not in out.stdout + out.stderr


def test_wandb_probe_is_quick_and_follows_the_proxy(monkeypatch):
    import time

    from mistral_align.train.tracking import _probe_target, wandb_unreachable

    port = closed_port()
    t0 = time.monotonic()
    assert "127.0.0.1:%d" % port in wandb_unreachable(f"http://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 3
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        assert wandb_unreachable(f"http://127.0.0.1:{listener.getsockname()[1]}") is None
    finally:
        listener.close()
    for k in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(k, raising=False)
    assert _probe_target("https://api.wandb.ai") == ("api.wandb.ai", 443)
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    assert _probe_target("https://api.wandb.ai") == ("proxy.example", 3128)  # wandb goes through it
    monkeypatch.setenv("no_proxy", "wandb.ai")
    assert _probe_target("https://api.wandb.ai") == ("api.wandb.ai", 443)


def test_wandb_disabled_by_config(tmp_path, trap, monkeypatch):
    run, _ = run_sft(tmp_path, trap, "run.report_to=wandb", "run.wandb_mode=disabled", "sft.train.max_steps=2",
                     extra_env={"HF_TOKEN": SECRET}, monkeypatch=monkeypatch)
    assert not list(tmp_path.rglob("*wandb*")), list(tmp_path.rglob("*wandb*"))
    assert len(logged_losses(run)) == 2  # the run's own metrics still written
    assert_no_secret(tmp_path)


def test_tensorboard(tmp_path, trap, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = run_sft(tmp_path, trap, "run.report_to=tensorboard", extra_env={"HF_TOKEN": SECRET},
                     monkeypatch=monkeypatch)
    events = sorted((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events, list(run.rglob("*"))
    scalars: dict[str, list] = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(acc.Scalars(tag))
    loss = sorted(scalars.get("train/loss", []), key=lambda e: e.step)
    assert [e.step for e in loss] == [1, 2, 3, 4], scalars.keys()
    assert [e.value for e in loss] == pytest.approx(logged_losses(run), rel=1e-6)
    assert "eval/loss" in scalars
    assert not list(tmp_path.rglob("*wandb*"))
    assert_no_secret(tmp_path)
