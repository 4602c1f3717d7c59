"""An inline model: a Mistral / Mixtral built from `model.architecture` with seeded random weights,
saved once as a plain transformers folder (the run directory's `base/`) so that it loads, is
quantised and names itself in adapters exactly as a Hub model does."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch

from mistral_align.errors import RunDirError
from mistral_align.files import follow_umask
from mistral_align.model.mixtral_unfused import UnfusedMixtralForCausalLM, hub_names
from mistral_align.model.plain_folder import stock_class_name


def inline_config(model_cfg: Any, vocab_size: int):
    """A transformers MistralConfig / MixtralConfig from `model.architecture` (vocab = the tokenizer's)."""
    from transformers import MistralConfig, MixtralConfig

    a = model_cfg.architecture
    common = dict(
        vocab_size=vocab_size,
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_hidden_layers,
        num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_key_value_heads,
        head_dim=a.head_dim or a.hidden_size // a.num_attention_heads,
        max_position_embeddings=a.max_position_embeddings,
        rope_theta=a.rope_theta,
        rms_norm_eps=a.rms_norm_eps,
        tie_word_embeddings=a.tie_word_embeddings,
        initializer_range=a.initializer_range,
        bos_token_id=1,
        eos_token_id=2,
        sliding_window=None,
    )
    if a.type == "mixtral":
        return MixtralConfig(
            **common,
            num_local_experts=a.num_local_experts,
            num_experts_per_tok=a.num_experts_per_tok,
            router_aux_loss_coef=a.router_aux_loss_coef,
            output_router_logits=True,
        )
    return MistralConfig(**common)


INLINE_BASE_FACTS = "mistral_align_base.json"


def save_inline_base(model_cfg: Any, vocab_size: int, seed: int, path: str | os.PathLike) -> str:
    """Random-init the inline architecture (seeded: the same weights on every rank and every rerun)
    and save it as a plain transformers folder (config.json, model.safetensors, float32), so that
    quantisation goes through the same `from_pretrained` path as a Hub model and every adapter
    trained on it names a base that loads."""
    config = inline_config(model_cfg, vocab_size)
    path = str(path)
    os.makedirs(path, exist_ok=True)
    torch.manual_seed(seed)
    from safetensors.torch import save_file
    from transformers import MistralForCausalLM

    cls = UnfusedMixtralForCausalLM if config.model_type == "mixtral" else MistralForCausalLM
    model = cls._from_config(config, dtype=torch.float32)
    # Not model.save_pretrained: under torch.distributed it writes on rank 0 only, and every rank
    # needs its own copy here.
    # The stock class name: the folder loads in stock transformers, TGI and vLLM (Mixtral: Hub layout).
    model.config.architectures = [stock_class_name(config.model_type)]
    model.config.to_json_file(os.path.join(path, "config.json"))
    state, seen = {}, set()
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen:  # tied weights (lm_head = embed_tokens) are stored once
            continue
        seen.add(v.data_ptr())
        state[k] = v.contiguous()
    if getattr(config, "model_type", None) == "mixtral":
        # The Hub's names (block_sparse_moe.experts.N.w1/w3/w2), so an inline Mixtral loads through
        # the same checkpoint conversion as a Hub one, and the folder loads in stock transformers.
        state = hub_names(state)
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    model.generation_config.to_json_file(os.path.join(path, "generation_config.json"))
    follow_umask(path)  # safetensors writes 0600; the base is read by whoever loads the adapter
    return path


def _inline_facts(model_cfg: Any, vocab_size: int, seed: int) -> dict[str, Any]:
    from omegaconf import OmegaConf

    arch = model_cfg.architecture
    arch = OmegaConf.to_container(arch, resolve=True) if OmegaConf.is_config(arch) else dict(vars(arch))
    return {"architecture": arch, "vocab_size": vocab_size, "seed": seed}


def ensure_inline_base(model_cfg: Any, vocab_size: int, seed: int, path: str | os.PathLike,
                       remake_other: bool = False) -> str:
    """The run directory's `base/` for an inline model: made once (call it on the main process
    first), reused by later stages and reruns, refused if it was made from other settings, unless
    `remake_other` (nothing was trained on it yet): then it is made again from these."""
    facts = _inline_facts(model_cfg, vocab_size, seed)
    marker = os.path.join(str(path), INLINE_BASE_FACTS)
    if os.path.isfile(marker):
        found = json.loads(open(marker).read())
        if found != facts and remake_other:
            shutil.rmtree(path)
            return ensure_inline_base(model_cfg, vocab_size, seed, path)
        if found != facts:
            changed = sorted(k for k in facts if found.get(k) != facts[k])
            raise RunDirError(
                f"{path}: this run directory's base model was made with other settings ({', '.join(changed)} "
                "differ); use a new run.dir, or the settings it was made with"
            )
        return str(path)
    save_inline_base(model_cfg, vocab_size, seed, path)
    with open(marker, "w") as f:
        json.dump(facts, f, indent=2)
    return str(path)
