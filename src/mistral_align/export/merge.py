"""Merge a run's LoRA adapter into its base and write a plain transformers model folder.

    merge_run("runs/demo", "merged/", dtype="bf16", base="dequantized")

Two bases for a QLoRA adapter (never merged into 4-bit weights):

- `dequantized`: the base the adapter was trained against: the weights quantised exactly as the
  run's `quant` node says, then dequantised back to full precision. The merged model is then the
  trained QLoRA model up to float rounding.
- `original`: the full-precision base as published. The adapter was never trained against it;
  the NF4 rounding error of every frozen weight is put back, so the model differs from the one
  that was trained and evaluated.

The default is `dequantized` (measured in `scripts/measure_merge.py`; figures in the README). For
a run without quantisation both are the same model.

A full fine-tune (peft=none) has no adapter to merge: its trained model is written as it is, in
the dtype asked, into the same kind of folder, so `merge`, and `export-gguf` (which merges first),
take every run alike.

The folder holds safetensors shards, `config.json`, `generation_config.json` and the exact
tokenizer (`save_hf_tokenizer`); `AutoModelForCausalLM` / `AutoTokenizer` load it without
this package.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from mistral_align.chat.hf_tokenizer import save_hf_tokenizer
from mistral_align.errors import RunDirError
from mistral_align.files import follow_umask
from mistral_align.model.load import load_pretrained
from mistral_align.model.lora import attach_adapter
from mistral_align.model.plain_folder import make_plain
from mistral_align.model.quantize import run_quantization_config
from mistral_align.rundir.finished import RunSource, resolve_source

log = logging.getLogger("mistral_align")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BASES = ("dequantized", "original")
DEFAULT_BASE = "dequantized"


def _load_full(src: RunSource, dtype: torch.dtype):
    return load_pretrained(src.base, revision=src.revision, allow_pickle=src.allow_pickle, dtype=dtype)


def _dequantized_weights(src: RunSource) -> dict[str, torch.Tensor]:
    """Every quantised linear weight of the base as training saw it, dequantised (module name -> W)."""
    import bitsandbytes as bnb

    qcfg = run_quantization_config(src.quant)
    compute = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[src.quant.get("compute_dtype", "bfloat16")]
    model_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        (src.config.get("model") or {}).get("dtype", "bfloat16"), torch.bfloat16
    )
    qmodel = load_pretrained(src.base, revision=src.revision, allow_pickle=src.allow_pickle, dtype=model_dtype,
                             quantization_config=qcfg,
                             device_map={"": "cuda:0" if torch.cuda.is_available() else "cpu"})
    out: dict[str, torch.Tensor] = {}
    for name, module in qmodel.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            w = bnb.functional.int8_vectorwise_dequant(module.weight.data, module.weight.SCB)
        else:
            continue
        out[name] = w.to(compute).to("cpu")
    del qmodel
    return out


def load_merged(src: RunSource, dtype: torch.dtype = torch.float32, base: str = DEFAULT_BASE):
    """The merged model in memory (base as asked, adapter merged in), eval mode; a full fine-tune's
    model as it was trained."""
    if base not in BASES:
        raise RunDirError(f"--base must be one of {', '.join(BASES)}, got {base!r}")
    if src.kind != "run":
        raise RunDirError(f"{src.path}: already a merged model folder; merge takes a run directory")
    if src.is_full:
        log.info("merge: %s is a full fine-tune, no adapter to merge: its model is written as it is", src.model_dir)
        return load_pretrained(str(src.model_dir), allow_pickle=src.allow_pickle, dtype=dtype).eval()
    model = _load_full(src, dtype)
    if base == "dequantized" and src.quant_mode != "none":
        weights = _dequantized_weights(src)
        modules = dict(model.named_modules())
        for name, w in weights.items():
            lin = modules[name]
            if tuple(lin.weight.shape) != tuple(w.shape):
                raise RunDirError(f"dequantized {name}: shape {tuple(w.shape)} != base {tuple(lin.weight.shape)}")
            with torch.no_grad():
                lin.weight.copy_(w.to(lin.weight.dtype))
        log.info("merge: %d quantised weights replaced by their %s dequantisation", len(weights), src.quant_mode)
    peft_model = attach_adapter(model, str(src.adapter_dir))
    merged = peft_model.merge_and_unload()
    return merged.eval()


def merge_run(run_dir: str | Path, out_dir: str | Path, *, dtype: str = "bf16", base: str = DEFAULT_BASE,
              stage: str | None = None, max_shard_size: str = "5GB", allow_pickle: bool = False) -> Path:
    """Write the merged model folder; returns it."""
    from transformers import GenerationConfig

    if dtype not in DTYPES:
        raise RunDirError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    src = resolve_source(run_dir, stage, allow_pickle)
    if src.kind != "run":
        raise RunDirError(f"{src.path}: already a merged model folder; merge takes a run directory")
    if not src.tokenizer_version:
        raise RunDirError(f"{src.path}: cannot tell the tokenizer version (config.yaml model.tokenizer_version)")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"{out}: exists and is not empty")
    # Merge in float32 (the LoRA delta is small next to the weights), then cast once.
    model = load_merged(src, torch.float32, base)
    model = model.to(DTYPES[dtype])
    cfg = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    cfg.name_or_path = ""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size=max_shard_size)
    make_plain(out)  # the stock class named (our per-expert Mixtral saves the Hub's layout), KV cache on
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=None, do_sample=False).save_pretrained(str(out))
    save_hf_tokenizer(src.tokenizer_version, out, source=src.tokenizer_file)
    trained = {"model": str(src.model_dir)} if src.is_full else {"adapter": str(src.adapter_dir)}
    info = {
        "merged_from": {"run_dir": str(src.path), "stage": src.stage, **trained,
                        "base": src.base if not src.is_inline else "base/ (inline, in the run directory)"},
        "base_kind": ("none (a full fine-tune: the trained model as it is)" if src.is_full
                      else base if src.quant_mode != "none" else "original (the run was not quantised)"),
        "quant": src.quant_mode,
        "dtype": dtype,
        "tokenizer_version": src.tokenizer_version,
    }
    (out / "mistral_align_merge.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    for stray in out.glob("*.bin"):
        stray.unlink()
    follow_umask(out)  # safetensors writes 0600; a merged folder is meant to be served and shared
    return out
