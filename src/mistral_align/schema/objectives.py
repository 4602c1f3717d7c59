"""`dpo.objective`: which preference loss the preference stage (`dpo.*`) trains with, and the rules
that keep each objective's own keys with it.

    dpo     pairs; the policy against a frozen reference (the SFT adapter)          trl.DPOTrainer
    kto     single replies marked desirable or not (pairs are split in two);
            against a frozen reference                                              trl.KTOTrainer
    orpo    pairs; SFT and preference in one stage, from the base model, no
            reference (its loss holds the SFT term)                                 trl.experimental ORPOTrainer
    simpo   pairs; length-normalised log-probabilities, a target margin, no
            reference                                                               trl.experimental CPOTrainer

A key that belongs to other objectives, set away from its default, would do nothing: it is
refused naming the key, as are the combinations that make no sense (ORPO continuing an SFT
adapter, KTO sharing a pair's prompt).
"""

from __future__ import annotations

from typing import Any

from mistral_align.errors import ConfigError
from mistral_align.schema.rules import at_least, choice

OBJECTIVES = ("dpo", "kto", "orpo", "simpo")
NAMES = {"dpo": "DPO", "kto": "KTO", "orpo": "ORPO", "simpo": "SimPO"}
# `dpo.beta` left null: the objective's own default (TRL's, except SimPO's, which is its paper's:
# TRL's 0.1 makes the length-normalised margin too weak to learn from).
DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0}
# The objectives that train against a frozen reference (the others have none).
WITH_REFERENCE = ("dpo", "kto")
# Each objective's own keys (and their schema defaults): set under another objective, refused.
OWN_KEYS: dict[str, tuple[tuple[str, ...], Any]] = {
    "loss_type": (("dpo",), ["sigmoid"]),
    "loss_weights": (("dpo",), None),
    "label_smoothing": (("dpo", "simpo"), 0.0),
    "precompute_ref_log_probs": (WITH_REFERENCE, False),
    "desirable_weight": (("kto",), 1.0),
    "undesirable_weight": (("kto",), 1.0),
    "simpo_gamma": (("simpo",), 0.5),
    "cpo_alpha": (("simpo",), 0.0),
    "orpo_prompt_loss": (("orpo",), False),
}


def objective_beta(d: Any) -> float:
    """The beta the objective trains with: `dpo.beta`, or the objective's default."""
    return d.beta if d.beta is not None else DEFAULT_BETA[d.objective]


def check_objective(d: Any, stages: tuple[str, ...]) -> None:
    """The `dpo` node's objective and its keys; `stages`: the stages the recipe runs."""
    choice(d.objective, "dpo.objective", OBJECTIVES)
    objective = d.objective
    if objective == "orpo" and "sft" in stages:
        raise ConfigError("dpo.objective: orpo trains SFT and the preference in one stage from the base model, so "
                          "there is no SFT stage to run before it; use recipes/dpo.py dpo.objective=orpo "
                          "(or dpo.objective=dpo/kto/simpo here)")
    foreign = {key: (owners, default) for key, (owners, default) in OWN_KEYS.items()
               if objective not in owners and _plain(d[key]) != default}
    if foreign:
        owners = sorted({o for os_, _ in foreign.values() for o in os_}, key=OBJECTIVES.index)
        raise ConfigError(
            f"{', '.join(f'dpo.{k}' for k in foreign)}: {'settings' if len(foreign) > 1 else 'a setting'} of "
            f"dpo.objective={'/'.join(owners)}, which dpo.objective={objective} would ignore; set "
            f"{'them' if len(foreign) > 1 else 'it'} back: {' '.join(f'dpo.{k}={_yaml(v)}' for k, (_, v) in foreign.items())}"
        )
    if d.beta is not None:
        at_least(d.beta, "dpo.beta", 0, strict=True)
    if objective == "orpo" and d.init_from:
        raise ConfigError(f"dpo.init_from: dpo.objective=orpo starts from the base model (its loss holds the SFT "
                          f"term), not from an SFT adapter ({d.init_from}); unset dpo.init_from, or continue the "
                          "adapter with dpo.objective=dpo/kto/simpo")
    if objective == "kto":
        if d.shared_prompt:
            raise ConfigError("dpo.shared_prompt: KTO trains single replies, not pairs, so there is no second reply "
                              "to share a prompt with; use dpo.padding_free=true")
        if d.train.per_device_batch_size < 2:
            raise ConfigError(f"dpo.train.per_device_batch_size: KTO needs at least 2 rows per batch (its KL term pairs "
                              f"each prompt with another row's reply), got {d.train.per_device_batch_size}")
    for key in ("desirable_weight", "undesirable_weight"):
        at_least(d[key], f"dpo.{key}", 0, strict=True)
    at_least(d.simpo_gamma, "dpo.simpo_gamma", 0)
    at_least(d.cpo_alpha, "dpo.cpo_alpha", 0)


def _plain(value: Any) -> Any:
    """A config value as plain Python (a ListConfig as a list), to compare with a schema default."""
    return list(value) if value is not None and not isinstance(value, (bool, int, float, str)) else value


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)
