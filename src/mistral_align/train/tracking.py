"""Trackers (wandb, tensorboard): their environment, and wandb's online / offline choice made before
anything loads. No key is ever written anywhere by this code."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from mistral_align.errors import ConfigError

log = logging.getLogger("mistral_align")

WANDB_DEFAULT_URL = "https://api.wandb.ai"
# How long the main process waits to learn whether the wandb server answers. Without this check a
# run with WANDB_API_KEY set and no network hangs about 90 s in wandb.init and then fails with a
# CommError traceback, after the model has loaded.
WANDB_PROBE_SECONDS = 3.0
_wandb_fallback_warned = False


def _probe_target(base_url: str) -> tuple[str, int]:
    """(host, port) that wandb's first connection goes to: the proxy for the URL's scheme when one
    is set and the host is not in NO_PROXY, else the server itself."""
    import urllib.parse
    import urllib.request

    url = urllib.parse.urlsplit(base_url)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return p.hostname or "", p.port or (443 if p.scheme == "https" else 80)
    return host, port


def wandb_unreachable(base_url: str, timeout: float = WANDB_PROBE_SECONDS) -> str | None:
    """Why the wandb server at `base_url` cannot be reached within `timeout` seconds, or None.

    One TCP connect, in a thread so that a slow DNS lookup is bounded by the same timeout."""
    import socket
    import threading

    host, port = _probe_target(base_url)
    if not host:
        return f"{base_url} names no host"
    result: list[str | None] = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{host}:{port}: {e.strerror or e}")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"{host}:{port}: no answer in {timeout:g} s"


def _wandb_mode(run_cfg: Any, is_main: bool) -> str:
    """auto: online with WANDB_API_KEY and a reachable server, else offline (one warning).
    online: refused at once, before the model loads, when the server cannot be reached."""
    global _wandb_fallback_warned
    mode = run_cfg.wandb_mode
    if mode == "offline" or (mode == "auto" and not os.environ.get("WANDB_API_KEY")):
        return "offline"
    if not is_main:  # only the main process reports to wandb; the others never connect
        return "online"
    base_url = os.environ.get("WANDB_BASE_URL") or WANDB_DEFAULT_URL
    problem = wandb_unreachable(base_url)
    if problem is None:
        return "online"
    if mode == "online":
        raise ConfigError(f"run.wandb_mode: 'online', but the wandb server {base_url} cannot be reached ({problem}); "
                          "use run.wandb_mode=offline (upload later with `wandb sync`) or auto")
    if not _wandb_fallback_warned:
        _wandb_fallback_warned = True
        log.warning("wandb: WANDB_API_KEY is set but %s cannot be reached (%s): logging offline into the run "
                    "directory instead; upload later with `wandb sync <run dir>/wandb/offline-run-*`", base_url, problem)
    return "offline"


def setup_tracking(run_cfg: Any, out_dir: Path, is_main: bool = True) -> list[str]:
    """Environment for the chosen tracker; returns TrainingArguments.report_to.

    wandb: online when WANDB_API_KEY is set and the server answers (or run.wandb_mode=online),
    otherwise offline into <out_dir>/wandb; run.wandb_mode=disabled or run.report_to=none turns it
    off. No key is ever written anywhere by this code.
    """
    if run_cfg.report_to == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(out_dir) / "tensorboard")
        return ["tensorboard"]
    if run_cfg.report_to == "wandb" and run_cfg.wandb_mode != "disabled":
        os.environ["WANDB_MODE"] = _wandb_mode(run_cfg, is_main)
        os.environ["WANDB_PROJECT"] = run_cfg.wandb_project
        os.environ["WANDB_DIR"] = str(out_dir)
        os.environ.setdefault("WANDB_SILENT", "true")
        if run_cfg.wandb_entity:
            os.environ["WANDB_ENTITY"] = run_cfg.wandb_entity
        return ["wandb"]
    if run_cfg.report_to == "wandb":
        os.environ["WANDB_MODE"] = "disabled"
    return ["none"]
