"""File helpers every layer shares: the one atomic writer, content digests, readable modes.

    write_text_atomic(path, text)            another reader sees the old file or the whole new one
    write_json(path, obj)                    the same, as indented JSON
    sha256_file(path)                        hex digest, read in 1 MiB blocks
    follow_umask(folder)                     give every file the mode a plain open() would
    CONFIG_DIR                               the Hydra config tree, shipped inside the package
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import stat
from pathlib import Path
from typing import Any

# The Hydra config tree (configs/ in the repository is a link to it): package data, so an installed
# wheel composes the same configs as a clone does.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def write_text_atomic(path: str | os.PathLike, text: str, durable: bool = False) -> Path:
    """Write aside, then rename: another rank (or a resumed run) reading `path` sees the old file or
    the whole new one, never a half-written one. The temporary name carries host and pid, so ranks
    on several nodes sharing a disk never write the same one. `durable` also flushes it to disk
    before the rename (a checkpoint marker must not outlive a power cut without its contents)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{platform.node()}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | os.PathLike, obj: Any, durable: bool = False) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", durable)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _plain_file_mode(folder: Path) -> int:
    """The mode open() gives a new file in `folder` (the umask, default ACLs). Probed with a real
    file: reading the umask means setting it, which would race with other threads creating files."""
    probe = folder / f".mode-probe-{os.getpid()}"
    fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def follow_umask(folder: str | os.PathLike) -> None:
    """safetensors writes its files 0600 (a private temporary file renamed into place), while every
    other file of a run follows the umask (usually 0644): give the files in `folder` (recursively)
    the mode a plain open() gives, so whoever can read the rest of a run directory can read its
    weights too (a shared cluster disk, a Hub upload from another account)."""
    folder = Path(folder)
    mode = _plain_file_mode(folder)
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink() and stat.S_IMODE(p.stat().st_mode) != mode:
            os.chmod(p, mode)
