"""Direct preference optimisation of an SFT adapter (LoRA or QLoRA), or of a fully fine-tuned SFT model
(peft=none), against the SFT model.

    accelerate launch [--config_file configs/accelerate/X.yaml] recipes/dpo.py dpo.init_from=runs/sft-... [overrides]
    accelerate launch recipes/dpo.py model=mistral-7b-v0.3 quant=nf4 dpo.init_from=me/my-sft-adapter \
        'dpo.data.train=[{path: prefs.jsonl}]' dpo.beta=0.1 dpo.train.lr=5e-6
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mistral_align.entry.recipe import exit_on_user_error, run_hydra_recipe
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

    # 2. DPO continues the SFT adapter (or model), so it needs the exact base (and quantisation) SFT
    #    trained on: given an SFT run directory, model, quant, peft and run.seed come from that run's config.
    if cfg.dpo.init_from:
        cfg = same_base_as_sft_run(cfg)
    run = open_run(cfg, "dpo", stages=("dpo",))
    # 3. The DPO stage: preference pairs (exact ids) -> the SFT adapter (or model) as policy, its frozen
    #    copy as reference -> evaluate before -> train -> save adapter/ (or model/) -> evaluate after -> summary.
    summary = run_stage(DPOStage(cfg, run))
    # 4. Loss plot and summary.json.
    return finish_run(run, summary, title=f"DPO {cfg.model.name}")


if __name__ == "__main__":
    run_hydra_recipe(main, "dpo")
