"""The DPO stage: where the SFT adapter comes from, the trainer arguments, the held-out report.

The reference policy is the SFT model, never the bare base model: the SFT adapter is loaded as the
trainable "default" adapter, and `PretokenizedDPOTrainer` keeps an exact frozen copy of it as the
"ref" adapter (or, with `dpo.precompute_ref_log_probs`, scores every pair with it once up front).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mistral_align.train.sft import trainer_arguments

log = logging.getLogger("mistral_align.dpo")

DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip


class InitError(ValueError):
    """`dpo.init_from` names nothing usable."""


def resolve_sft_adapter(init_from: str) -> tuple[str, Path | None]:
    """(what to give PeftModel.from_pretrained, the SFT run directory if there is one).

    Accepts an SFT run directory (its `adapter/`), a pipeline run directory (`sft/adapter/`),
    a local adapter folder (holding adapter_config.json), or a Hub adapter id.
    """
    path = Path(init_from).expanduser()
    for adapter in (path / "adapter", path / "sft" / "adapter"):
        if (adapter / "adapter_config.json").is_file():
            # The run's config.yaml sits in the run directory: `path`, or its parent for a
            # pipeline's sft/ stage directory.
            run_dir = next((d for d in (path, path.parent) if (d / "config.yaml").is_file()), None)
            return str(adapter), run_dir
    if (path / "adapter_config.json").is_file():
        return str(path), None
    if path.exists():
        raise InitError(
            f"dpo.init_from: {init_from} holds no adapter (no adapter_config.json in it, in adapter/ or sft/adapter/)"
        )
    if init_from.count("/") == 1 and not init_from.startswith((".", "/", "~")):
        return init_from, None  # a Hub adapter id; peft downloads it
    raise InitError(f"dpo.init_from: {init_from} does not exist")


def same_base_as_sft_run(cfg):
    """Take model, quant and run.seed from the SFT run that `dpo.init_from` names, if it is a run
    directory: the adapter is only meaningful on the exact base it was trained on (for an inline
    random-init model that means the same seed)."""
    from omegaconf import OmegaConf

    _, run_dir = resolve_sft_adapter(cfg.dpo.init_from)
    if run_dir is None:  # an adapter folder or a Hub id: no run config to follow
        return cfg
    sft = OmegaConf.load(run_dir / "config.yaml")
    for key in ("model", "quant"):
        if OmegaConf.to_container(cfg[key]) != OmegaConf.to_container(sft[key]):
            log.info("%s: using the SFT run's (%s) instead of the one configured here", key, run_dir)
        cfg[key] = OmegaConf.merge(cfg[key], sft[key])  # keeps the typed schema
    cfg.run.seed = sft.run.seed
    return cfg


def load_policy(base_model, adapter: str):
    """The SFT model as a trainable PeftModel (adapter "default"); the trainer adds the frozen "ref" copy."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, adapter, is_trainable=True)


def make_dpo_args(cfg: Any, out_dir: Path, report_to: list[str], has_eval: bool):
    """trl.DPOConfig from our typed config (`dpo.train` for the optimiser, `dpo.*` for the objective)."""
    from trl import DPOConfig

    d = cfg.dpo
    return DPOConfig(
        # The loader has already applied dpo.data.max_length (prompt + longer reply); TRL truncates
        # keep_start (BOS and the prompt through [/INST] always stay) only if dpo.train.max_length is lower.
        max_length=d.train.max_length or d.data.max_length,
        truncation_mode="keep_start",
        beta=d.beta,
        loss_type=list(d.loss_type),
        loss_weights=list(d.loss_weights) if d.loss_weights is not None else None,
        label_smoothing=d.label_smoothing,
        precompute_ref_log_probs=d.precompute_ref_log_probs,
        **trainer_arguments(d.train, cfg.run.seed, out_dir, report_to, has_eval),
    )


def build_dpo_trainer(model, tokenizer, args, train_ds, eval_ds=None, callbacks=(), fp32_trainable: bool = False):
    from mistral_align.train.dpo_trainer import PretokenizedDPOTrainer

    return PretokenizedDPOTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=list(callbacks),
        fp32_adapter=fp32_trainable,
    )


PREFERENCE_METRICS = {
    "eval_loss": "loss",
    "eval_rewards/accuracies": "reward_accuracy",
    "eval_rewards/margins": "reward_margin",
    "eval_rewards/chosen": "reward_chosen",
    "eval_rewards/rejected": "reward_rejected",
    "eval_logps/chosen": "logp_chosen",
    "eval_logps/rejected": "logp_rejected",
}


def preference_eval(trainer) -> dict[str, float]:
    """Held-out preference metrics under readable names: reward accuracy and margin, log-probs."""
    metrics = trainer.evaluate()
    return {name: metrics[key] for key, name in PREFERENCE_METRICS.items() if key in metrics}


def as_generation_rows(dpo_ds):
    """Preference rows as (input_ids, labels) rows whose reference reply is the chosen one,
    so `train.evaluate.generation_eval` can score greedy replies against it."""
    from mistral_align.chat.encoder import IGNORE_INDEX

    def to_sft(row):
        return {
            "input_ids": row["prompt_ids"] + row["chosen_ids"],
            "labels": [IGNORE_INDEX] * len(row["prompt_ids"]) + row["chosen_ids"],
        }

    return dpo_ds.map(to_sft, remove_columns=dpo_ds.column_names)
