"""Where a run directory is, and the files that say what it trained and whether a stage finished.

    run_dir = resolve_run_dir(cfg.run, state)      # decided on rank 0, broadcast to all ranks
    write_resolved_config(run_dir, cfg, stages)    # config.yaml (the main process calls it)
    finished_stage(run_dir / "sft")                # the summary of a finished stage, or None
    trained_folder(run_dir / "sft")                # its adapter/ (LoRA) or model/ (full fine-tune), or None

Hydra's own output directory is switched off in the primary configs (`hydra.run.dir: .`,
`hydra.output_subdir: null`), because its timestamp is taken separately in each process.
Layout of a run directory:

    config.yaml  manifest.json  metrics.jsonl  loss.png  summary.json  run.lock (while a launch runs)
    base/        (an inline random-init base model, as a plain transformers folder the adapter names)
    adapter/     (the final LoRA adapter: adapter_model.safetensors, adapter_config.json naming the base, tokenizer)
    model/       (instead of adapter/ with peft=none, full fine-tuning: the whole trained model as a plain
                  transformers folder, safetensors, config.json naming the stock class, tokenizer)
    tokenizer/   (save_hf_tokenizer)
    checkpoints/ (trainer checkpoints, rundir/checkpoints.py)    data/ (generated data, if any)    wandb/ tensorboard/
    sft/ dpo/    (recipes/sft_dpo.py: one directory per stage, each with adapter/ or model/, tokenizer/, checkpoints/ ...)
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from mistral_align.files import write_text_atomic
from mistral_align.names import ADAPTER_FOLDER, FULL_MODEL_FOLDER, STAGES
from mistral_align.redaction import redact

# Set this (same value on every node) to force the run directory, e.g. in a Slurm script.
RUN_DIR_ENV = "MISTRAL_ALIGN_RUN_DIR"


def resolve_run_dir(run_cfg: Any, state) -> Path:
    """One directory for the whole run, the same on every rank.

    `run.dir` (or $MISTRAL_ALIGN_RUN_DIR) fixes it; otherwise rank 0 picks
    `<run.output_dir>/<run.name>-<YYYYmmdd-HHMMSS>` (suffixed if taken) and broadcasts it.
    """
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


def write_resolved_config(run_dir: Path, cfg: Any, stages: tuple[str, ...] = ("sft", "dpo")) -> Path:
    """<run_dir>/config.yaml: the resolved config of the stages this run trains (credentials redacted)."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / "config.yaml"
    container = redact(OmegaConf.to_container(cfg, resolve=True))
    for stage in STAGES:
        if stage not in stages:
            container.pop(stage, None)
    write_text_atomic(path, OmegaConf.to_yaml(OmegaConf.create(container)))
    return path


def trained_folder_name(peft_method: str) -> str:
    """Where a stage saves what it trained: `model` with full fine-tuning (peft.method none), else `adapter`."""
    return FULL_MODEL_FOLDER if peft_method == "none" else ADAPTER_FOLDER


def trained_folder(stage_dir: Path) -> Path | None:
    """The adapter/ or model/ folder a stage saved in `stage_dir`, or None."""
    found = [Path(stage_dir) / name for name in (ADAPTER_FOLDER, FULL_MODEL_FOLDER)]
    return next((f for f in found if f.is_dir()), None)


def finished_stage(stage_dir: Path) -> dict | None:
    """The summary of a stage that finished in `stage_dir` (its summary.json beside its adapter/ or model/), else None."""
    path = Path(stage_dir) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() and trained_folder(stage_dir) is not None else None
