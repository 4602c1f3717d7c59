"""A trained model written as a plain transformers folder, as stock transformers, the Hub, TGI / vLLM
and llama.cpp's converter read it: `mistral-align merge`'s output and a full fine-tune's `model/`.

    make_plain(folder)    # after save_pretrained: config.json names the stock class, KV cache on
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# The class stock transformers builds for each model type. Our per-expert Mixtral
# (model/mixtral_unfused.py) saves the Hub's layout, which this class loads.
STOCK_CLASSES = {"mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}


def stock_class_name(model_type: str | None) -> str | None:
    return STOCK_CLASSES.get(model_type or "")


def make_plain(folder: str | os.PathLike) -> Path:
    """Rewrite `folder`/config.json for serving: the stock class named (not our per-expert Mixtral),
    the KV cache on (training switches it off: model/load.py), no training-time quantisation."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    name = stock_class_name(config.get("model_type"))
    if name:
        config["architectures"] = [name]
    config["use_cache"] = True
    config.pop("quantization_config", None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
