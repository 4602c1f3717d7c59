"""Load a run (base + adapter, or a full fine-tune's model) or a merged folder for talking to it: `mistral-align chat`.

Weights as safetensors only unless `allow_pickle`; never the folder's own Python code. The base is
quantised as the run was trained (`quant="auto"`), in float32 compute on the CPU.
"""

from __future__ import annotations

from typing import Optional

import torch

from mistral_align.chat.encoder import get_encoder
from mistral_align.errors import RunDirError
from mistral_align.model.bnb_cpu import disable_cpu_inference_repacking
from mistral_align.model.load import load_pretrained
from mistral_align.model.lora import attach_adapter
from mistral_align.model.quantize import run_quantization_config
from mistral_align.model.trust import load_config, weights_kwargs
from mistral_align.rundir.finished import resolve_source


def load_for_chat(path, quant: str = "auto", stage: Optional[str] = None, dtype: str = "auto", allow_pickle: bool = False):
    """(model, encoder) for a run directory (base + adapter) or a merged folder; safetensors only unless
    `allow_pickle`, never the folder's own Python code."""
    from transformers import AutoModelForCausalLM

    src = resolve_source(path, stage, allow_pickle)
    if not src.tokenizer_version:
        raise RunDirError(f"{src.path}: cannot tell the tokenizer version (no tokenizer_config.json from save_hf_tokenizer)")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "fp32": torch.float32,
              "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    else:
        torch_dtype = dtypes[dtype]
    encoder = get_encoder(src.tokenizer_version, src.tokenizer_file)  # the file the run encoded with
    if quant not in ("auto", "none", "nf4", "fp4", "int8"):
        raise RunDirError(f"--quant must be auto, none, nf4, fp4 or int8, got {quant!r}")
    if src.kind == "merged":
        load_config(str(src.path))  # refuses a folder that would run its own code
        mode = "none" if quant == "auto" else quant
        model = AutoModelForCausalLM.from_pretrained(str(src.path), dtype=torch_dtype, **weights_kwargs(allow_pickle),
                                                     quantization_config=run_quantization_config({"compute_dtype": "float32" if torch_dtype == torch.float32 else "bfloat16"}, mode))
    else:
        mode = src.quant_mode if quant == "auto" else quant
        q = dict(src.quant or {})
        if not torch.cuda.is_available():
            q["compute_dtype"] = "float32"
        if src.is_full:  # a full fine-tune: the trained model itself, no adapter
            model = load_pretrained(str(src.model_dir), allow_pickle=allow_pickle, dtype=torch_dtype,
                                    quantization_config=run_quantization_config(q, mode))
        else:
            base = load_pretrained(src.base, revision=src.revision, allow_pickle=allow_pickle, dtype=torch_dtype,
                                   quantization_config=run_quantization_config(q, mode))
            model = attach_adapter(base, str(src.adapter_dir))
    disable_cpu_inference_repacking(model)
    if torch.cuda.is_available() and mode == "none":
        model = model.to("cuda")
    return model.eval(), encoder
