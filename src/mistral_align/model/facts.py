"""Facts about a built model for the manifest: parameter counts, quantised layers, bytes by dtype and kind."""

from __future__ import annotations

from typing import Any

import torch


def count_linear_layers(model) -> dict[str, int]:
    """How many linear layers are 4-bit, 8-bit, or full precision (LoRA's own small layers excluded)."""
    import bitsandbytes as bnb

    counts = {"linear_4bit": 0, "linear_8bit": 0, "linear_full": 0}
    for name, module in model.named_modules():
        if ".lora_" in name or name.split(".")[-1].startswith("lora_"):
            continue
        if isinstance(module, bnb.nn.Linear4bit):
            counts["linear_4bit"] += 1
        elif isinstance(module, bnb.nn.Linear8bitLt):
            counts["linear_8bit"] += 1
        elif isinstance(module, torch.nn.Linear) and not hasattr(module, "base_layer"):
            counts["linear_full"] += 1
    return counts


def module_kind(name: str) -> str:
    """attention | experts | router | mlp | embeddings | norms | lora | other, from a parameter's name."""
    if ".lora_" in name or "modules_to_save" in name:
        return "lora"
    if "embed_tokens" in name or "lm_head" in name:
        return "embeddings"
    if ".self_attn." in name:
        return "attention"
    if ".experts." in name:
        return "experts"
    if ".mlp.gate." in name or name.endswith(".mlp.gate.weight"):
        return "router"
    if ".mlp." in name:
        return "mlp"
    if "norm" in name:
        return "norms"
    return "other"


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def parameter_bytes(model) -> dict[str, Any]:
    """Bytes the parameters hold, measured from the tensors, by dtype and by module kind.

    A bitsandbytes 4-bit weight counts its packed bytes (dtype "nf4 (packed)") and its quant state
    (absmax, code table, and with double quant the nested absmax, offset and code: "quant_state");
    an 8-bit weight its int8 bytes and its per-row fp32 scales (SCB, "quant_state"). Tensors
    shared between parameters (tied weights) are counted once."""
    by_dtype: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    seen: set[int] = set()

    def add(kind: str, dtype: str, b: int) -> None:
        by_dtype[dtype] = by_dtype.get(dtype, 0) + b
        by_kind[kind] = by_kind.get(kind, 0) + b

    for name, p in model.named_parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        kind = module_kind(name)
        cls = p.__class__.__name__
        if cls == "Params4bit" and getattr(p, "quant_state", None) is not None:
            qs = p.quant_state
            add(kind, f"{qs.quant_type} (packed)", _tensor_bytes(p.data))
            state = [qs.absmax, qs.code]
            if qs.nested:
                state += [qs.offset, qs.state2.absmax, qs.state2.code]
            add(kind, "quant_state", sum(_tensor_bytes(t) for t in state))
        elif cls == "Int8Params":
            add(kind, "int8" if p.dtype == torch.int8 else str(p.dtype).replace("torch.", ""), _tensor_bytes(p.data))
            scb = getattr(p, "SCB", None)
            if scb is not None:
                add(kind, "quant_state", _tensor_bytes(scb))
        else:
            add(kind, str(p.dtype).replace("torch.", ""), _tensor_bytes(p.data))
    return {"total": sum(by_dtype.values()), "by_dtype": by_dtype, "by_kind": by_kind}


def model_facts(model) -> dict[str, Any]:
    """Model facts for the manifest: parameter counts, quantised layers, architecture."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for p in model.parameters():
        # a packed 4-bit tensor holds two weights per byte
        total += p.numel() * 2 if p.__class__.__name__ == "Params4bit" else p.numel()
    config = model.config
    return {
        "model_type": config.model_type,
        "name_or_path": getattr(config, "name_or_path", None),
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_local_experts": getattr(config, "num_local_experts", None),
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "sliding_window": getattr(config, "sliding_window", None),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": trainable / max(total, 1),
        **count_linear_layers(model),
        "parameter_bytes": parameter_bytes(model),
    }
