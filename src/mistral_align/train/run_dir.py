"""The run directory every rank shares, and what the main process writes into it.

    run_dir = resolve_run_dir(cfg.run, state)      # decided on rank 0, broadcast to all ranks
    write_resolved_config(run_dir, cfg, stages)    # main process only (every writer here checks)
    write_manifest(run_dir, {...})                 # merges into manifest.json

Hydra's own output directory is switched off in the primary configs (`hydra.run.dir: .`,
`hydra.output_subdir: null`), because its timestamp is taken separately in each process.
Layout of a run directory:

    config.yaml  manifest.json  metrics.jsonl  loss.png  summary.json
    base/        (an inline random-init base model, as a plain transformers folder the adapter names)
    adapter/     (final adapter, safetensors; or the full model with peft=none)
    tokenizer/   (save_hf_tokenizer)
    checkpoints/ (trainer checkpoints)    data/ (generated data, if any)    wandb/ tensorboard/
    sft/ dpo/    (recipes/sft_dpo.py: one directory per stage, each with adapter/ tokenizer/ checkpoints/ ...)
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from mistral_align.config import CREDENTIAL_KEY

log = logging.getLogger("mistral_align")

# Set this (same value on every node) to force the run directory, e.g. in a Slurm script.
RUN_DIR_ENV = "MISTRAL_ALIGN_RUN_DIR"
# Keys whose values are credentials: token, hf_token, api_key, WANDB_API_KEY, secret, password (not tokenizer_*).
_SECRET_KEY = CREDENTIAL_KEY


def resolve_run_dir(run_cfg: Any, state=None) -> Path:
    """One directory for the whole run, the same on every rank.

    `run.dir` (or $MISTRAL_ALIGN_RUN_DIR) fixes it; otherwise rank 0 picks
    `<run.output_dir>/<run.name>-<YYYYmmdd-HHMMSS>` (suffixed if taken) and broadcasts it.
    """
    from accelerate import PartialState

    state = state or PartialState()
    fixed = os.environ.get(RUN_DIR_ENV) or run_cfg.dir
    chosen = [None]
    if state.is_main_process:
        if fixed:
            path = Path(fixed) if os.path.isabs(fixed) else Path(run_cfg.output_dir) / fixed
        else:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            path = Path(run_cfg.output_dir) / f"{run_cfg.name}-{stamp}"
            n = 1
            while path.exists():
                n += 1
                path = Path(run_cfg.output_dir) / f"{run_cfg.name}-{stamp}-{n}"
        path = path.absolute()
        path.mkdir(parents=True, exist_ok=True)
        chosen = [str(path)]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(chosen, from_process=0)
    return Path(chosen[0])


def redact(obj: Any) -> Any:
    """Blank out values under keys that look like credentials (token, secret, password, api_key)."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if _SECRET_KEY.search(str(k)) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def write_text_atomic(path: Path, text: str) -> Path:
    """Write aside, then rename: another rank (or a resumed run) reading `path` sees the old file
    or the whole new one, never a half-written one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _is_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def write_resolved_config(run_dir: Path, cfg: Any, stages: tuple[str, ...] = ("sft", "dpo")) -> Path | None:
    """<run_dir>/config.yaml: the resolved config of the stages this run trains (credentials redacted)."""
    from omegaconf import OmegaConf

    from mistral_align.config import STAGES

    if not _is_main():
        return None
    path = Path(run_dir) / "config.yaml"
    container = redact(OmegaConf.to_container(cfg, resolve=True))
    for stage in STAGES:
        if stage not in stages:
            container.pop(stage, None)
    write_text_atomic(path, OmegaConf.to_yaml(OmegaConf.create(container)))
    return path


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


def base_manifest(stage: str, state=None) -> dict[str, Any]:
    """The parts of the manifest every stage shares: versions, git, world, command, start time."""
    import torch
    from accelerate import PartialState

    from mistral_align.train.distributed import num_nodes, run_hosts

    state = state or PartialState()
    return {
        "stage": stage,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        **command_facts(),
        "versions": versions(),
        "git": git_commit(),
        "world_size": state.num_processes,
        "num_nodes": num_nodes(),
        "hosts": run_hosts(),
        "distributed_type": str(state.distributed_type).split(".")[-1],
        "device": str(state.device),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "host": platform.node(),
    }


def write_manifest(run_dir: Path, updates: dict[str, Any], section: str | None = None) -> Path | None:
    """Merge `updates` into <run_dir>/manifest.json (main process only), at the top level or, for
    one stage of a pipeline, under `section` ("sft", "dpo"), so a pipeline keeps one manifest."""
    if not _is_main():
        return None
    path = Path(run_dir) / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    (manifest.setdefault(section, {}) if section else manifest).update(redact(updates))
    write_text_atomic(path, json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    return path


def lift_stage_facts(run_dir: Path, section: str, keys: tuple[str, ...] = ("model", "tokenizer_version")) -> None:
    """Copy shared facts from a pipeline stage's manifest section to the top level, where a
    single-stage run keeps them (main process only)."""
    if not _is_main():
        return
    manifest = json.loads((Path(run_dir) / "manifest.json").read_text())
    write_manifest(run_dir, {key: manifest[section][key] for key in keys if key in manifest.get(section, {})})


def finished_stage(stage_dir: Path) -> dict | None:
    """The summary of a stage that finished in `stage_dir` (its summary.json beside its adapter), else None."""
    path = Path(stage_dir) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() and (Path(stage_dir) / "adapter").is_dir() else None


def write_json(path: Path, obj: Any) -> Path | None:
    if not _is_main():
        return None
    write_text_atomic(Path(path), json.dumps(obj, indent=2, default=str) + "\n")
    return Path(path)
