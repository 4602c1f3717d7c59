"""Base model (Mistral / Mixtral, from the Hub or an inline architecture), quantisation and LoRA.

    model = build_model(cfg.model, cfg.quant, vocab_size=encoder.vocab_size, seed=cfg.run.seed)
    model = apply_peft(model, cfg.peft, quantized=cfg.quant.mode != "none", gradient_checkpointing=True)
    facts = model_facts(model)   # trainable params, 4-bit / 8-bit linear layers, ... (for the manifest)

Under `accelerate launch` every rank loads its own copy onto its own device (`device_map={"": device}`,
`default_device_map()`); under FSDP / DeepSpeed ZeRO-3 the device map is left to them (None).
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import torch

from mistral_align.errors import ConfigError, RunDirError, UntrustedFileError

log = logging.getLogger(__name__)

DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Weight files that torch.load unpickles (and so may run code). Loading them needs an explicit yes.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Leaf names of the per-expert linears of model/mixtral_unfused.py (the Hub's w1 / w3 / w2).
EXPERT_LINEAR_NAMES = ("gate_proj", "up_proj", "down_proj")


def default_device_map() -> dict[str, Any] | None:
    """Each process's whole model on its own device; None under FSDP / DeepSpeed (they place it)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return None
    from accelerate import PartialState

    return {"": PartialState().device}


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
    cls = model_class(config)
    model = (cls.from_config if cls.__name__.startswith("Auto") else cls._from_config)(config, dtype=torch.float32)
    # Not model.save_pretrained: under torch.distributed it writes on rank 0 only, and every rank
    # needs its own copy here.
    from safetensors.torch import save_file

    # The stock class name: the folder loads in stock transformers, TGI and vLLM (Mixtral: Hub layout).
    model.config.architectures = ["MixtralForCausalLM" if config.model_type == "mixtral" else "MistralForCausalLM"]
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
        from mistral_align.model.mixtral_unfused import hub_names

        state = hub_names(state)
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    model.generation_config.to_json_file(os.path.join(path, "generation_config.json"))
    from mistral_align.model.files import follow_umask

    follow_umask(path)  # safetensors writes 0600; the base is read by whoever loads the adapter
    return path


def _inline_facts(model_cfg: Any, vocab_size: int, seed: int) -> dict[str, Any]:
    from omegaconf import OmegaConf

    arch = model_cfg.architecture
    arch = OmegaConf.to_container(arch, resolve=True) if OmegaConf.is_config(arch) else dict(vars(arch))
    return {"architecture": arch, "vocab_size": vocab_size, "seed": seed}


def ensure_inline_base(model_cfg: Any, vocab_size: int, seed: int, path: str | os.PathLike) -> str:
    """The run directory's `base/` for an inline model: made once (call it on the main process
    first), reused by later stages and reruns, refused if it was made from other settings."""
    import json

    facts = _inline_facts(model_cfg, vocab_size, seed)
    marker = os.path.join(str(path), INLINE_BASE_FACTS)
    if os.path.isfile(marker):
        found = json.loads(open(marker).read())
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


def model_class(config):
    """The class a config loads into: Mixtral -> our per-expert-linear Mixtral (model/mixtral_unfused.py),
    so quantisation reaches every expert; anything else -> transformers' AutoModelForCausalLM."""
    if getattr(config, "model_type", None) == "mixtral":
        from mistral_align.model.mixtral_unfused import UnfusedMixtralForCausalLM

        return UnfusedMixtralForCausalLM
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def require_safetensors(folder: str | os.PathLike, what: str, allow_pickle: bool = False,
                        how_to_allow: str = "model.allow_pickle=true") -> None:
    """A local weights folder must hold safetensors: one whose weights are only pickles is refused
    (UntrustedFileError) unless `allow_pickle`. Not a folder (a Hub id): nothing to look at here."""
    from pathlib import Path

    folder = Path(folder)
    if allow_pickle or not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UntrustedFileError(
            f"{folder}: the {what} weights are only pickles ({', '.join(pickles)}), which can run code when loaded; "
            f"re-save them as safetensors, or pass {how_to_allow} if you trust where they came from"
        )


def weights_kwargs(allow_pickle: bool = False) -> dict[str, Any]:
    """from_pretrained keywords: safetensors only unless pickles are allowed, and never the repository's
    own Python code (a config.json with `auto_map` would otherwise import it)."""
    return {"use_safetensors": None if allow_pickle else True, "trust_remote_code": False}


def load_config(source: str, revision: str | None = None, trust_remote_code: bool = False,
                how_to_allow: str = "mistral-align loads the stock Mistral / Mixtral classes only"):
    """AutoConfig for `source`; one whose config.json names the repository's own code (`auto_map`) is
    refused (UntrustedFileError) unless `trust_remote_code`: that code would run on loading."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if trust_remote_code or "trust_remote_code" not in str(e):
            raise
        raise UntrustedFileError(
            f"{source}: its config.json asks to run the repository's own Python code (auto_map); {how_to_allow}"
        ) from None


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
):
    """The base causal LM: Hub id or inline architecture, quantised as `quant` says, on this rank's device.

    An inline model loads from `inline_base` (a folder made by `ensure_inline_base`), whose path the
    model then carries as its name, so adapters record it as their base; without one it is made in
    a temporary folder and named "" (tests and benchmarks that keep no run directory)."""
    if device_map == "auto-rank":
        device_map = default_device_map()
    temporary = None
    if model_cfg.architecture is not None and inline_base is not None:
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
    from mistral_align.model.bnb_cpu import disable_cpu_inference_repacking

    disable_cpu_inference_repacking(model)
    if temporary is not None:
        import shutil

        shutil.rmtree(temporary, ignore_errors=True)
        # An inline model has no Hub id: an empty name keeps peft from looking one up on save.
        model.config.name_or_path = ""
        model.name_or_path = ""
    return model


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
        target_modules = [n for n in target_modules if n not in EXPERT_LINEAR_NAMES]
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


def apply_peft(model, peft_cfg: Any, quantized: bool, gradient_checkpointing: bool):
    """Wrap `model` in a LoRA adapter (or leave it whole for full fine-tuning, peft.method=none)."""
    if peft_cfg.method == "none":
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    from peft import get_peft_model

    model = prepare_for_adapter(model, quantized, gradient_checkpointing)
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
