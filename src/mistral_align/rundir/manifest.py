"""manifest.json: what a run was made with (versions, git commit, command) and what it trained.

A pipeline keeps one manifest: shared facts at the top, one section per stage ("sft", "dpo").
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from mistral_align.files import write_text_atomic
from mistral_align.redaction import redact


def write_manifest(run_dir: Path, updates: dict[str, Any], section: str | None = None) -> Path:
    """Merge `updates` (credentials redacted) into <run_dir>/manifest.json, at the top level or, for
    one stage of a pipeline, under `section` ("sft", "dpo"), so a pipeline keeps one manifest."""
    path = Path(run_dir) / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    (manifest.setdefault(section, {}) if section else manifest).update(redact(updates))
    write_text_atomic(path, json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    return path


def lift_stage_facts(run_dir: Path, section: str, keys: tuple[str, ...] = ("model", "tokenizer_version", "tokenizer")) -> None:
    """Copy shared facts from a pipeline stage's manifest section to the top level, where a
    single-stage run keeps them."""
    manifest = json.loads((Path(run_dir) / "manifest.json").read_text())
    write_manifest(run_dir, {key: manifest[section][key] for key in keys if key in manifest.get(section, {})})


def git_commit() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[3]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    if sha.returncode:
        return {"commit": None, "dirty": None}
    return {"commit": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("mistral-align", "torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes",
                "datasets", "mistral-common", "hydra-core", "wandb"):  # fmt: skip
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def command_facts() -> dict[str, Any]:
    """The command that made this run, and its Hydra overrides. In a sweep (`-m a=1,2`) sys.argv is
    the whole sweep; each job records its own overrides (`a=1`) as its command, and the sweep aside."""
    argv = [os.path.basename(sys.argv[0]), *sys.argv[1:]]
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # not launched through @hydra.main
        return {"command": argv}
    overrides = list(hc.overrides.task)
    if hc.mode != RunMode.MULTIRUN:
        return {"command": argv, "overrides": overrides}
    return {"command": [argv[0], *overrides], "overrides": overrides,
            "sweep": {"command": argv, "job": hc.job.num}}
