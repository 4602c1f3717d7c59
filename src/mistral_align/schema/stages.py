"""The stage nodes: `sft` (supervised fine-tuning) and `dpo` (preference optimisation: DPO, KTO,
ORPO or SimPO, schema/objectives.py), each with its own data, optimiser, evaluation and demo data,
plus the stage's own objective settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from mistral_align.errors import ConfigError
from mistral_align.schema.data import DataConfig, SFTDataConfig, check_data_config
from mistral_align.schema.objectives import check_objective
from mistral_align.schema.rules import choice
from mistral_align.schema.train import (
    EvalConfig,
    SFTSyntheticConfig,
    SFTTrainConfig,
    SyntheticConfig,
    TrainConfig,
    check_eval,
    check_synthetic,
    check_train,
)

# TRL 1.16's DPO losses (DPOConfig.loss_type); several may be summed with loss_weights.
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip


@dataclass
class SFTStageConfig:
    """The SFT stage (`sft.*`)."""

    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    synthetic: SFTSyntheticConfig = field(default_factory=SFTSyntheticConfig)


@dataclass
class DPOStageConfig:
    """The preference stage (`dpo.*`): its own data, optimiser and evaluation, plus the objective.
    The model, quant, peft and run nodes are shared with the SFT stage (it trains the SFT adapter further)."""

    # The preference loss: dpo, kto (single replies marked desirable or not; pairs are split in two),
    # orpo (SFT and preference in one stage from the base model, no reference) or simpo (length-normalised,
    # no reference). The keys below say which objectives read them; another objective refuses them.
    objective: str = "dpo"
    # The SFT adapter to start from (an SFT run directory, an adapter folder or a Hub adapter id); for
    # dpo and kto it is also the frozen reference. recipes/sft_dpo.py sets it to its own SFT stage.
    init_from: Optional[str] = None
    # dpo, kto, simpo: beta; orpo: lambda, the weight of the odds-ratio term. null: the objective's
    # default (0.1; simpo 2.0, as in its paper).
    beta: Optional[float] = None
    # dpo: one or more of TRL's DPO losses (sigmoid, ipo, hinge, robust, ...), summed.
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    # dpo: one weight per loss_type; None weighs them all 1. ["sigmoid", "sft"] with [1, w] adds w x the
    # chosen replies' NLL (as RPO does), which keeps DPO from lowering the chosen replies' likelihood.
    loss_weights: Optional[list[float]] = None
    # dpo, simpo: the assumed fraction of pairs whose preference is flipped.
    label_smoothing: float = 0.0
    # dpo, kto: score every row with the reference once before training, instead of at every step.
    precompute_ref_log_probs: bool = False
    # kto: the weight of the desirable replies' losses (validate --kind kto says which weights suit the
    # data's balance of desirable and undesirable replies).
    desirable_weight: float = 1.0
    # kto: the weight of the undesirable replies' losses.
    undesirable_weight: float = 1.0
    # simpo: the target margin gamma between the chosen and rejected replies' rewards (TRL's simpo_gamma).
    simpo_gamma: float = 0.5
    # simpo: the weight of the chosen replies' NLL added to the loss (CPO's BC term; 0 is SimPO itself).
    cpo_alpha: float = 0.0
    # orpo: the SFT term's NLL also over the prompt (TRL's and the ORPO authors' code) instead of over
    # the chosen reply only (every other stage's mask: only assistant replies are trained).
    orpo_prompt_loss: bool = False
    # Run each batch's sequences packed (position ids restart per sequence, no attention across them)
    # instead of padded: the same loss, less padding (train/dpo_padding_free.py). Every objective.
    padding_free: bool = False
    # Also compute each pair's prompt once: the rejected reply sees the chosen sequence's prompt through
    # the attention mask instead of a second copy of it. The same loss; implies padding_free; needs
    # model.attn_implementation sdpa or eager (train/dpo_padding_free.py). Pairs only (not kto).
    shared_prompt: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


def check_sft_stage(s: Any, need_data: bool) -> None:
    check_train(s.train, "sft.train")
    check_eval(s.eval, "sft.eval")
    check_stage_data(s, "sft", need_data)


def check_dpo_stage(d: Any, attn_implementation: str, need_data: bool, stages: tuple[str, ...] = ("dpo",)) -> None:
    check_objective(d, stages)
    if not d.loss_type:
        raise ConfigError("dpo.loss_type: name at least one loss")
    for i, loss in enumerate(d.loss_type):
        choice(loss, f"dpo.loss_type[{i}]", DPO_LOSS_TYPES)
    if d.loss_weights is not None and len(d.loss_weights) != len(d.loss_type):
        raise ConfigError(f"dpo.loss_weights: {len(d.loss_weights)} weights for {len(d.loss_type)} loss types")
    if not 0.0 <= d.label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing: must be in [0, 0.5), got {d.label_smoothing}")
    if d.shared_prompt and attn_implementation not in ("sdpa", "eager"):
        raise ConfigError(f"dpo.shared_prompt: needs model.attn_implementation sdpa or eager, not "
                          f"{attn_implementation} (its mask lets a rejected reply see the prompt but not the chosen one)")
    check_train(d.train, "dpo.train")
    check_eval(d.eval, "dpo.eval")
    check_stage_data(d, "dpo", need_data, data_kind="kto" if d.objective == "kto" else "dpo")


def check_stage_data(stage: Any, name: str, need_data: bool = True, data_kind: str | None = None) -> None:
    """The stage's data (or its synthetic data), never both: a user's own data is never silently replaced."""
    s = stage.synthetic
    if s.enabled and stage.data.train:
        raise ConfigError(
            f"{name}.synthetic.enabled: the generated demo data would replace your {name}.data.train "
            f"({', '.join(src.path for src in stage.data.train)}); set {name}.synthetic.enabled=false to train on yours"
        )
    check_synthetic(s, f"{name}.synthetic")
    check_data_config(stage.data, data_kind or name, f"{name}.data", need_train=False)
    if need_data and not s.enabled and not stage.data.train:
        raise ConfigError(
            f"{name}.data.train: no training source (pick data@{name}.data=... or set {name}.synthetic.enabled=true)"
        )
