"""The TrainingArguments keywords every stage shares, from a typed stage `train` node.

TRL's SFTConfig and DPOConfig both extend transformers' TrainingArguments; the SFT and DPO stages
add their own keywords (packing; beta, loss_type, ...) to these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mistral_align.schema.train import bf16_setting
from mistral_align.train.checkpointing import checkpoint_dirs


def bf16_enabled(train_cfg: Any) -> bool:
    value = bf16_setting(train_cfg.bf16)
    if value == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return value == "true"


def training_arguments(t: Any, seed: int, out_dir: Path, report_to: list[str], has_eval: bool,
                       eval_on_start: bool = False) -> dict[str, Any]:
    """TrainingArguments keywords from a stage's `train` node (`sft.train`, `dpo.train`).
    `eval_on_start`: the held-out metrics before training are measured inside `train()` (train/hooks.py)."""
    from omegaconf import OmegaConf

    extra = OmegaConf.to_container(t.extra, resolve=True) if OmegaConf.is_config(t.extra) else dict(t.extra)
    return dict(
        # Checkpoints are written aside and renamed into checkpoints/ when complete (train/checkpointing.py).
        output_dir=str(checkpoint_dirs(Path(out_dir) / "checkpoints")[0]),
        run_name=Path(out_dir).name,
        seed=seed,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        # model building already enabled checkpointing (peft needs it before wrapping)
        gradient_checkpointing=False,
        bf16=bf16_enabled(t),
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval and t.eval_steps else "no",
        eval_on_start=eval_on_start,
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        dataloader_num_workers=t.dataloader_num_workers,
        use_liger_kernel=t.use_liger_kernel,
        torch_compile=t.torch_compile,
        dataloader_pin_memory=torch.cuda.is_available(),
        report_to=report_to,
        ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(),
        **extra,  # train.extra: passed verbatim (escape hatch; a typo fails in TRL's config)
    )
