"""The adapter: LoRA on every linear layer (Mixtral's experts included) or the named ones, and the
preparation a base needs before a new or loaded adapter goes on it.

    model = apply_peft(model, cfg.peft, quantized=cfg.quant.mode != "none", gradient_checkpointing=True)
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Any

import torch

from mistral_align.model.mixtral_unfused import EXPERT_NAMES

log = logging.getLogger(__name__)


def is_moe(model) -> bool:
    return getattr(model.config, "num_local_experts", 0) > 0


def linear_module_names(model) -> list[str]:
    """Leaf names of every linear layer (plain, 4-bit or 8-bit) except the output head: q_proj, ..."""
    head = model.get_output_embeddings()
    return sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    )


def lora_config(peft_cfg: Any, model) -> Any:
    """peft LoraConfig: all linear layers (or the named ones); for MoE models the experts too.

    Mixtral loads as model/mixtral_unfused.py's class, whose experts are ordinary linears
    (`mlp.experts.N.gate_proj/up_proj/down_proj`): "all-linear" covers them like any other layer.
    The router (`mlp.gate`, a plain parameter) is not a linear and is left alone unless
    peft.train_router (then through peft `target_parameters`)."""
    from peft import LoraConfig

    targets = list(peft_cfg.target_modules)
    target_modules = linear_module_names(model) if targets == ["all-linear"] else targets
    if is_moe(model) and not peft_cfg.experts and targets == ["all-linear"]:
        target_modules = [n for n in target_modules if n not in EXPERT_NAMES]
    target_parameters = []
    dropout = peft_cfg.dropout
    if is_moe(model) and peft_cfg.train_router:
        target_parameters.append("mlp.gate.weight")
    if target_parameters and dropout:
        log.warning("peft.dropout=%s: LoRA on the router weight (a parameter) supports no dropout; using 0", dropout)
        dropout = 0.0
    return LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        target_parameters=target_parameters or None,
        modules_to_save=list(peft_cfg.modules_to_save) or None,
        ensure_weight_tying=peft_cfg.ensure_weight_tying,
        use_rslora=peft_cfg.use_rslora,
        bias=peft_cfg.bias,
        task_type="CAUSAL_LM",
    )


@contextmanager
def _no_checkpointing_probe_warning():
    """peft 0.21 wraps every model after asking `model.is_gradient_checkpointing`, a property
    transformers 5.23 deprecated with a FutureWarning: printed on every merge, chat and training
    start, about a call no user makes. Only that warning is silenced, only while peft wraps."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def attach_adapter(model, adapter_dir: str, **kwargs):
    """`PeftModel.from_pretrained(model, adapter_dir, **kwargs)`, without peft's deprecation noise."""
    from peft import PeftModel

    with _no_checkpointing_probe_warning():
        return PeftModel.from_pretrained(model, adapter_dir, **kwargs)


def apply_peft(model, peft_cfg: Any, quantized: bool, gradient_checkpointing: bool):
    """Wrap `model` in a LoRA adapter (or leave it whole for full fine-tuning, peft.method=none)."""
    if peft_cfg.method == "none":
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    from peft import get_peft_model

    model = prepare_for_adapter(model, quantized, gradient_checkpointing)
    with _no_checkpointing_probe_warning():
        return get_peft_model(model, lora_config(peft_cfg, model))


def prepare_for_adapter(model, quantized: bool, gradient_checkpointing: bool):
    """Ready a base model for a (new or loaded) adapter: k-bit preparation, gradient checkpointing."""
    from peft import prepare_model_for_kbit_training

    if quantized:
        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model
