"""Typed configuration: the schema every Hydra config under `configs/` is checked against.

The dataclasses below are registered in Hydra's ConfigStore (`register_configs()`), and the primary
configs (`configs/sft.yaml`, ...) start their defaults list with the schema, so:

- a misspelt key (in a YAML file or on the command line) fails at start with
  `Key 'lrr' not in 'TrainConfig'` / `Could not override 'train.lrr'`, naming the key;
- a wrong type fails at start too (`train.lr: Value 'fast' could not be converted to Float`);
- values with a fixed set of choices, and cross-field rules, are checked by `check_config`, which
  raises `ConfigError` naming the key (`quant.mode: 'nf5' is not one of none, nf4, int8`).

Everything a recipe needs is here; the recipe calls `check_config(cfg)` before loading anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from mistral_align.data.config import DataConfig

DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
ARCHITECTURES = ("mistral", "mixtral")
QUANT_MODES = ("none", "nf4", "fp4", "int8")
PEFT_METHODS = ("none", "lora")
REPORT_TO = ("none", "wandb", "tensorboard")
WANDB_MODES = ("auto", "online", "offline", "disabled")
PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message starts with the key."""


@dataclass
class ArchitectureConfig:
    """An inline model architecture (random init, no download). vocab_size comes from the tokenizer."""

    type: str = "mistral"  # mistral | mixtral
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: Optional[int] = None
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Mixtral only
    num_local_experts: int = 4
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.02


@dataclass
class ShapeConfig:
    """A Hub model's architecture numbers (its config.json), so `estimate` needs no download.

    Issue 9 (model/estimate.py). Informational for Hub models: the weights still come from the Hub."""

    type: str = "mistral"  # mistral | mixtral
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: Optional[int] = None
    vocab_size: int = 32000
    tie_word_embeddings: bool = False
    # Mixtral only (0 = dense)
    num_local_experts: int = 0
    num_experts_per_tok: int = 2


@dataclass
class ModelConfig:
    name: str = "???"
    # Exactly one of hub_id / architecture.
    hub_id: Optional[str] = None
    revision: Optional[str] = None
    architecture: Optional[ArchitectureConfig] = None
    # The Mistral tokenizer this model was trained with (v1, v2, v3, v7, v3-tekken): the chat format follows.
    tokenizer_version: str = "???"
    # Weights dtype for the layers that are not quantised.
    dtype: str = "bfloat16"
    attn_implementation: str = "sdpa"
    # None keeps the model's own setting; an int sets the sliding-window size; 0 disables it.
    sliding_window: Optional[int] = None
    trust_remote_code: bool = False
    # Issue 9: architecture numbers of a Hub model for `mistral-align estimate` (None: unknown).
    shape: Optional[ShapeConfig] = None


@dataclass
class QuantConfig:
    mode: str = "none"  # none | nf4 | fp4 | int8
    double_quant: bool = True
    # The dtype 4-bit layers compute in. bfloat16 on GPUs; on the CPU bitsandbytes runs float32 about 2x faster.
    compute_dtype: str = "bfloat16"
    # The dtype the packed 4-bit weights are stored in. FSDP needs it equal to the other weights (bfloat16).
    storage_dtype: str = "uint8"
    # Modules kept in full precision.
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])


@dataclass
class PeftConfig:
    method: str = "lora"  # lora | none (full fine-tune)
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # "all-linear" = every nn.Linear except the output head; or explicit module names.
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # MoE models (Mixtral): put LoRA on the experts' fused weights too (peft target_parameters).
    experts: bool = True
    # MoE models: the router (`mlp.gate`) is left alone unless this is true.
    train_router: bool = False
    # Modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head for a new vocabulary).
    modules_to_save: list[str] = field(default_factory=list)
    # Keep tied input/output embeddings tied when one of them is in modules_to_save.
    ensure_weight_tying: bool = False
    use_rslora: bool = False
    bias: str = "none"


@dataclass
class TrainConfig:
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    lr: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    per_device_batch_size: int = 4
    per_device_eval_batch_size: int = 8
    grad_accum: int = 1
    # Pack several conversations per row; attention never crosses their boundaries (padding-free).
    packing: bool = True
    packing_strategy: str = "bfd"
    # Sequence length of a packed row; None uses data.max_length.
    max_length: Optional[int] = None
    gradient_checkpointing: bool = True
    # Mixed precision for the non-quantised parts: "auto" = bf16 on GPUs that support it, else off.
    bf16: str = "auto"  # auto | true | false
    logging_steps: int = 10
    eval_steps: Optional[int] = None  # None: evaluate at the end only
    save_steps: int = 500
    save_total_limit: Optional[int] = 2
    dataloader_num_workers: int = 0
    # Extra keyword arguments passed to trl.SFTConfig verbatim (escape hatch; typos fail there).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """Held-out evaluation: loss before/after, and greedy generation scored by exact match."""

    loss_before: bool = True
    generate: bool = False
    max_prompts: int = 64
    max_new_tokens: int = 32
    batch_size: int = 16


@dataclass
class SyntheticConfig:
    """Skills data generated by code (mistral_align.data.synthetic); replaces data.train/eval when enabled."""

    enabled: bool = False
    skills: list[str] = field(default_factory=lambda: ["copy", "reverse", "add", "upper"])
    n_train: int = 2000
    n_eval: int = 64
    seed: int = 0
    # SFT only: {skill: fraction} of training replies replaced by a plausible wrong one.
    noise: dict[str, float] = field(default_factory=dict)


@dataclass
class RunConfig:
    output_dir: str = "runs"
    name: str = "sft"
    # A fixed run directory (absolute, or under output_dir); None = <output_dir>/<name>-<timestamp>.
    dir: Optional[str] = None
    seed: int = 42
    report_to: str = "none"  # none | wandb | tensorboard
    wandb_project: str = "mistral-align"
    wandb_entity: Optional[str] = None
    # auto: online when WANDB_API_KEY is set (or wandb is logged in), offline otherwise.
    wandb_mode: str = "auto"
    # Print the before/after table and write summary.json (the demo sets this).
    summary: bool = True


@dataclass
class DPOStageConfig:
    """The DPO stage (`dpo.*`): its own data, optimiser and evaluation, plus the DPO objective.

    recipes/dpo.py and recipes/sft_dpo.py read it; recipes/sft.py ignores it. The model, quant,
    peft and run nodes are shared with the SFT stage (DPO trains the SFT adapter further).
    """

    # recipes/dpo.py: the SFT adapter to start from (an SFT run directory, an adapter folder or a
    # Hub adapter id); it is also the DPO reference. recipes/sft_dpo.py sets it to its own SFT stage.
    init_from: Optional[str] = None
    beta: float = 0.1
    # One or more of TRL's DPO losses (sigmoid, ipo, hinge, robust, ...), summed.
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    # One weight per loss_type; None weighs them all 1. ["sigmoid", "sft"] with [1, w] adds w x the
    # chosen replies' NLL (as RPO does), which keeps DPO from lowering the chosen replies' likelihood.
    loss_weights: Optional[list[float]] = None
    label_smoothing: float = 0.0
    # Score every pair with the reference once before training, instead of at every step.
    precompute_ref_log_probs: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dpo: DPOStageConfig = field(default_factory=DPOStageConfig)


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore (idempotent). `configs/sft.yaml` starts with `sft_schema`."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="sft_schema", node=SFTConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="quant", name="quant_schema", node=QuantConfig)
    cs.store(group="peft", name="peft_schema", node=PeftConfig)
    cs.store(group="train", name="train_schema", node=TrainConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)


def _choice(cfg: Any, key: str, choices: tuple[str, ...]) -> None:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")


def check_config(cfg: Any, stage_data: bool = True) -> None:
    """Checks that types alone cannot: choices and cross-field rules. Raises ConfigError naming the key.

    `stage_data=False` skips the SFT stage's data check (recipes/dpo.py trains no SFT stage)."""
    from mistral_align.chat.encoder import TOKENIZER_VERSIONS

    m = cfg.model
    _choice(cfg, "model.tokenizer_version", TOKENIZER_VERSIONS)
    _choice(cfg, "model.dtype", DTYPES)
    _choice(cfg, "model.attn_implementation", ATTN_IMPLEMENTATIONS)
    if (m.hub_id is None) == (m.architecture is None):
        raise ConfigError("model: set exactly one of model.hub_id (a Hub model) or model.architecture (inline)")
    if m.architecture is not None:
        _choice(cfg, "model.architecture.type", ARCHITECTURES)
        a = m.architecture
        if a.hidden_size % a.num_attention_heads and a.head_dim is None:
            raise ConfigError("model.architecture.hidden_size: must be divisible by num_attention_heads")
        if a.num_attention_heads % a.num_key_value_heads:
            raise ConfigError("model.architecture.num_key_value_heads: must divide num_attention_heads")
    if m.sliding_window is not None and m.sliding_window < 0:
        raise ConfigError("model.sliding_window: must be >= 0 (0 disables it) or null")
    _choice(cfg, "quant.mode", QUANT_MODES)
    _choice(cfg, "quant.compute_dtype", DTYPES)
    _choice(cfg, "quant.storage_dtype", ("uint8", *DTYPES))
    _choice(cfg, "peft.method", PEFT_METHODS)
    if cfg.peft.method == "lora":
        if cfg.peft.r <= 0:
            raise ConfigError(f"peft.r: must be > 0, got {cfg.peft.r}")
        if not 0.0 <= cfg.peft.dropout < 1.0:
            raise ConfigError(f"peft.dropout: must be in [0, 1), got {cfg.peft.dropout}")
    if cfg.quant.mode != "none" and cfg.peft.method == "none":
        raise ConfigError("peft.method: 'none' (full fine-tune) cannot train quantised weights; use quant=none or peft=lora")
    _choice(cfg, "train.packing_strategy", PACKING_STRATEGIES)
    _choice(cfg, "train.bf16", ("auto", "true", "false", True, False))
    for key in ("lr", "epochs"):
        if cfg.train[key] <= 0:
            raise ConfigError(f"train.{key}: must be > 0, got {cfg.train[key]}")
    for key in ("per_device_batch_size", "grad_accum", "logging_steps", "save_steps"):
        if cfg.train[key] < 1:
            raise ConfigError(f"train.{key}: must be >= 1, got {cfg.train[key]}")
    _choice(cfg, "run.report_to", REPORT_TO)
    _choice(cfg, "run.wandb_mode", WANDB_MODES)
    _choice(cfg, "data.train_on", ("all", "last"))
    _choice(cfg, "data.on_bad_rows", ("error", "skip"))
    _choice(cfg, "data.on_long_rows", ("error", "skip", "truncate"))
    if cfg.synthetic.enabled:
        from mistral_align.data.synthetic import SKILLS

        for i, s in enumerate(cfg.synthetic.skills):
            if s not in SKILLS:
                raise ConfigError(f"synthetic.skills[{i}]: {s!r} is not one of {', '.join(SKILLS)}")
    elif stage_data and not cfg.data.train:
        raise ConfigError("data.train: no training source (pick data=... or set synthetic.enabled=true)")


def packed_length(cfg: Any) -> int:
    return cfg.train.max_length if cfg.train.max_length is not None else cfg.data.max_length


def check_dpo_config(cfg: Any) -> None:
    """check_config's rules for the shared nodes, plus the DPO stage's (`dpo.*`)."""
    from mistral_align.train.dpo import DPO_LOSS_TYPES

    check_config(cfg, stage_data=False)
    d = cfg.dpo
    if d.beta <= 0:
        raise ConfigError(f"dpo.beta: must be > 0, got {d.beta}")
    if not d.loss_type:
        raise ConfigError("dpo.loss_type: name at least one loss")
    for i, loss in enumerate(d.loss_type):
        if loss not in DPO_LOSS_TYPES:
            raise ConfigError(f"dpo.loss_type[{i}]: {loss!r} is not one of {', '.join(DPO_LOSS_TYPES)}")
    if d.loss_weights is not None and len(d.loss_weights) != len(d.loss_type):
        raise ConfigError(f"dpo.loss_weights: {len(d.loss_weights)} weights for {len(d.loss_type)} loss types")
    if not 0.0 <= d.label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing: must be in [0, 0.5), got {d.label_smoothing}")
    _choice(cfg, "dpo.data.on_bad_rows", ("error", "skip"))
    _choice(cfg, "dpo.data.on_long_rows", ("error", "skip"))
    for key in ("lr", "epochs"):
        if d.train[key] <= 0:
            raise ConfigError(f"dpo.train.{key}: must be > 0, got {d.train[key]}")
    if d.synthetic.enabled:
        from mistral_align.data.synthetic import SKILLS

        for i, s in enumerate(d.synthetic.skills):
            if s not in SKILLS:
                raise ConfigError(f"dpo.synthetic.skills[{i}]: {s!r} is not one of {', '.join(SKILLS)}")
    elif not d.data.train:
        raise ConfigError("dpo.data.train: no preference data (pick data@dpo.data=... or set dpo.synthetic.enabled=true)")
