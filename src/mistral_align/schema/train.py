"""A stage's optimiser and loop (`<stage>.train`), its held-out evaluation (`<stage>.eval`) and its
generated demo data (`<stage>.synthetic`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from mistral_align.errors import ConfigError
from mistral_align.names import SYNTHETIC_SKILLS
from mistral_align.redaction import is_credential_key
from mistral_align.schema.rules import at_least, choice

PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")
# transformers' own names (trainer_utils.SchedulerType, training_args.OptimizerNames), written out:
# importing them takes transformers and torch, seconds before a config mistake could be reported.
# tests/test_user_mistakes.py checks they equal the installed transformers' lists.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                 "warmup_stable_decay", "greedy")  # fmt: skip
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor",
              "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad",
              "adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit",
              "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit",
              "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit",
              "galore_adafactor", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise",
              "lomo", "adalomo", "grokadamw", "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd",
              "apollo_adamw", "apollo_adamw_layerwise", "stable_adamw")  # fmt: skip
BF16 = ("auto", "true", "false")
ON_NONFINITE = ("stop", "skip")


@dataclass
class TrainConfig:
    """The optimiser and loop of one stage (`sft.train`, `dpo.train`)."""

    epochs: float = 1.0  # passes over the training rows (> 0; a fraction trains part of one)
    max_steps: int = -1  # > 0 overrides epochs
    lr: float = 2e-4  # the peak learning rate, reached after warmup (> 0)
    # How the rate moves after warmup: a transformers SchedulerType name (cosine, linear, constant,
    # constant_with_warmup, cosine_with_min_lr, ...; a wrong one is refused, listing them all). constant
    # ignores warmup_ratio; a scheduler's own arguments (cosine_with_min_lr's min_lr_rate) go in
    # extra.lr_scheduler_kwargs.
    lr_scheduler: str = "cosine"
    # A fraction of the total steps, in [0, 1).
    warmup_ratio: float = 0.03
    # Decoupled weight decay (>= 0), on every trained weight but biases and norms (transformers' rule).
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # clip the gradients' global norm to this (>= 0); 0: no clipping
    # A transformers TrainingArguments optim name: adamw_torch_fused, adamw_torch, paged_adamw_8bit
    # (bitsandbytes), adafactor, ... (a wrong one is refused, listing them all). `mistral-align estimate`
    # counts its state.
    optim: str = "adamw_torch_fused"
    # Rows each process takes per forward/backward (SFT with packing: packed rows; DPO: pairs; KTO: single
    # replies); >= 1. One optimiser step sees per_device_batch_size x grad_accum x processes rows.
    per_device_batch_size: int = 4
    per_device_eval_batch_size: int = 8  # >= 1; the same for the held-out loss and metrics (not eval.batch_size)
    grad_accum: int = 1  # >= 1 forward/backward passes whose gradients add up to one optimiser step
    # Sequence length the trainer cuts at (SFT: of a packed row); None uses the stage's data.max_length.
    max_length: Optional[int] = None
    # Recompute each layer's activations in the backward pass instead of keeping them: less memory, more
    # compute. Set on the model when it is built (non-reentrant), not by the trainer.
    gradient_checkpointing: bool = True
    # Mixed precision for the non-quantised parts: "auto" = bf16 on GPUs that support it, else off.
    bf16: str = "auto"  # auto | true | false
    # Log the training metrics (loss, learning rate, gradient norm, ...) every N >= 1 optimiser steps to
    # metrics.jsonl and the tracker; the first step too.
    logging_steps: int = 10
    eval_steps: Optional[int] = None  # None: evaluate at the end only
    # Write a checkpoint (what run.resume continues from) every N >= 1 optimiser steps, and at the last step.
    save_steps: int = 500
    save_total_limit: Optional[int] = 2  # keep the newest N >= 1 complete checkpoints; None: all
    dataloader_num_workers: int = 0  # worker processes loading the batches; 0: the training process itself
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
    # Pack several conversations per row; with bfd and bfd_split attention never crosses their boundaries
    # (padding-free).
    packing: bool = True
    # TRL's packing: bfd (best-fit decreasing: each conversation in one row, cut at max_length), bfd_split
    # (a conversation longer than max_length goes on in other rows) or wrapped (all concatenated and cut
    # every max_length tokens: attention then crosses conversations, and rows split anywhere).
    packing_strategy: str = "bfd"


def bf16_setting(value: Any) -> str:
    """`train.bf16` as auto | true | false (a YAML `true` arrives as the string 'True')."""
    return str(value).lower()


def check_train(t: Any, key: str) -> None:
    at_least(t.lr, f"{key}.lr", 0, strict=True)
    at_least(t.epochs, f"{key}.epochs", 0, strict=True)
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(f"{key}.max_steps: must be > 0, or -1 to train for {key}.epochs; got {t.max_steps}")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"{key}.warmup_ratio: must be a fraction of the steps in [0, 1), got {t.warmup_ratio}")
    at_least(t.weight_decay, f"{key}.weight_decay", 0)
    at_least(t.max_grad_norm, f"{key}.max_grad_norm", 0)
    for name in ("per_device_batch_size", "per_device_eval_batch_size", "grad_accum", "logging_steps", "save_steps"):
        at_least(t[name], f"{key}.{name}", 1)
    for name in ("max_length", "eval_steps", "save_total_limit"):
        if t[name] is not None:
            at_least(t[name], f"{key}.{name}", 1)
    at_least(t.dataloader_num_workers, f"{key}.dataloader_num_workers", 0)
    choice(t.lr_scheduler, f"{key}.lr_scheduler", LR_SCHEDULERS)
    choice(t.optim, f"{key}.optim", OPTIMIZERS)
    choice(bf16_setting(t.bf16), f"{key}.bf16", BF16)
    choice(t.on_nonfinite, f"{key}.on_nonfinite", ON_NONFINITE)
    if "packing_strategy" in t:
        choice(t.packing_strategy, f"{key}.packing_strategy", PACKING_STRATEGIES)
    refuse_credentials(t.extra, f"{key}.extra")


def refuse_credentials(node: Any, key: str) -> None:
    """`train.extra` is passed to TRL verbatim; a credential in it (`+sft.train.extra.hub_token=...`)
    is refused, naming the key and never echoing the value."""
    items = node.items() if hasattr(node, "items") else []
    for name, value in items:
        if is_credential_key(name):
            raise ConfigError(
                f"{key}.{name}: credentials are not taken from the config (config.yaml, checkpoints and "
                "trackers would keep them); set HF_TOKEN / WANDB_API_KEY in the environment, or log in"
            )
        refuse_credentials(value, f"{key}.{name}")


@dataclass
class EvalConfig:
    """Held-out evaluation: metrics before/after (loss; DPO: rewards), and greedy generation scored by exact match."""

    # Also measure the held-out metrics before training (on a stage's first launch; a resumed one reports
    # what the first recorded). Like the rest of the eval, only where the stage has held-out rows.
    loss_before: bool = True
    # Greedy replies to held-out prompts before and after training, scored by exact match on the final
    # reply's ids and its EOS (DPO: the chosen reply; KTO: desirable rows). Needs held-out rows; runs on the
    # main process alone, so it is refused under FSDP / ZeRO-3 sharding.
    generate: bool = False
    max_prompts: int = 64  # generate: the first N >= 1 held-out rows
    max_new_tokens: int = 32  # generate: the most tokens of a reply, >= 1 (a longer reference never matches)
    batch_size: int = 16  # generate: prompts per generate() call (left-padded), >= 1


def check_eval(e: Any, key: str) -> None:
    for name in ("max_prompts", "max_new_tokens", "batch_size"):
        at_least(e[name], f"{key}.{name}", 1)


@dataclass
class SyntheticConfig:
    """Skills data generated by code (mistral_align.data.synthetic) into the stage's directory.

    Only for a stage whose data.train is empty: a run given both is refused, so your own data is
    never silently replaced."""

    enabled: bool = False
    skills: list[str] = field(default_factory=lambda: list(SYNTHETIC_SKILLS))
    n_train: int = 2000
    n_eval: int = 64
    seed: int = 0
    # {skill: the held-out exact match it should reach after the stage}: a skill that falls short is
    # named in a warning, in the stage's table and in summary.json (eval.bars). The demo sets them.
    bars: dict[str, float] = field(default_factory=dict)


@dataclass
class SFTSyntheticConfig(SyntheticConfig):
    # {skill: fraction} of training replies replaced by a plausible wrong one.
    noise: dict[str, float] = field(default_factory=dict)


def check_synthetic(s: Any, key: str) -> None:
    if s.enabled:
        for i, skill in enumerate(s.skills):
            choice(skill, f"{key}.skills[{i}]", SYNTHETIC_SKILLS)
        at_least(s.n_train, f"{key}.n_train", 1)
        at_least(s.n_eval, f"{key}.n_eval", 0)
        for skill, bar in (s.bars or {}).items():
            if skill not in s.skills:
                raise ConfigError(f"{key}.bars.{skill}: not one of the skills trained ({', '.join(s.skills)})")
            if not 0.0 <= bar <= 1.0:
                raise ConfigError(f"{key}.bars.{skill}: an exact match, in [0, 1], got {bar}")
    for skill, fraction in (s.get("noise") or {}).items():
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"{key}.noise.{skill}: must be in [0, 1], got {fraction}")
