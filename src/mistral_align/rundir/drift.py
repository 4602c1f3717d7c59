"""A run directory continues only the training it started: a rerun whose config changes what is
trained (model, data, objective, optimiser, seed) is refused with the differing keys named.

"Started" means kept something trained: a complete checkpoint or a saved adapter (or model) of the stage. A
launch that stopped before that (a missing file, a bad row, a model that would not load, a kill
before the first save) left nothing a rerun would continue, so the rerun may change anything of
that stage; the shared keys (model, quant, peft, run.seed) are held once any stage has started.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mistral_align.errors import RunDirError
from mistral_align.names import STAGES
from mistral_align.redaction import redact
from mistral_align.rundir.checkpoints import MARKER, checkpoints
from mistral_align.rundir.layout import trained_folder

# Keys that do not change what is trained: where things go, what is logged, how often it is saved,
# what is evaluated. Everything else (model, quant, peft, run.seed, each stage's data, train and
# objective) must match the run directory's config.yaml.
_RUN_KEYS_THAT_MATTER = ("run.seed",)
# on_nonfinite only acts on a NaN step: switching a run stopped by one to skip must resume it. Kernels
# and batch layouts change how a step is computed, not the loss (tested equal to the padded path).
_TRAIN_KEYS_THAT_DO_NOT = ("logging_steps", "eval_steps", "save_steps", "save_total_limit",
                           "per_device_eval_batch_size", "dataloader_num_workers", "on_nonfinite",
                           "use_liger_kernel", "torch_compile")  # fmt: skip
_STAGE_KEYS_THAT_DO_NOT = ("padding_free", "shared_prompt")


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: obj}


def _ignored(key: str, cfg: Any, recipe: str) -> bool:
    if key.startswith("run."):
        return key not in _RUN_KEYS_THAT_MATTER
    parts = key.split(".")
    if parts[0] in STAGES:
        stage = parts[0]
        if len(parts) > 1 and parts[1] == "eval":
            return True
        if len(parts) > 2 and parts[1] == "train" and parts[2] in _TRAIN_KEYS_THAT_DO_NOT:
            return True
        if len(parts) == 2 and parts[1] in _STAGE_KEYS_THAT_DO_NOT:
            return True
        # Synthetic data is regenerated from the synthetic.* settings (compared) into the run directory.
        if len(parts) > 2 and parts[1] == "data" and parts[2] in ("train", "eval"):
            if cfg[stage].synthetic.enabled:
                return True
        if recipe == "sft_dpo" and key == "dpo.init_from":  # the pipeline's own sft/adapter
            return True
    return False


def training_differences(stored: dict, new: dict, cfg: Any, recipe: str) -> list[str]:
    """Dotted keys whose values differ between two resolved configs, in what changes training."""
    a, b = _flatten(stored), _flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>") and not _ignored(k, cfg, recipe))


def stage_dir(run_dir: Path, stage: str, stages: tuple[str, ...]) -> Path:
    """Where a stage writes: the run directory itself, or its own sub-directory in a pipeline."""
    return Path(run_dir) / stage if len(stages) > 1 else Path(run_dir)


def stages_started(run_dir: Path, stages: tuple[str, ...]) -> set[str]:
    """The stages of `stages` that kept something trained in `run_dir`: a checkpoint marked complete
    (rundir/checkpoints.py) or the stage's adapter/ or model/ (saved once training ended)."""
    started = set()
    for stage in stages:
        d = stage_dir(run_dir, stage, stages)
        if trained_folder(d) is not None or any((c / MARKER).is_file() for c in checkpoints(d / "checkpoints")):
            started.add(stage)
    return started


def check_same_training(run_dir: Path, cfg: Any, stages: tuple[str, ...], recipe: str) -> None:
    """Refuse (RunDirError) a run directory whose config.yaml trained with different settings, in
    the stages that started training (all of them: `stages_started`) and the shared keys."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / "config.yaml"
    if not path.is_file() or cfg.run.allow_config_change:
        return
    started = stages_started(run_dir, stages)
    if not started:  # written by a launch that trained nothing: nothing to continue
        return
    stored = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    new = redact(OmegaConf.to_container(cfg, resolve=True))
    for stage in STAGES:
        if stage not in stages:
            new.pop(stage, None)
    diff = [k for k in training_differences(stored, new, cfg, recipe)
            if k.split(".", 1)[0] not in STAGES or k.split(".", 1)[0] in started]
    if diff:
        a, b = _flatten(stored), _flatten(new)
        shown = "; ".join(f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in diff[:8])
        more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
        raise RunDirError(
            f"{run_dir} was trained with a different config ({shown}{more}); use a new run.dir, or "
            "run.allow_config_change=true to continue it anyway"
        )
