"""Run a recipe with a real NaN injected into training: `python tests/nan_recipe.py RECIPE [overrides]`.

A forward hook on the model's final norm layer (a real layer, outside the gradient-checkpointed
decoder layers, so it runs once per forward) multiplies its output by NaN on the training forwards
listed in NAN_AT (0-based micro-batch indices of the stage named by NAN_STAGE, sft or dpo), on the
rank NAN_RANK only if set. Evaluation and DPO reference forwards (no grad) are not counted. The
loss and the gradients of those micro-batches are then NaN, exactly as a real overflow makes them.
With NAN_DUMP=FILE the input_ids of each poisoned forward are appended to FILE as a JSON line, so
a test can check the rows an error names against the batch that really went wrong.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

import torch

from mistral_align.train.dpo import DPOStage
from mistral_align.train.sft import SFTStage

STAGE = os.environ.get("NAN_STAGE", "sft")
AT = {int(i) for i in os.environ.get("NAN_AT", "").split(",") if i}
RANK = os.environ.get("NAN_RANK")


def final_norm(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.norm


def add_nan_hook(model):
    if RANK is not None and os.environ.get("RANK", "0") != RANK:
        return model
    calls, seen = [0], {}

    def remember_ids(module, args, kwargs):
        seen["input_ids"] = kwargs.get("input_ids")

    def hook(module, args, output):
        if not (module.training and torch.is_grad_enabled()):
            return None
        calls[0] += 1
        if calls[0] - 1 not in AT:
            return None
        if os.environ.get("NAN_DUMP") and seen.get("input_ids") is not None:
            with open(os.environ["NAN_DUMP"], "a") as f:
                f.write(json.dumps(seen["input_ids"].tolist()) + "\n")
        return output * float("nan")

    model.register_forward_pre_hook(remember_ids, with_kwargs=True)
    final_norm(model).register_forward_hook(hook)
    return model


stage_class = {"sft": SFTStage, "dpo": DPOStage}[STAGE]
build = stage_class.build_model
stage_class.build_model = lambda self: add_nan_hook(build(self))

recipe = Path(__file__).resolve().parents[1] / "recipes" / sys.argv[1]
sys.argv = [str(recipe), *sys.argv[2:]]
runpy.run_path(str(recipe), run_name="__main__")
