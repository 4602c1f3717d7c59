"""The SFT stage on TRL's SFTTrainer, fed our pre-tokenised `input_ids` + `labels`.

What TRL 1.16 does with such a dataset (read in trl/trainer/sft_trainer.py):

- `input_ids` present => no tokenisation, no chat template; `labels` present => kept as they are
  (no completion/assistant mask is rebuilt). Unpacked rows are cut to max_length (our loader has
  already dealt with long rows).
- `packing=True, packing_strategy="bfd"` => rows are bin-packed into max_length sequences and the
  trainer runs *padding-free*: the collator concatenates a batch into one row, sends
  `position_ids` that restart at 0 for every conversation and no `attention_mask`. transformers'
  `create_causal_mask` (masking_utils, used by Mistral/Mixtral for sdpa, eager and flex) detects
  the restarts and builds a block-diagonal causal mask, so no token attends across a boundary;
  flash-attention gets `cu_seq_lens`. The collator also sets the label at each conversation start
  to -100, which is BOS for us (never trained anyway). tests/test_sft_packing.py proves a packed
  batch gives the same loss as the same rows unpacked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mistral_align.config import packed_length


def bf16_enabled(train_cfg: Any) -> bool:
    value = str(train_cfg.bf16).lower()
    if value == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return value == "true"


def trainer_arguments(t: Any, seed: int, out_dir: Path, report_to: list[str], has_eval: bool) -> dict[str, Any]:
    """The TrainingArguments keywords that SFT and DPO share, from a typed `train` node."""
    from omegaconf import OmegaConf

    extra = OmegaConf.to_container(t.extra, resolve=True) if not isinstance(t.extra, dict) else dict(t.extra)
    return dict(
        output_dir=str(Path(out_dir) / "checkpoints"),
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
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        dataloader_num_workers=t.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        report_to=report_to,
        ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(),
        **extra,  # train.extra: passed verbatim (escape hatch; a typo fails in TRL's config)
    )


def make_sft_args(cfg: Any, run_dir: Path, report_to: list[str], has_eval: bool):
    """trl.SFTConfig from our typed config."""
    from trl import SFTConfig

    t = cfg.train
    return SFTConfig(
        max_length=packed_length(cfg),
        packing=t.packing,
        packing_strategy=t.packing_strategy,
        # Rows are already tokenised with labels; let TRL not touch them beyond packing.
        dataset_num_proc=None,
        **trainer_arguments(t, cfg.run.seed, run_dir, report_to, has_eval),
    )


def trainer_tokenizer(version: str, out_dir: Path):
    """Write the tokenizer directory (save_hf_tokenizer) and load it as the trainer's processing class."""
    from mistral_align.chat.hf_tokenizer import load_hf_tokenizer, save_hf_tokenizer

    save_hf_tokenizer(version, out_dir)
    return load_hf_tokenizer(out_dir)


def score_trained_positions_only() -> None:
    """Make TRL's fused LM head project only the positions that have a label on every device.

    TRL 1.16's SFT loss (`add_fused_lm_head`) projects hidden states through the LM head in tiles
    and, on Triton devices, only at positions whose next-token label is not -100. Elsewhere it
    scores every position (to keep tile shapes static for compilers such as Neuron). On the CPU that
    wastes most of the step: with a 32k vocabulary the head dominates a small model and prompt
    tokens are often more than half of a chat row. The loss is the same either way (masked
    positions contribute 0), tests/test_sft_packing.py checks it. trl is pinned <1.17 in pyproject.
    """
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    if getattr(original, "_mistral_align", False):
        return

    def compact(device):
        return device.type == "cpu" or original(device)

    compact._mistral_align = True
    trl_utils._use_triton = compact


def build_sft_trainer(model, tokenizer, args, train_ds, eval_ds=None, callbacks=(), fp32_trainable: bool = False):
    """SFTTrainer on already-tokenised rows. `fp32_trainable` undoes TRL's bf16 cast of the adapter
    weights on quantised models (use it where 4-bit layers compute in float32, i.e. on the CPU)."""
    from trl import SFTTrainer

    from mistral_align.model.build import upcast_trainable

    score_trained_positions_only()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    if fp32_trainable:
        upcast_trainable(trainer.model, torch.float32)
    return trainer


def save_adapter(trainer, out_dir: Path, tokenizer_version: str | None = None) -> Path:
    """Final adapter (LoRA weights as adapter_model.safetensors + adapter_config.json), or the full
    model with peft=none, plus the exact tokenizer so the directory loads (and pushes) on its own.
    Collective under FSDP/DeepSpeed: call it on every rank."""
    trainer.save_model(str(out_dir))
    if tokenizer_version and trainer.accelerator.is_main_process:
        from mistral_align.chat.hf_tokenizer import save_hf_tokenizer

        save_hf_tokenizer(tokenizer_version, out_dir)
    return Path(out_dir)
