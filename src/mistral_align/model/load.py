"""Loading the base causal LM: a Hub model or an inline one, quantised as `quant` says, on this rank's device.

    model = build_model(cfg.model, cfg.quant, vocab_size=encoder.vocab_size, seed=cfg.run.seed)
    model = load_pretrained(base_dir)         # merge and chat: the class training used, no quantisation asked
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

from mistral_align.errors import ConfigError, UntrustedFileError
from mistral_align.model.bnb_cpu import disable_cpu_inference_repacking
from mistral_align.model.inline import save_inline_base
from mistral_align.model.mixtral_unfused import UnfusedMixtralForCausalLM
from mistral_align.model.placement import default_device_map
from mistral_align.model.quantize import DTYPE, quantization_config
from mistral_align.model.trust import load_config, require_safetensors, weights_kwargs

log = logging.getLogger(__name__)


def model_class(config):
    """The class a config loads into: Mixtral -> our per-expert-linear Mixtral (model/mixtral_unfused.py),
    so quantisation reaches every expert; anything else -> transformers' AutoModelForCausalLM."""
    if getattr(config, "model_type", None) == "mixtral":
        return UnfusedMixtralForCausalLM
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def load_pretrained(source: str, revision: str | None = None, allow_pickle: bool = False, **kwargs):
    """`from_pretrained` through the class training used (`model_class`): for Mixtral our per-expert
    class, so adapters trained on it load (merge, chat); anything else as transformers loads it.
    Safetensors only unless `allow_pickle`; no remote code."""
    require_safetensors(source, "base model", allow_pickle, "--allow-pickle")
    config = load_config(source, revision)
    return model_class(config).from_pretrained(source, revision=revision, config=config, **weights_kwargs(allow_pickle),
                                               **kwargs)


def build_model(
    model_cfg: Any,
    quant_cfg: Any,
    vocab_size: int,
    seed: int = 0,
    device_map: dict[str, Any] | str | None = "auto-rank",
    inline_base: str | os.PathLike | None = None,
    folder: str | os.PathLike | None = None,
):
    """The base causal LM: Hub id or inline architecture, quantised as `quant` says, on this rank's device.

    An inline model loads from `inline_base` (a folder made by `ensure_inline_base`), whose path the
    model then carries as its name, so adapters record it as their base; without one it is made in
    a temporary folder and named "" (tests and benchmarks that keep no run directory). `folder`, a
    local model folder, is loaded instead of either (DPO continuing a full fine-tune's model/)."""
    if device_map == "auto-rank":
        device_map = default_device_map()
    temporary = None
    if folder is not None:
        source, revision = str(folder), None
    elif model_cfg.architecture is not None and inline_base is not None:
        source, revision = str(inline_base), None
    elif model_cfg.architecture is not None:
        temporary = tempfile.mkdtemp(prefix="mistral_align_inline_")  # per process; removed once loaded
        source, revision = save_inline_base(model_cfg, vocab_size, seed, temporary), None
    else:
        source, revision = model_cfg.hub_id, model_cfg.revision
    allow_pickle = bool(getattr(model_cfg, "allow_pickle", False))
    require_safetensors(source, "model", allow_pickle)
    config = load_config(source, revision, model_cfg.trust_remote_code,
                         "set model.trust_remote_code=true if you trust that code")
    if config.vocab_size < vocab_size:
        raise ConfigError(
            f"model.tokenizer_version: tokenizer {model_cfg.tokenizer_version} has {vocab_size} tokens but "
            f"{model_cfg.name} has only {config.vocab_size} embeddings"
        )
    if model_cfg.sliding_window is not None:
        config.sliding_window = model_cfg.sliding_window or None
    try:
        model = model_class(config).from_pretrained(
            source,
            revision=revision,
            config=config,
            dtype=DTYPE[model_cfg.dtype],
            attn_implementation=model_cfg.attn_implementation,
            quantization_config=quantization_config(quant_cfg),
            device_map=device_map,
            # Safetensors only unless model.allow_pickle (a Hub repository with only .bin weights is
            # refused); remote code only with model.trust_remote_code.
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=model_cfg.trust_remote_code,
        )
    except OSError as e:
        if allow_pickle or "safetensors" not in str(e):
            raise
        raise UntrustedFileError(
            f"model: {source} has no safetensors weights ({str(e).splitlines()[0]}); set model.allow_pickle=true "
            "to load pickled ones if you trust where they came from"
        ) from None
    # Training runs without a KV cache: with one, transformers does not derive the packed-sequence
    # (block-diagonal) mask from position_ids. generate() still caches (generation_config.use_cache).
    model.config.use_cache = False
    # bitsandbytes silently breaks training after an eval-mode forward on AVX512-BF16 CPUs;
    # see model/bnb_cpu.py.
    disable_cpu_inference_repacking(model)
    if temporary is not None:
        shutil.rmtree(temporary, ignore_errors=True)
        # An inline model has no Hub id: an empty name keeps peft from looking one up on save.
        model.config.name_or_path = ""
        model.name_or_path = ""
    return model
