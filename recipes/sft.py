"""Supervised fine-tuning of a Mistral / Mixtral model with LoRA or QLoRA.

    accelerate launch [--config_file configs/accelerate/X.yaml] recipes/sft.py [hydra overrides]
    accelerate launch --config_file configs/accelerate/cpu_ddp.yaml recipes/sft.py experiment=demo
    python recipes/sft.py model=mistral-7b-v0.3 quant=nf4 peft.r=64 sft.train.lr=1e-4 'sft.data.train=[{path: my.jsonl}]'
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mistral_align.entry.recipe import exit_on_user_error, run_hydra_recipe
from mistral_align.schema.recipe import register_configs
from mistral_align.train.preflight import check_recipe

register_configs()


@hydra.main(config_path="../configs", config_name="sft", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> dict:
    # 1. Check the config and the data files first: a mistake is one line in a second, before the
    #    training code (torch, transformers, TRL: seconds to import) is imported.
    check_recipe(cfg, "sft", stages=("sft",))
    from mistral_align.train.run import finish_run, open_run
    from mistral_align.train.sft import SFTStage
    from mistral_align.train.stage import run_stage

    # 2. Start this process, open the run directory (the same on every rank).
    run = open_run(cfg, "sft", stages=("sft",))
    # 3. The SFT stage: data (exact mistral-common ids and masks) -> model (quantised, LoRA)
    #    -> evaluate before -> train -> save the adapter -> evaluate after -> summary.
    summary = run_stage(SFTStage(cfg, run))
    # 4. Loss plot and summary.json.
    return finish_run(run, summary, title=f"SFT {cfg.model.name}")


if __name__ == "__main__":
    run_hydra_recipe(main, "sft")
