"""How the base's linear layers are quantised: bitsandbytes NF4 / FP4 (QLoRA) or int8, from `quant`."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from mistral_align.schema.model import QuantConfig

DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quantization_config(quant_cfg: Any):
    """transformers' BitsAndBytesConfig for `quant.mode` (None for `none`)."""
    if quant_cfg.mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    skip = list(quant_cfg.skip_modules) or None
    if quant_cfg.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    storage = torch.uint8 if quant_cfg.storage_dtype == "uint8" else DTYPE[quant_cfg.storage_dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_cfg.mode,  # nf4 | fp4
        bnb_4bit_use_double_quant=quant_cfg.double_quant,
        bnb_4bit_compute_dtype=DTYPE[quant_cfg.compute_dtype],
        bnb_4bit_quant_storage=storage,
        llm_int8_skip_modules=skip,
    )


def run_quantization_config(quant: dict, mode: str | None = None):
    """The same for a finished run's quant node read from its config.yaml (`mode` overrides its mode):
    the settings the run was trained with."""
    node = {**vars(QuantConfig()), **quant, "mode": mode or quant.get("mode", "none")}
    return quantization_config(SimpleNamespace(**node))
