"""What a recipe checks before it imports the training code, loads anything or writes anything:

    check_recipe(cfg, "sft", stages=("sft",))   # the overrides, the config, the data files

Every mistake found here is one line naming the key or the file (a UserError: exit 2). The recipes
call it first, before torch, transformers and TRL are imported (seconds); open_run calls it again
(milliseconds) for callers that start there. This module imports none of them.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mistral_align.data.read import check_local_files
from mistral_align.errors import ConfigError
from mistral_align.schema.recipe import check_config, refuse_overrides_of_other_stages


def check_recipe(cfg: Any, recipe: str, stages: tuple[str, ...]) -> None:
    """Refuse, before anything starts, a config `recipe` cannot run: an override of a stage it does
    not run, a setting out of range, a data file that is not there."""
    refuse_overrides_of_other_stages(stages, recipe)
    check_config(cfg, stages)
    check_generation_eval_placement(cfg, stages)
    for stage in stages:
        if not cfg[stage].synthetic.enabled:  # generated data is written into the run directory later
            check_local_files(cfg[stage].data, f"{stage}.data")


def sharding_launch(environ=os.environ) -> str | None:
    """How `accelerate launch` shards the model's weights across its processes, read from the
    environment its config file sets: "FSDP", "DeepSpeed ZeRO-3", or None (one whole copy per process:
    DDP, ZeRO-1/2, a single process)."""
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP"
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    stage = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage is None and environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):  # a DeepSpeed JSON of one's own
        try:
            with open(environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"], encoding="utf-8") as f:
                stage = (json.load(f).get("zero_optimization") or {}).get("stage")
        except (OSError, ValueError):
            stage = None  # DeepSpeed itself will say what is wrong with the file
    return "DeepSpeed ZeRO-3" if str(stage) == "3" else None


def check_generation_eval_placement(cfg: Any, stages: tuple[str, ...], environ=os.environ) -> None:
    """The generation eval (`<stage>.eval.generate`) runs greedy generation on the main process alone.
    Against a model whose weights FSDP or ZeRO-3 shard across the processes, that process would wait
    for the others in the first forward pass, and they are not there: refused before anything starts."""
    sharded = sharding_launch(environ)
    for stage in stages:
        if sharded and cfg[stage].eval.generate:
            raise ConfigError(
                f"{stage}.eval.generate: the generation eval runs on the main process alone and cannot run on a model "
                f"sharded across processes by {sharded}; set {stage}.eval.generate=false (the held-out loss and "
                "metrics are still measured), or launch with DDP (configs/accelerate/multi_gpu.yaml)"
            )
