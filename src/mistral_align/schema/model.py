"""The shared nodes that say which model trains and how: `model`, `quant`, `peft`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from mistral_align.errors import ConfigError
from mistral_align.names import TOKENIZER_VERSIONS
from mistral_align.schema.rules import at_least, choice

DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
ARCHITECTURES = ("mistral", "mixtral")
QUANT_MODES = ("none", "nf4", "fp4", "int8")
PEFT_METHODS = ("none", "lora")


@dataclass
class ArchitectureConfig:
    """An inline model architecture: random init seeded by run.seed, no download, saved as the run
    directory's base/ (model/inline.py). The numbers are the fields of the same name of transformers'
    MistralConfig / MixtralConfig (a config.json); vocab_size comes from the tokenizer, and the sliding
    window is off unless model.sliding_window sets one."""

    type: str = "mistral"  # mistral | mixtral
    hidden_size: int = 256  # the residual width, >= 1; a multiple of num_attention_heads unless head_dim is set
    intermediate_size: int = 512  # the MLP's width, >= 1 (mixtral: each expert's)
    num_hidden_layers: int = 2  # decoder layers, >= 1
    num_attention_heads: int = 8  # query heads, >= 1
    num_key_value_heads: int = 4  # key/value heads, >= 1, a divisor of num_attention_heads (fewer: grouped-query)
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096  # written to config.json as given; not checked against data.max_length
    rope_theta: float = 10000.0  # the RoPE base (transformers 5 keeps it in config.json's rope_parameters)
    rms_norm_eps: float = 1e-5  # the epsilon of every RMSNorm
    tie_word_embeddings: bool = False  # the output head shares embed_tokens' weight
    initializer_range: float = 0.02  # the standard deviation of the random init
    # mixtral: experts per layer (type mistral ignores the three mixtral keys).
    num_local_experts: int = 4
    num_experts_per_tok: int = 2  # mixtral: experts each token is routed to, 1..num_local_experts
    # mixtral: the weight of the router's load-balancing loss, which TRL adds to the training loss (0: none;
    # train.extra.router_aux_loss_coef overrides it).
    router_aux_loss_coef: float = 0.02


@dataclass
class ShapeConfig:
    """A Hub model's architecture numbers (its config.json), so `mistral-align estimate` needs no
    download. Informational: the weights and the real config still come from the Hub. Each key is
    the config.json field of the same name, copied as it is; none is range-checked."""

    type: str = "mistral"  # mistral | mixtral
    hidden_size: int = 4096  # the residual width
    intermediate_size: int = 14336  # the MLP's width (mixtral: each expert's)
    num_hidden_layers: int = 32  # decoder layers
    num_attention_heads: int = 32  # query heads
    num_key_value_heads: int = 8  # key/value heads
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    vocab_size: int = 32000  # the embedding rows (and the output head's, unless tied)
    tie_word_embeddings: bool = False  # true: no separate output head is counted
    # mixtral: experts per layer (0, or type mistral: a dense MLP).
    num_local_experts: int = 0
    num_experts_per_tok: int = 2  # mixtral: experts each token is routed to (their activations are counted)


@dataclass
class ModelConfig:
    # A label for the model in logs, manifest.json and `estimate` (the configs/model file's name); it is
    # not what loads (hub_id or architecture).
    name: str = "???"
    # Exactly one of hub_id / architecture.
    hub_id: Optional[str] = None
    # The branch, tag or commit of hub_id that its config, weights and tokenizer file are read at; None:
    # the default branch. chat and merge load the run's base at the same one; push records it in
    # adapter_config.json. Unused inline.
    revision: Optional[str] = None
    architecture: Optional[ArchitectureConfig] = None
    # The Mistral tokenizer this model was trained with (v1, v2, v3, v7, v3-tekken, v7-tekken, v11, v13): the chat format follows.
    tokenizer_version: str = "???"
    # The tokenizer file to encode with (a local tekken.json or tokenizer.model.vN). None: a Hub model's
    # own file from its repository (model/tokenizer_file.py), an inline model's from mistral-common.
    tokenizer_file: Optional[str] = None
    # Weights dtype for the layers that are not quantised.
    dtype: str = "bfloat16"
    # transformers' attention kernel: sdpa | eager | flash_attention_2 | flash_attention_3 | flex_attention
    # (the flash ones need their own package and a GPU). dpo.shared_prompt needs sdpa or eager.
    attn_implementation: str = "sdpa"
    # None keeps the model's own setting; an int sets the sliding-window size; 0 disables it.
    sliding_window: Optional[int] = None
    # Run the model repository's own Python code (config.json `auto_map`). Off: stock classes only.
    trust_remote_code: bool = False
    # Load weights (base model, dpo.init_from adapter) from pickle files (.bin / .pt), which can run
    # code when loaded. Off: safetensors only, a folder or repository with only pickles is refused.
    allow_pickle: bool = False
    # A Hub model's architecture numbers, for `mistral-align estimate` (None: unknown).
    shape: Optional[ShapeConfig] = None


def check_model(m: Any) -> None:
    choice(m.tokenizer_version, "model.tokenizer_version", TOKENIZER_VERSIONS)
    choice(m.dtype, "model.dtype", DTYPES)
    choice(m.attn_implementation, "model.attn_implementation", ATTN_IMPLEMENTATIONS)
    if (m.hub_id is None) == (m.architecture is None):
        raise ConfigError("model: set exactly one of model.hub_id (a Hub model) or model.architecture (inline)")
    if m.architecture is not None:
        a = m.architecture
        choice(a.type, "model.architecture.type", ARCHITECTURES)
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            at_least(a[key], f"model.architecture.{key}", 1)
        if a.hidden_size % a.num_attention_heads and a.head_dim is None:
            raise ConfigError("model.architecture.hidden_size: must be divisible by num_attention_heads")
        if a.num_attention_heads % a.num_key_value_heads:
            raise ConfigError("model.architecture.num_key_value_heads: must divide num_attention_heads")
        if a.type == "mixtral" and not 1 <= a.num_experts_per_tok <= a.num_local_experts:
            raise ConfigError("model.architecture.num_experts_per_tok: must be between 1 and num_local_experts")
    if m.sliding_window is not None:
        at_least(m.sliding_window, "model.sliding_window", 0)


@dataclass
class QuantConfig:
    mode: str = "none"  # none | nf4 | fp4 | int8
    # nf4 / fp4: quantise the 4-bit layers' per-block scales too (bitsandbytes' double quantisation),
    # about 0.37 bits a weight less. int8 ignores it.
    double_quant: bool = True
    # The dtype 4-bit layers compute in. bfloat16 on GPUs; on the CPU bitsandbytes runs float32 about 2x faster.
    compute_dtype: str = "bfloat16"
    # The dtype the packed 4-bit weights are stored in. FSDP needs it equal to the other weights (bfloat16).
    storage_dtype: str = "uint8"
    # Modules kept in full precision.
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])


def check_quant(q: Any) -> None:
    choice(q.mode, "quant.mode", QUANT_MODES)
    choice(q.compute_dtype, "quant.compute_dtype", DTYPES)
    choice(q.storage_dtype, "quant.storage_dtype", ("uint8", *DTYPES))


@dataclass
class PeftConfig:
    """The adapter (`peft`): LoRA through peft's LoraConfig, or none (full fine-tune). The other keys
    are LoRA's; peft.method=none ignores them."""

    method: str = "lora"  # lora | none (full fine-tune)
    r: int = 16  # the LoRA rank (> 0): the inner width of each adapted layer's A and B matrices
    alpha: int = 32  # > 0; the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)
    # The dropout probability on each LoRA layer's input, in [0, 1). The whole adapter uses 0 (with a
    # warning) when train_router puts LoRA on a MoE model's router weight.
    dropout: float = 0.05
    # "all-linear" = every nn.Linear except the output head; or explicit module names.
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # MoE models (Mixtral): LoRA on every expert's gate/up/down projections too (per-expert linears,
    # model/mixtral_unfused.py); false leaves the experts alone.
    experts: bool = True
    # MoE models: the router (`mlp.gate`) is left alone unless this is true.
    train_router: bool = False
    # Modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head for a new vocabulary).
    modules_to_save: list[str] = field(default_factory=list)
    # Keep tied input/output embeddings tied when one of them is in modules_to_save.
    ensure_weight_tying: bool = False
    use_rslora: bool = False  # rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r
    # Which bias vectors train too: none | all | lora_only (those of the adapted layers). Mistral's and
    # Mixtral's linear layers have no bias.
    bias: str = "none"


def check_peft(p: Any, quant_mode: str) -> None:
    choice(p.method, "peft.method", PEFT_METHODS)
    if p.method == "lora":
        at_least(p.r, "peft.r", 0, strict=True)
        at_least(p.alpha, "peft.alpha", 0, strict=True)
        if not 0.0 <= p.dropout < 1.0:
            raise ConfigError(f"peft.dropout: must be in [0, 1), got {p.dropout}")
        choice(p.bias, "peft.bias", ("none", "all", "lora_only"))
    if quant_mode != "none" and p.method == "none":
        raise ConfigError("peft.method: 'none' (full fine-tune) cannot train quantised weights; use quant=none or peft=lora")
