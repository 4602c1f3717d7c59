"""SFT, then DPO (or KTO, SimPO: dpo.objective) on the SFT adapter (or model: peft=none): the whole
alignment recipe in one launch and one run directory. (ORPO is SFT and preference in one stage:
recipes/dpo.py.)

    accelerate launch [--config_file configs/accelerate/X.yaml] recipes/sft_dpo.py experiment=demo
    accelerate launch recipes/sft_dpo.py model=mistral-7b-v0.3 quant=nf4 data@sft.data=ultrachat \
        data@dpo.data=ultrafeedback sft.train.lr=1e-4 dpo.beta=0.1

    <run>/manifest.json   one manifest: shared facts, then a section per stage
    <run>/sft/  <run>/dpo/  each stage's adapter/ (or model/: peft=none), tokenizer/, checkpoints/, summary.json
    <run>/metrics.jsonl   both stages' logs (a "stage" field tells them apart), loss.png, summary.json

Resuming: run again with run.dir=<run>, and a stage whose summary.json exists is skipped.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from mistral_align.entry.recipe import exit_on_user_error, run_hydra_recipe
from mistral_align.schema.recipe import register_configs
from mistral_align.train.preflight import check_recipe

log = logging.getLogger("mistral_align")
register_configs()


@hydra.main(config_path="../configs", config_name="sft_dpo", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> dict:
    # 1. Check the config and both stages' data files first: a mistake is one line in a second
    #    (not after SFT), before the training code (torch, transformers, TRL) is imported.
    check_recipe(cfg, "sft_dpo", stages=("sft", "dpo"))
    from mistral_align.rundir.layout import finished_stage, trained_folder_name
    from mistral_align.train.dpo import DPOStage
    from mistral_align.train.report import pipeline_summary, pipeline_table
    from mistral_align.train.run import finish_run, open_run
    from mistral_align.train.sft import SFTStage
    from mistral_align.train.stage import run_stage

    # 2. Open the run directory; DPO will start from this run's SFT adapter (or, peft=none, its model).
    run = open_run(cfg, "sft_dpo", stages=("sft", "dpo"))
    sft_dir, dpo_dir = run.dir / "sft", run.dir / "dpo"
    cfg.dpo.init_from = str(sft_dir / trained_folder_name(cfg.peft.method))
    run.write_config()

    # 3. SFT, unless a previous launch of this run already finished it.
    sft = finished_stage(sft_dir)
    if sft is None:
        sft = run_stage(SFTStage(cfg, run, out_dir=sft_dir, section="sft"), print_report=False)
    else:
        log.info("SFT stage already finished in %s: skipped", sft_dir)
        run.record({"resumed": True}, "sft")

    # 4. The preference stage (dpo.objective: dpo, kto or simpo) on the SFT adapter or model (the policy;
    #    for DPO and KTO, frozen, the reference too), unless already finished.
    dpo = finished_stage(dpo_dir)
    if dpo is None:
        dpo = run_stage(DPOStage(cfg, run, out_dir=dpo_dir, section="dpo"), print_report=False)
    else:
        log.info("DPO stage already finished in %s: skipped", dpo_dir)

    # 5. One summary: SFT's gain, then DPO's, on the same held-out prompts; the model facts at the
    #    top of the manifest too, where a single-stage run keeps them.
    run.lift_stage_facts("sft")
    summary = finish_run(run, pipeline_summary(sft, dpo), title=f"SFT -> DPO {cfg.model.name}")
    if run.state.is_main_process:
        print("\n" + pipeline_table(summary, cfg.dpo.objective), flush=True)
    return summary


if __name__ == "__main__":
    run_hydra_recipe(main, "sft_dpo")
