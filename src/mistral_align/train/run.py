"""The run directory every rank shares, and what the main process writes into it.

    state = PartialState()                         # starts torch.distributed under accelerate launch
    setup_logging(state)                           # INFO on the main process, warnings only elsewhere
    run_dir = resolve_run_dir(cfg.run, state)      # decided on rank 0, broadcast to all ranks
    write_resolved_config(run_dir, cfg)            # main process only (every writer here checks)
    write_manifest(run_dir, {...})                 # merges into manifest.json

Hydra's own output directory is switched off in the primary configs (`hydra.run.dir: .`,
`hydra.output_subdir: null`), because its timestamp is taken separately in each process.
Layout of a run directory:

    config.yaml  manifest.json  metrics.jsonl  loss.png  summary.json
    adapter/     (final adapter, safetensors; or the full model with peft=none)
    tokenizer/   (save_hf_tokenizer)
    checkpoints/ (trainer checkpoints)    data/ (generated data, if any)    wandb/ tensorboard/
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("mistral_align")

# Set this (same value on every node) to force the run directory, e.g. in a Slurm script.
RUN_DIR_ENV = "MISTRAL_ALIGN_RUN_DIR"
# Keys whose values are credentials: token, hf_token, api_key, WANDB_API_KEY, secret, password (not tokenizer_*).
_SECRET_KEY = re.compile(r"(^|[_-])(token|secret|password|passwd|api[_-]?key|auth)$", re.I)


def init_state():
    """accelerate's PartialState for this process (starts torch.distributed under `accelerate launch`).

    `accelerate launch --multi_gpu` (configs/accelerate/cpu_ddp.yaml) on a machine without GPUs starts
    N processes with torchrun, but accelerate only picks the CPU backend (MULTI_CPU over gloo) when told
    the run is on the CPU; without that every process would train alone. So: no CUDA and a
    WORLD_SIZE > 1 means CPU DDP.
    """
    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if cpu:
        os.environ["ACCELERATE_USE_CPU"] = "true"
    return PartialState(cpu=cpu)


def setup_logging(state=None, level: int = logging.INFO) -> None:
    """Log once: the main process at `level`; other ranks only warnings (and silence HF libraries there)."""
    from accelerate import PartialState

    state = state or PartialState()
    main = state.is_main_process
    import warnings

    # transformers 5 renamed gradient checkpointing to activation checkpointing; peft and TRL still
    # call the old names on every step, which would bury the run's own messages.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*gradient_checkpointing.*deprecated")
    logging.basicConfig(
        level=level if main else logging.WARNING,
        format=f"%(asctime)s [rank {state.process_index}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    if not main:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()


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


def _is_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def write_resolved_config(run_dir: Path, cfg: Any) -> Path | None:
    from omegaconf import OmegaConf

    if not _is_main():
        return None
    path = Path(run_dir) / "config.yaml"
    container = redact(OmegaConf.to_container(cfg, resolve=True))
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(container)))
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


def base_manifest(stage: str, state=None) -> dict[str, Any]:
    """The parts of the manifest every stage shares: versions, git, world, command, start time."""
    import torch
    from accelerate import PartialState

    state = state or PartialState()
    return {
        "stage": stage,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": [os.path.basename(sys.argv[0]), *sys.argv[1:]],
        "versions": versions(),
        "git": git_commit(),
        "world_size": state.num_processes,
        "num_nodes": int(os.environ.get("NUM_NODES", os.environ.get("SLURM_NNODES", "1")) or 1),
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
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    return path


def write_json(path: Path, obj: Any) -> Path | None:
    if not _is_main():
        return None
    Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return Path(path)


def setup_tracking(run_cfg: Any, run_dir: Path) -> list[str]:
    """Environment for the chosen tracker; returns TrainingArguments.report_to.

    wandb: online when WANDB_API_KEY is set (or run.wandb_mode=online), otherwise offline into
    <run_dir>/wandb; run.wandb_mode=disabled or run.report_to=none turns it off. No key is ever
    written anywhere by this code.
    """
    if run_cfg.report_to == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(run_dir) / "tensorboard")
        return ["tensorboard"]
    if run_cfg.report_to == "wandb" and run_cfg.wandb_mode != "disabled":
        mode = run_cfg.wandb_mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        os.environ["WANDB_MODE"] = mode
        os.environ["WANDB_PROJECT"] = run_cfg.wandb_project
        os.environ["WANDB_DIR"] = str(run_dir)
        os.environ.setdefault("WANDB_SILENT", "true")
        if run_cfg.wandb_entity:
            os.environ["WANDB_ENTITY"] = run_cfg.wandb_entity
        return ["wandb"]
    if run_cfg.report_to == "wandb":
        os.environ["WANDB_MODE"] = "disabled"
    return ["none"]


def report_user_errors(fn):
    """Recipe entry points: a mistake in the config, the data or `dpo.init_from` ends the run with
    its one-line message (exit code 2), not a traceback. Place it under `@hydra.main`."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from mistral_align.config import ConfigError
        from mistral_align.data.load import DataError
        from mistral_align.train.dpo import InitError

        try:
            return fn(*args, **kwargs)
        except (ConfigError, DataError, InitError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
