"""push against real connections that fail: the installed huggingface_hub's own HfApi, pointed at a
local port that refuses connections or at a local server that hangs up, retried, then one line.

No Hub is reached: every endpoint here is 127.0.0.1."""

from __future__ import annotations

import json
import logging
import socket
import threading
from pathlib import Path

import pytest

from mistral_align.errors import HubError
from mistral_align.hub import push

TOKEN = "hf_FAKEtokenVALUE0123456789abcdefXYZ"


def _closed_port() -> int:
    """A local port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HangUpServer:
    """A local HTTP server that closes the first `drops` connections without answering, then answers
    every request with `status`. It counts the connections it accepted."""

    def __init__(self, drops: int, status: int = 400):
        self.drops, self.status, self.connections = drops, status, 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                if self.connections <= self.drops:
                    continue  # hang up: the client sees the server disconnect without a response
                conn.recv(65536)
                body = json.dumps({"error": "no such owner"}).encode()
                conn.sendall(b"HTTP/1.1 %d Refused\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                             b"Connection: close\r\n\r\n%s" % (self.status, len(body), body))

    def close(self) -> None:
        self.sock.close()


def _api(endpoint: str):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=TOKEN)


def _create_repo(api):
    return lambda: api.create_repo(repo_id="me/tiny", repo_type="model", exist_ok=True)


def test_the_installed_client_raises_what_the_retry_knows():
    """The real class of a refused connection is among the retried ones, whatever module it comes from."""
    with pytest.raises(Exception) as e:
        _create_repo(_api(f"http://127.0.0.1:{_closed_port()}"))()
    assert isinstance(e.value, push.connection_errors()), type(e.value).__mro__


def test_a_refused_connection_is_retried_then_ends_in_one_line(caplog):
    api = _api(f"http://127.0.0.1:{_closed_port()}")
    with caplog.at_level(logging.WARNING, logger="mistral_align"), pytest.raises(HubError) as e:
        push._with_retries("create_repo me/tiny", _create_repo(api), tries=3, wait_s=0)
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert [m.split("(try ")[1].split(")")[0] for m in retries] == ["1 of 3", "2 of 3"]
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("create_repo me/tiny failed after 3 tries: ") and "refused" in message.lower()


def test_a_dropped_connection_is_retried_and_the_next_try_reaches_the_server(caplog):
    server = HangUpServer(drops=1, status=400)
    try:
        with caplog.at_level(logging.WARNING, logger="mistral_align"), pytest.raises(HubError) as e:
            push._with_retries("create_repo me/tiny", _create_repo(_api(server.url)), tries=3, wait_s=0)
    finally:
        server.close()
    # Try 1: the server hung up (retried); try 2 got an answer, 400, which no retry would change.
    assert server.connections == 2
    assert sum("(try 1 of 3)" in r.getMessage() for r in caplog.records) == 1
    message = str(e.value)
    assert message == "create_repo me/tiny failed: Bad request: no such owner"  # the server's answer, one line


def test_a_server_that_always_hangs_up_is_tried_three_times():
    server = HangUpServer(drops=99)
    try:
        with pytest.raises(HubError, match=r"^create_repo me/tiny failed after 3 tries: "):
            push._with_retries("create_repo me/tiny", _create_repo(_api(server.url)), tries=3, wait_s=0)
    finally:
        server.close()
    assert server.connections == 3


def test_offline_mode_is_a_setting_not_a_blip(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    calls = []

    def create():
        calls.append(1)
        return _create_repo(_api(f"http://127.0.0.1:{_closed_port()}"))()

    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        push._with_retries("create_repo me/tiny", create, tries=3, wait_s=0)
    assert calls == [1]


def _finished_run(root: Path) -> Path:
    """The files push reads from a finished run (an adapter of one tensor is enough to reach the network)."""
    import torch
    from safetensors.torch import save_file

    run = root / "run"
    (run / "adapter").mkdir(parents=True)
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 4)}, str(run / "adapter" / "adapter_model.safetensors"))
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": "mistralai/Mistral-7B-v0.3", "r": 2, "lora_alpha": 4}))
    (run / "config.yaml").write_text("model:\n  name: mistral-7b-v0.3\n  hub_id: mistralai/Mistral-7B-v0.3\n"
                                     "  tokenizer_version: v3\nsft:\n  train:\n    lr: 0.0001\n")
    return run


def test_push_command_on_a_refused_connection_retries_and_prints_one_line(tmp_path, monkeypatch, capsys, caplog):
    """The CLI end to end: `mistral-align push` with the real HfApi reading HF_ENDPOINT's value."""
    from huggingface_hub import constants

    from mistral_align.entry.cli import main

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")  # what HF_ENDPOINT sets
    waits = []
    monkeypatch.setattr("mistral_align.hub.push.time.sleep", waits.append)  # the backoff, without the wait
    with caplog.at_level(logging.WARNING, logger="mistral_align"):
        code = main(["push", str(_finished_run(tmp_path)), "--repo-id", "me/tiny"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("mistral-align push: error: create_repo me/tiny failed after 3 tries: ")
    assert "Traceback" not in err[0] and TOKEN not in err[0]
    assert waits == [2.0, 4.0]  # two retries, each waiting longer
