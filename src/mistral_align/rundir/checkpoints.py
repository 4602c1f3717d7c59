"""Checkpoints that are complete or invisible.

Every rank writes a checkpoint into `checkpoints/.incomplete/checkpoint-N`; after a barrier the main
process writes `COMPLETE.json` there (the size and sha256 of every file) and renames the folder to
`checkpoints/checkpoint-N` (train/checkpointing.py). A checkpoint without that marker, or whose
files differ from it, is reported and skipped, never loaded. `rotate` keeps the newest complete ones.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from mistral_align.files import sha256_file, write_json

log = logging.getLogger("mistral_align")

MARKER = "COMPLETE.json"
INCOMPLETE = ".incomplete"


def write_marker(ckpt: Path, extra: dict | None = None) -> None:
    files = {}
    for p in sorted(Path(ckpt).rglob("*")):
        if p.is_file() and p.name != MARKER:
            files[str(p.relative_to(ckpt))] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    write_json(Path(ckpt) / MARKER, {"files": files, **(extra or {})}, durable=True)


def checkpoint_problem(ckpt: Path, hashes: bool = True) -> str | None:
    """Why `ckpt` cannot be loaded (no marker, a file missing, truncated or changed), or None."""
    marker = Path(ckpt) / MARKER
    try:
        listed = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return f"no valid {MARKER} (written partly, or by an older version)"
    for rel, facts in listed.items():
        p = Path(ckpt) / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != facts["size"]:
            return f"{rel} has {p.stat().st_size} bytes, {facts['size']} were written"
        if hashes and sha256_file(p) != facts["sha256"]:
            return f"{rel} differs from what was written (sha256)"
    return None


def marker_facts(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / MARKER).read_text())


def _step(p: Path) -> int:
    try:
        return int(p.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """checkpoint-N folders, newest (highest N) first."""
    d = Path(ckpt_dir)
    found = [p for p in d.glob("checkpoint-*") if p.is_dir() and _step(p) >= 0] if d.is_dir() else []
    return sorted(found, key=_step, reverse=True)


def newest_complete(ckpt_dir: Path, remove_bad: bool = False) -> Path | None:
    """The newest checkpoint whose files match its marker; each newer broken one is reported
    (a warning naming it and why) and skipped, and removed with `remove_bad`."""
    for ckpt in checkpoints(ckpt_dir):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        log.warning("skipping checkpoint %s: %s%s", ckpt, problem, " (removed)" if remove_bad else "")
        if remove_bad:
            shutil.rmtree(ckpt, ignore_errors=True)
    return None


def rotate(ckpt_dir: Path, limit: int | None) -> None:
    """Keep the newest `limit` complete checkpoints; folders without a marker are removed too."""
    kept = 0
    for ckpt in checkpoints(ckpt_dir):
        complete = (ckpt / MARKER).is_file()
        if complete and (limit is None or kept < limit):
            kept += 1
            continue
        shutil.rmtree(ckpt, ignore_errors=True)
