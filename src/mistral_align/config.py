"""Typed configuration: the schema every Hydra config under `configs/` is checked against.

One shape for every recipe: the shared nodes `model`, `quant`, `peft`, `run` at the top, and one
node per stage, each with its own schema:

    sft: {data, train, eval, synthetic}                                   SFTStageConfig
    dpo: {init_from, beta, loss_type, ..., data, train, eval, synthetic}  DPOStageConfig

so `sft.train.lr=1e-4` and `dpo.beta=0.1` are spelt the same in every recipe that runs that stage.
`RecipeConfig` is registered in Hydra's ConfigStore (`register_configs()`) and the primary configs
start their defaults list with it, so a misspelt key or a wrong type fails at start naming the key.
`check_config(cfg, stages)` then checks what types cannot (choices, ranges, cross-field rules)
before anything loads, raising `ConfigError("sft.train.lr: must be > 0, got 0.0")`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from mistral_align.data.config import DataConfig, SFTDataConfig, check_data_config
from mistral_align.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
ARCHITECTURES = ("mistral", "mixtral")
QUANT_MODES = ("none", "nf4", "fp4", "int8")
PEFT_METHODS = ("none", "lora")
REPORT_TO = ("none", "wandb", "tensorboard")
WANDB_MODES = ("auto", "online", "offline", "disabled")
PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")
BF16 = ("auto", "true", "false")
ON_NONFINITE = ("stop", "skip")
# Keys that name a credential (hub_token, api_key, password, ...). Such values are never taken from a
# config: config.yaml, the pickled trainer arguments in every checkpoint and the trackers would keep
# them. TRL's pad_token / eos_token name tokenizer tokens, not credentials.
CREDENTIAL_KEY = re.compile(r"(^|[_-])(token|secret|password|passwd|api[_-]?key|auth)$", re.I)
TOKENIZER_TOKEN_KEYS = ("pad_token", "eos_token", "bos_token", "unk_token")
STAGES = ("sft", "dpo")
# TRL 1.16's DPO losses (DPOConfig.loss_type); several may be summed with loss_weights.
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip


# -- shared nodes --------------------------------------------------------------------------------


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
    """A Hub model's architecture numbers (its config.json), so `mistral-align estimate` needs no
    download. Informational: the weights and the real config still come from the Hub."""

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
    # The Mistral tokenizer this model was trained with (v1, v2, v3, v7, v3-tekken, v7-tekken, v11, v13): the chat format follows.
    tokenizer_version: str = "???"
    # Weights dtype for the layers that are not quantised.
    dtype: str = "bfloat16"
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
    # MoE models (Mixtral): LoRA on every expert's gate/up/down projections too (per-expert linears,
    # model/mixtral_unfused.py); false leaves the experts alone.
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
class RunConfig:
    output_dir: str = "runs"
    name: str = "run"
    # A fixed run directory (absolute, or under output_dir); None = <output_dir>/<name>-<timestamp>.
    dir: Optional[str] = None
    seed: int = 42
    report_to: str = "none"  # none | wandb | tensorboard
    wandb_project: str = "mistral-align"
    wandb_entity: Optional[str] = None
    # auto: online when WANDB_API_KEY is set and the wandb server answers (3 s), offline otherwise (a
    # warning says so when a key is set); online: refused at start when the server cannot be reached.
    wandb_mode: str = "auto"
    # Rerunning with the same run.dir: auto = continue from the newest complete checkpoint of the
    # unfinished stage; never = start the stage from step 0; or the path of a checkpoint to resume.
    resume: str = "auto"
    # Continue a run directory even though settings that change training differ from its config.yaml.
    allow_config_change: bool = False
    # Seconds any collective (all-reduce, barrier, broadcast) may wait for the other ranks before the
    # run ends with `error: lost contact with rank N ...` (a node died or hangs), instead of waiting
    # for torch's default (30 minutes on gloo). It also bounds how long one rank may work alone while
    # the others wait (rank 0 tokenising a large data set, generating for the eval): raise it for those.
    dist_timeout_s: int = 600


@dataclass
class HubConfig:
    """Push the final adapter to the Hugging Face Hub when the run finishes (main process only).
    The token comes from HF_TOKEN or the stored login and is written nowhere. The same push, by hand:
    `mistral-align push RUN_DIR --repo-id OWNER/NAME`."""

    push: bool = False
    repo_id: Optional[str] = None  # OWNER/NAME
    private: bool = False
    revision: Optional[str] = None  # a branch, created if missing
    license: str = "apache-2.0"


# -- stage nodes ---------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """The optimiser and loop of one stage (`sft.train`, `dpo.train`)."""

    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    lr: float = 2e-4
    lr_scheduler: str = "cosine"
    # A fraction of the total steps, in [0, 1).
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch_fused"
    per_device_batch_size: int = 4
    per_device_eval_batch_size: int = 8
    grad_accum: int = 1
    # Sequence length the trainer cuts at (SFT: of a packed row); None uses the stage's data.max_length.
    max_length: Optional[int] = None
    gradient_checkpointing: bool = True
    # Mixed precision for the non-quantised parts: "auto" = bf16 on GPUs that support it, else off.
    bf16: str = "auto"  # auto | true | false
    logging_steps: int = 10
    eval_steps: Optional[int] = None  # None: evaluate at the end only
    save_steps: int = 500
    save_total_limit: Optional[int] = 2
    dataloader_num_workers: int = 0
    # Liger's Triton kernels for RMSNorm, RoPE and SwiGLU (a CUDA GPU and `pip install '.[gpu]'`). TRL keeps
    # its own chunked LM head, so Liger's fused linear cross-entropy is not used.
    use_liger_kernel: bool = False
    # torch.compile the model (GPU; tests/test_gpu.py checks it with 4-bit layers).
    torch_compile: bool = False
    # A step whose loss or gradient norm is NaN/Inf: stop (name the step, its rows and the last good
    # checkpoint) or skip (drop its update, count it in metrics.jsonl and summary.json, go on).
    on_nonfinite: str = "stop"  # stop | skip
    # Extra keyword arguments passed to TRL's SFTConfig / DPOConfig verbatim (escape hatch; typos fail there).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SFTTrainConfig(TrainConfig):
    # Pack several conversations per row; attention never crosses their boundaries (padding-free).
    packing: bool = True
    packing_strategy: str = "bfd"


@dataclass
class EvalConfig:
    """Held-out evaluation: metrics before/after (loss; DPO: rewards), and greedy generation scored by exact match."""

    loss_before: bool = True
    generate: bool = False
    max_prompts: int = 64
    max_new_tokens: int = 32
    batch_size: int = 16


@dataclass
class SyntheticConfig:
    """Skills data generated by code (mistral_align.data.synthetic) into the stage's directory.

    Only for a stage whose data.train is empty: a run given both is refused, so your own data is
    never silently replaced."""

    enabled: bool = False
    skills: list[str] = field(default_factory=lambda: ["copy", "reverse", "add", "upper"])
    n_train: int = 2000
    n_eval: int = 64
    seed: int = 0


@dataclass
class SFTSyntheticConfig(SyntheticConfig):
    # {skill: fraction} of training replies replaced by a plausible wrong one.
    noise: dict[str, float] = field(default_factory=dict)


@dataclass
class SFTStageConfig:
    """The SFT stage (`sft.*`)."""

    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    synthetic: SFTSyntheticConfig = field(default_factory=SFTSyntheticConfig)


@dataclass
class DPOStageConfig:
    """The DPO stage (`dpo.*`): its own data, optimiser and evaluation, plus the DPO objective.
    The model, quant, peft and run nodes are shared with the SFT stage (DPO trains the SFT adapter further)."""

    # The SFT adapter to start from (an SFT run directory, an adapter folder or a Hub adapter id); it is
    # also the DPO reference. recipes/sft_dpo.py sets it to its own SFT stage.
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
    # Run each batch's chosen and rejected sequences packed (position ids restart per sequence, no
    # attention across them) instead of padded: the same loss, less padding (train/dpo_padding_free.py).
    padding_free: bool = False
    # Also compute each pair's prompt once: the rejected reply sees the chosen sequence's prompt through
    # the attention mask instead of a second copy of it. The same loss; implies padding_free; needs
    # model.attn_implementation sdpa or eager (train/dpo_padding_free.py).
    shared_prompt: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class RecipeConfig:
    """The root of every recipe's config. A recipe runs some of the stages; the others are dropped
    from its resolved config, and an override that reaches a stage it does not run is refused."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    run: RunConfig = field(default_factory=RunConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)
    dpo: DPOStageConfig = field(default_factory=DPOStageConfig)


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore (idempotent). The primary configs start with `recipe_schema`."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="recipe_schema", node=RecipeConfig)


# -- checks --------------------------------------------------------------------------------------


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {str(value)!r} is not one of {', '.join(choices)}")


def _at_least(value: Any, key: str, low: float, strict: bool = False) -> None:
    if value < low or (strict and value == low):
        raise ConfigError(f"{key}: must be {'>' if strict else '>='} {low:g}, got {value}")


def check_closed(cfg: Any) -> None:
    """Every node stays closed to unknown keys, also against Hydra's `+key=value`, which adds a key
    the schema does not have (only `train.extra` is free-form)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.merge(OmegaConf.structured(RecipeConfig), OmegaConf.to_container(cfg, resolve=False))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        raise ConfigError(f"{key}: not a setting of mistral-align ({str(e).splitlines()[0]})") from None


def bf16_setting(value: Any) -> str:
    """`train.bf16` as auto | true | false (a YAML `true` arrives as the string 'True')."""
    return str(value).lower()


def check_config(cfg: Any, stages: tuple[str, ...] = STAGES, need_data: bool = True) -> None:
    """Everything types alone cannot check, for the shared nodes and the `stages` a recipe runs.
    Raises ConfigError naming the key. Call it before anything loads. `need_data=False` (estimate)
    accepts a stage with no data source."""
    from mistral_align.chat.encoder import TOKENIZER_VERSIONS

    check_closed(cfg)
    m = cfg.model
    _choice(m.tokenizer_version, "model.tokenizer_version", TOKENIZER_VERSIONS)
    _choice(m.dtype, "model.dtype", DTYPES)
    _choice(m.attn_implementation, "model.attn_implementation", ATTN_IMPLEMENTATIONS)
    if (m.hub_id is None) == (m.architecture is None):
        raise ConfigError("model: set exactly one of model.hub_id (a Hub model) or model.architecture (inline)")
    if m.architecture is not None:
        a = m.architecture
        _choice(a.type, "model.architecture.type", ARCHITECTURES)
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            _at_least(a[key], f"model.architecture.{key}", 1)
        if a.hidden_size % a.num_attention_heads and a.head_dim is None:
            raise ConfigError("model.architecture.hidden_size: must be divisible by num_attention_heads")
        if a.num_attention_heads % a.num_key_value_heads:
            raise ConfigError("model.architecture.num_key_value_heads: must divide num_attention_heads")
        if a.type == "mixtral" and not 1 <= a.num_experts_per_tok <= a.num_local_experts:
            raise ConfigError("model.architecture.num_experts_per_tok: must be between 1 and num_local_experts")
    if m.sliding_window is not None:
        _at_least(m.sliding_window, "model.sliding_window", 0)

    q = cfg.quant
    _choice(q.mode, "quant.mode", QUANT_MODES)
    _choice(q.compute_dtype, "quant.compute_dtype", DTYPES)
    _choice(q.storage_dtype, "quant.storage_dtype", ("uint8", *DTYPES))

    p = cfg.peft
    _choice(p.method, "peft.method", PEFT_METHODS)
    if p.method == "lora":
        _at_least(p.r, "peft.r", 0, strict=True)
        _at_least(p.alpha, "peft.alpha", 0, strict=True)
        if not 0.0 <= p.dropout < 1.0:
            raise ConfigError(f"peft.dropout: must be in [0, 1), got {p.dropout}")
        _choice(p.bias, "peft.bias", ("none", "all", "lora_only"))
    if q.mode != "none" and p.method == "none":
        raise ConfigError("peft.method: 'none' (full fine-tune) cannot train quantised weights; use quant=none or peft=lora")

    if cfg.hub.push:
        from mistral_align.hub.push import REPO_ID

        if not REPO_ID.fullmatch(cfg.hub.repo_id or ""):
            raise ConfigError(f"hub.repo_id: hub.push=true needs OWNER/NAME, got {cfg.hub.repo_id!r}")
    _choice(cfg.run.report_to, "run.report_to", REPORT_TO)
    _choice(cfg.run.wandb_mode, "run.wandb_mode", WANDB_MODES)
    _at_least(cfg.run.dist_timeout_s, "run.dist_timeout_s", 0, strict=True)
    if cfg.run.resume not in ("auto", "never") and not os.path.isdir(os.path.expanduser(cfg.run.resume)):
        raise ConfigError(f"run.resume: must be auto, never or a checkpoint folder; {cfg.run.resume} is none of these")

    if "sft" in stages:
        s = cfg.sft
        _check_train(s.train, "sft.train")
        _choice(s.train.packing_strategy, "sft.train.packing_strategy", PACKING_STRATEGIES)
        _check_eval(s.eval, "sft.eval")
        _check_stage_data(s, "sft", need_data)
        for skill, fraction in s.synthetic.noise.items():
            if not 0.0 <= fraction <= 1.0:
                raise ConfigError(f"sft.synthetic.noise.{skill}: must be in [0, 1], got {fraction}")
    if "dpo" in stages:
        d = cfg.dpo
        _at_least(d.beta, "dpo.beta", 0, strict=True)
        if not d.loss_type:
            raise ConfigError("dpo.loss_type: name at least one loss")
        for i, loss in enumerate(d.loss_type):
            _choice(loss, f"dpo.loss_type[{i}]", DPO_LOSS_TYPES)
        if d.loss_weights is not None and len(d.loss_weights) != len(d.loss_type):
            raise ConfigError(f"dpo.loss_weights: {len(d.loss_weights)} weights for {len(d.loss_type)} loss types")
        if not 0.0 <= d.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing: must be in [0, 0.5), got {d.label_smoothing}")
        if d.shared_prompt and m.attn_implementation not in ("sdpa", "eager"):
            raise ConfigError(f"dpo.shared_prompt: needs model.attn_implementation sdpa or eager, not "
                              f"{m.attn_implementation} (its mask lets a rejected reply see the prompt but not the chosen one)")
        _check_train(d.train, "dpo.train")
        _check_eval(d.eval, "dpo.eval")
        _check_stage_data(d, "dpo", need_data)


def _check_train(t: Any, key: str) -> None:
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    _at_least(t.lr, f"{key}.lr", 0, strict=True)
    _at_least(t.epochs, f"{key}.epochs", 0, strict=True)
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(f"{key}.max_steps: must be > 0, or -1 to train for {key}.epochs; got {t.max_steps}")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"{key}.warmup_ratio: must be a fraction of the steps in [0, 1), got {t.warmup_ratio}")
    _at_least(t.weight_decay, f"{key}.weight_decay", 0)
    _at_least(t.max_grad_norm, f"{key}.max_grad_norm", 0)
    for name in ("per_device_batch_size", "per_device_eval_batch_size", "grad_accum", "logging_steps", "save_steps"):
        _at_least(t[name], f"{key}.{name}", 1)
    for name in ("max_length", "eval_steps", "save_total_limit"):
        if t[name] is not None:
            _at_least(t[name], f"{key}.{name}", 1)
    _at_least(t.dataloader_num_workers, f"{key}.dataloader_num_workers", 0)
    _choice(t.lr_scheduler, f"{key}.lr_scheduler", tuple(s.value for s in SchedulerType))
    _choice(t.optim, f"{key}.optim", tuple(o.value for o in OptimizerNames))
    _choice(bf16_setting(t.bf16), f"{key}.bf16", BF16)
    _choice(t.on_nonfinite, f"{key}.on_nonfinite", ON_NONFINITE)
    _refuse_credentials(t.extra, f"{key}.extra")


def _refuse_credentials(node: Any, key: str) -> None:
    """`train.extra` is passed to TRL verbatim; a credential in it (`+sft.train.extra.hub_token=...`)
    is refused, naming the key and never echoing the value."""
    items = node.items() if hasattr(node, "items") else []
    for name, value in items:
        if CREDENTIAL_KEY.search(str(name)) and str(name) not in TOKENIZER_TOKEN_KEYS:
            raise ConfigError(
                f"{key}.{name}: credentials are not taken from the config (config.yaml, checkpoints and "
                "trackers would keep them); set HF_TOKEN / WANDB_API_KEY in the environment, or log in"
            )
        _refuse_credentials(value, f"{key}.{name}")


def _check_eval(e: Any, key: str) -> None:
    for name in ("max_prompts", "max_new_tokens", "batch_size"):
        _at_least(e[name], f"{key}.{name}", 1)


def _check_stage_data(stage: Any, name: str, need_data: bool = True) -> None:
    """The stage's data (or its synthetic data), never both: a user's own data is never silently replaced."""
    s = stage.synthetic
    if s.enabled:
        from mistral_align.data.synthetic import SKILLS

        if stage.data.train:
            raise ConfigError(
                f"{name}.synthetic.enabled: the generated demo data would replace your {name}.data.train "
                f"({', '.join(src.path for src in stage.data.train)}); set {name}.synthetic.enabled=false to train on yours"
            )
        for i, skill in enumerate(s.skills):
            _choice(skill, f"{name}.synthetic.skills[{i}]", SKILLS)
        _at_least(s.n_train, f"{name}.synthetic.n_train", 1)
        _at_least(s.n_eval, f"{name}.synthetic.n_eval", 0)
    check_data_config(stage.data, name, f"{name}.data", need_train=False)
    if need_data and not s.enabled and not stage.data.train:
        raise ConfigError(
            f"{name}.data.train: no training source (pick data@{name}.data=... or set {name}.synthetic.enabled=true)"
        )


def stage_max_length(stage: Any) -> int:
    """The sequence length a stage's trainer cuts at: its train.max_length, else its data.max_length."""
    return stage.train.max_length if stage.train.max_length is not None else stage.data.max_length
