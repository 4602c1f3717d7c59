"""Each preference objective's TRL config and trainer, from the typed `dpo` node (`dpo.objective`,
schema/objectives.py): the one place the preference stage (train/dpo.py) branches on it.

    dpo    trl.DPOConfig                        PretokenizedDPOTrainer     (train/dpo_trainer.py)
    kto    trl.KTOConfig                        PretokenizedKTOTrainer     (train/kto_trainer.py)
    simpo  trl.experimental CPOConfig("simpo")  PretokenizedSimPOTrainer   (train/reference_free.py)
    orpo   trl.experimental ORPOConfig          PretokenizedORPOTrainer    (train/reference_free.py)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trl import DPOConfig, KTOConfig

from mistral_align.schema.objectives import objective_beta
from mistral_align.schema.recipe import stage_max_length
from mistral_align.train.args import training_arguments
from mistral_align.train.dpo_trainer import PretokenizedDPOTrainer
from mistral_align.train.kto_trainer import PretokenizedKTOTrainer
from mistral_align.train.reference_free import CPOConfig, ORPOConfig, PretokenizedORPOTrainer, PretokenizedSimPOTrainer
from mistral_align.train.stage import build_trainer


def preference_args(d: Any, seed: int, out_dir: Path, report_to: list[str], has_eval: bool, eval_on_start: bool = False):
    """The objective's TRL config: `dpo.train` for the optimiser, `dpo.*` for the objective."""
    common = dict(
        # The loader has already applied dpo.data.max_length (prompt + longer reply); the trainers cut
        # keep_start (BOS and the prompt through [/INST] always stay) only if dpo.train.max_length is lower.
        max_length=stage_max_length(d),
        beta=objective_beta(d),
        **training_arguments(d.train, seed, out_dir, report_to, has_eval, eval_on_start),
    )
    if d.objective == "kto":
        # KTOConfig reads batches in order (train_sampling_strategy "sequential"): its KL term pairs each
        # row with the previous one's reply (train/kto_trainer.py); the loader shuffled the rows once.
        return KTOConfig(desirable_weight=d.desirable_weight, undesirable_weight=d.undesirable_weight,
                         precompute_ref_log_probs=d.precompute_ref_log_probs, **common)
    if d.objective == "simpo":
        return CPOConfig(loss_type="simpo", simpo_gamma=d.simpo_gamma, cpo_alpha=d.cpo_alpha,
                         label_smoothing=d.label_smoothing, **common)
    if d.objective == "orpo":
        return ORPOConfig(**common)
    return DPOConfig(truncation_mode="keep_start", loss_type=list(d.loss_type),
                     loss_weights=list(d.loss_weights) if d.loss_weights is not None else None,
                     label_smoothing=d.label_smoothing, precompute_ref_log_probs=d.precompute_ref_log_probs, **common)


TRAINERS = {"dpo": PretokenizedDPOTrainer, "kto": PretokenizedKTOTrainer, "simpo": PretokenizedSimPOTrainer,
            "orpo": PretokenizedORPOTrainer}


def trainer_options(d: Any) -> dict[str, Any]:
    """The trainer's own keywords: packing (KTO has no pairs, so no shared prompt), ORPO's prompt loss."""
    if d.objective == "kto":
        return {"padding_free": d.padding_free}
    options = {"padding_free": d.padding_free or d.shared_prompt, "shared_prompt": d.shared_prompt}
    return {**options, "prompt_loss": d.orpo_prompt_loss} if d.objective == "orpo" else options


def preference_trainer(d: Any, model, tokenizer, args, train_ds, eval_ds=None, callbacks=(), keep_float32: bool = False,
                       ref_model=None):
    """The objective's trainer on our pre-tokenised rows (pairs; KTO: prompt, completion, label).
    `ref_model`: the frozen reference of a full fine-tune (DPO, KTO; an adapter's is kept by TRL itself)."""
    extra = {"ref_model": ref_model} if ref_model is not None else {}
    return build_trainer(TRAINERS[d.objective], model, tokenizer, args, train_ds, eval_ds, callbacks, keep_float32,
                         **trainer_options(d), **extra)


def objective_facts(d: Any, args) -> dict[str, Any]:
    """The objective and the settings it trained with, for the manifest (and the model card)."""
    facts: dict[str, Any] = {"objective": d.objective, "beta": args.beta,
                             "padding_free": d.padding_free or d.shared_prompt, "shared_prompt": d.shared_prompt}
    if d.objective == "dpo":
        facts.update(loss_type=list(args.loss_type), precompute_ref_log_probs=args.precompute_ref_log_probs)
    elif d.objective == "kto":
        facts.update(desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight,
                     precompute_ref_log_probs=args.precompute_ref_log_probs)
    elif d.objective == "simpo":
        facts.update(simpo_gamma=args.simpo_gamma, cpo_alpha=args.cpo_alpha)
    else:
        facts.update(orpo_prompt_loss=d.orpo_prompt_loss)
    return facts
