"""The root of every recipe's config, its place in Hydra's ConfigStore, and the check of a whole tree.

`RecipeConfig` is registered as `recipe_schema` (`register_configs()`) and the primary configs
(configs/sft.yaml, dpo.yaml, sft_dpo.yaml) start their defaults list with it, so a misspelt key or
a wrong type fails at start naming the key. `check_config(cfg, stages)` then checks what types
cannot (choices, ranges, cross-field rules) for the shared nodes and the stages a recipe runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from mistral_align.errors import ConfigError
from mistral_align.names import STAGES
from mistral_align.schema.model import ModelConfig, PeftConfig, QuantConfig, check_model, check_peft, check_quant
from mistral_align.schema.run import HubConfig, RunConfig, check_hub, check_run
from mistral_align.schema.stages import DPOStageConfig, SFTStageConfig, check_dpo_stage, check_sft_stage
from mistral_align.schema.suggest import unknown_key_message


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
    """Register the schema in Hydra's ConfigStore (idempotent). The primary configs start with `recipe_schema`."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="recipe_schema", node=RecipeConfig)


@functools.lru_cache(maxsize=1)
def _schema():
    # Built once: half of a config check's time. OmegaConf.merge copies it, never changes it.
    from omegaconf import OmegaConf

    return OmegaConf.structured(RecipeConfig)


def check_closed(cfg: Any) -> None:
    """Every node stays closed to unknown keys, also against Hydra's `+key=value`, which adds a key
    the schema does not have (only `train.extra` is free-form)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    try:
        OmegaConf.merge(_schema(), OmegaConf.to_container(cfg, resolve=False))
    except (ConfigKeyError, ConfigAttributeError) as e:
        raise ConfigError(unknown_key_message(getattr(e, "full_key", None) or "config", RecipeConfig)) from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from None


def refuse_overrides_of_other_stages(stages: tuple[str, ...], recipe: str, overrides: list[str] | None = None) -> None:
    """`dpo.beta=0.3` given to recipes/sft.py would silently do nothing: refuse it, naming the recipe.
    `overrides`: the command line's; by default those of the Hydra job running now (none outside one)."""
    if overrides is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            overrides = list(HydraConfig.get().overrides.task)
        except (ImportError, ValueError):  # not launched through @hydra.main
            return
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        package = key.split("@", 1)[1] if "@" in key else key  # data@dpo.data=... targets dpo.data
        stage = package.split(".", 1)[0]
        if stage in STAGES and stage not in stages:
            runs = [f"recipes/{r}.py" for r in ("sft", "dpo", "sft_dpo") if stage in r.split("_")]
            raise ConfigError(
                f"{package}: recipes/{recipe}.py runs no {stage.upper()} stage; {' or '.join(runs)} does"
            )


def check_config(cfg: Any, stages: tuple[str, ...] = STAGES, need_data: bool = True) -> None:
    """Everything types alone cannot check, for the shared nodes and the `stages` a recipe runs.
    Raises ConfigError naming the key. Call it before anything loads. `need_data=False` (estimate)
    accepts a stage with no data source."""
    check_closed(cfg)
    check_model(cfg.model)
    check_quant(cfg.quant)
    check_peft(cfg.peft, cfg.quant.mode)
    check_hub(cfg.hub)
    check_run(cfg.run)
    if "sft" in stages:
        check_sft_stage(cfg.sft, need_data)
    if "dpo" in stages:
        check_dpo_stage(cfg.dpo, cfg.model.attn_implementation, need_data, stages)
    for stage in stages:  # the generated tool_call rows offer tools, which v1 has no tokens for
        s = cfg[stage].synthetic
        if s.enabled and "tool_call" in s.skills and cfg.model.tokenizer_version == "v1":
            raise ConfigError(f"{stage}.synthetic.skills: tool_call needs a tokenizer version with tools, not "
                              f"model.tokenizer_version=v1 (leave tool_call out of the skills, or use v2 or later)")


def stage_max_length(stage: Any) -> int:
    """The sequence length a stage's trainer cuts at: its train.max_length, else its data.max_length."""
    return stage.train.max_length if stage.train.max_length is not None else stage.data.max_length
