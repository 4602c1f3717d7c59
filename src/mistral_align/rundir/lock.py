"""One launch per run directory: <run_dir>/run.lock holds the pid and host of the launch using it."""

from __future__ import annotations

import errno
import json
import logging
import os
import platform
from pathlib import Path

from mistral_align.errors import RunDirError

log = logging.getLogger("mistral_align")

LOCK = "run.lock"


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
