"""Preference optimisation (dpo.objective: dpo, kto, orpo, simpo) with LoRA or QLoRA: of an SFT
adapter (DPO and KTO against the SFT model; SimPO without a reference), or, for ORPO, of a new
adapter on the base model (SFT and preference in one stage). With peft=none, of a fully fine-tuned
SFT model (its frozen copy the reference).

    accelerate launch [--config_file configs/accelerate/X.yaml] recipes/dpo.py dpo.init_from=runs/sft-... [overrides]
    accelerate launch recipes/dpo.py model=mistral-7b-v0.3 quant=nf4 dpo.init_from=me/my-sft-adapter \
        'dpo.data.train=[{path: prefs.jsonl}]' dpo.beta=0.1 dpo.train.lr=5e-6
    accelerate launch recipes/dpo.py dpo.objective=kto dpo.init_from=runs/sft-... 'dpo.data.train=[{path: kto.jsonl}]'
    accelerate launch recipes/dpo.py dpo.objective=orpo model=mistral-7b-v0.3 quant=nf4 'dpo.data.train=[{path: prefs.jsonl}]'
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mistral_align.entry.recipe import exit_on_user_error, run_hydra_recipe
from mistral_align.schema.objectives import NAMES
from mistral_align.schema.recipe import register_configs
from mistral_align.train.preflight import check_recipe

register_configs()


@hydra.main(config_path="../configs", config_name="dpo", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> dict:
    # 1. Check the config and the data files first: a mistake is one line in a second, before the
    #    training code (torch, transformers, TRL: seconds to import) is imported.
    check_recipe(cfg, "dpo", stages=("dpo",))
    from mistral_align.train.dpo import DPOStage, same_base_as_sft_run
    from mistral_align.train.run import finish_run, open_run
    from mistral_align.train.stage import run_stage

    # 2. The stage continues the SFT adapter (or model), so it needs the exact base (and quantisation)
    #    SFT trained on: given an SFT run directory, model, quant, peft and run.seed come from its config.
    if cfg.dpo.init_from:
        cfg = same_base_as_sft_run(cfg)
    run = open_run(cfg, "dpo", stages=("dpo",))
    # 3. The preference stage: pairs or KTO rows (exact ids) -> the SFT adapter or model as policy (DPO,
    #    KTO: its frozen copy as reference) -> evaluate before -> train -> save adapter/ (or model/)
    #    -> evaluate after -> summary.
    summary = run_stage(DPOStage(cfg, run))
    # 4. Loss plot and summary.json.
    return finish_run(run, summary, title=f"{NAMES[cfg.dpo.objective]} {cfg.model.name}")


if __name__ == "__main__":
    run_hydra_recipe(main, "dpo")
