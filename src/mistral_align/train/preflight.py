"""What a recipe checks before it imports the training code, loads anything or writes anything:

    check_recipe(cfg, "sft", stages=("sft",))   # the overrides, the config, the data files

Every mistake found here is one line naming the key or the file (a UserError: exit 2). The recipes
call it first, before torch, transformers and TRL are imported (seconds); open_run calls it again
(milliseconds) for callers that start there. This module imports none of them.
"""

from __future__ import annotations

from typing import Any

from mistral_align.data.read import check_local_files
from mistral_align.schema.recipe import check_config, refuse_overrides_of_other_stages


def check_recipe(cfg: Any, recipe: str, stages: tuple[str, ...]) -> None:
    """Refuse, before anything starts, a config `recipe` cannot run: an override of a stage it does
    not run, a setting out of range, a data file that is not there."""
    refuse_overrides_of_other_stages(stages, recipe)
    check_config(cfg, stages)
    for stage in stages:
        if not cfg[stage].synthetic.enabled:  # generated data is written into the run directory later
            check_local_files(cfg[stage].data, f"{stage}.data")
