"""SFT, then DPO on the SFT adapter: the whole alignment recipe in one launch and one run directory.

    accelerate launch [--config_file configs/accelerate/X.yaml] recipes/sft_dpo.py experiment=demo
    accelerate launch recipes/sft_dpo.py model=mistral-7b-v0.3 quant=nf4 data=ultrachat \
        data@dpo.data=ultrafeedback sft.train.lr=1e-4 dpo.beta=0.1

    <run>/manifest.json   one manifest: shared facts, then a section per stage
    <run>/sft/            the SFT stage: adapter/, tokenizer/, checkpoints/, summary.json
    <run>/dpo/            the DPO stage, started from sft/adapter (also its frozen reference)
    <run>/metrics.jsonl   both stages' logs (a "stage" field tells them apart), loss.png, summary.json

Resuming: run again with run.dir=<run> and a stage whose summary.json exists is skipped.
The SFT stage's settings are the top-level data/train/eval/synthetic nodes; `sft.X=...` on the
command line is accepted as a spelling of `X=...` for them.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import hydra
from omegaconf import DictConfig

from dpo import format_preference_table, run_dpo  # recipes/ is on sys.path: the script's own directory
from mistral_align.config import check_config, check_dpo_config, register_configs
from mistral_align.train.callbacks import plot_loss
from mistral_align.train.run import base_manifest, init_state, report_user_errors, resolve_run_dir, setup_logging, write_json, write_manifest, write_resolved_config
from sft import run_sft

log = logging.getLogger("mistral_align.sft_dpo")
register_configs()


def sft_alias(argv: list[str]) -> list[str]:
    """`sft.train.lr=1e-4` -> `train.lr=1e-4` (also with +, ++ or ~ in front)."""
    out = []
    for arg in argv:
        prefix = arg[: len(arg) - len(arg.lstrip("+~"))]
        body = arg[len(prefix):]
        out.append(prefix + body[len("sft."):] if body.startswith("sft.") else arg)
    return out


def finished(stage_dir) -> dict | None:
    path = stage_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() and (stage_dir / "adapter").is_dir() else None


@hydra.main(config_path="../configs", config_name="sft_dpo", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> dict:
    t0 = time.time()
    check_config(cfg)
    check_dpo_config(cfg)
    state = init_state()
    setup_logging(state)
    run_dir = resolve_run_dir(cfg.run, state)
    log.info("run directory: %s (world size %d)", run_dir, state.num_processes)
    cfg.dpo.init_from = str(run_dir / "sft" / "adapter")
    write_resolved_config(run_dir, cfg)
    write_manifest(run_dir, base_manifest("sft_dpo", state))

    # 1. SFT, unless a previous launch of this run already finished it.
    sft_dir, dpo_dir = run_dir / "sft", run_dir / "dpo"
    sft = finished(sft_dir)
    if sft is None:
        sft_dir.mkdir(exist_ok=True)
        sft = run_sft(cfg, sft_dir, state, manifest_dir=run_dir, section="sft")
    else:
        log.info("SFT stage already finished in %s: skipped", sft_dir)
        write_manifest(run_dir, {"resumed": True}, "sft")

    # 2. DPO on the SFT adapter (policy and reference), unless already finished.
    dpo = finished(dpo_dir)
    if dpo is None:
        dpo_dir.mkdir(exist_ok=True)
        dpo = run_dpo(cfg, dpo_dir, state, manifest_dir=run_dir, section="dpo", print_tables=False)
    else:
        log.info("DPO stage already finished in %s: skipped", dpo_dir)

    # 3. One summary: SFT's gain, then DPO's, on the same held-out prompts.
    summary = {"sft": sft["sft"], "dpo": dpo["dpo"], "eval": {}}
    if sft.get("eval") and dpo.get("eval"):
        em = {"before": sft["eval"]["exact_match"]["before"], "after_sft": sft["eval"]["exact_match"]["after"],
              "after_dpo": dpo["eval"]["exact_match"]["after"]}
        em["after"] = em["after_dpo"]
        by_skill = {"before": sft["eval"]["by_skill"]["before"], "after_sft": sft["eval"]["by_skill"]["after"],
                    "after_dpo": dpo["eval"]["by_skill"]["after"]}
        summary["eval"] = {"exact_match": em, "by_skill": by_skill, "n": dpo["eval"]["n"],
                           "samples_after": dpo["eval"]["samples_after"]}
    if state.is_main_process:
        plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png", title=f"SFT -> DPO {cfg.model.name}")
        summary["wall_seconds"] = round(time.time() - t0, 1)
        write_json(run_dir / "summary.json", summary)
        print("\n" + format_pipeline_table(summary), flush=True)
        # The shared facts at the top level too, where a single-stage run keeps them.
        stages = json.loads((run_dir / "manifest.json").read_text())
        write_manifest(run_dir, {key: stages["sft"][key] for key in ("model", "tokenizer_version") if key in stages["sft"]})
    write_manifest(run_dir, {"summary": "summary.json", "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    log.info("done in %.0fs: %s", time.time() - t0, run_dir)
    return summary


def format_pipeline_table(summary: dict) -> str:
    lines = ["SFT -> DPO on held-out data"]
    em = summary["eval"].get("exact_match")
    if em:
        lines.append(f"{'':<18}{'base':>10}{'after SFT':>11}{'after DPO':>11}")
        lines.append(f"{'exact match':<18}{em['before']:10.1%}{em['after_sft']:11.1%}{em['after_dpo']:11.1%}")
        s = summary["eval"]["by_skill"]
        for skill in s["after_dpo"]:
            lines.append(f"{'  ' + skill:<18}{s['before'].get(skill, 0):10.1%}{s['after_sft'].get(skill, 0):11.1%}"
                         f"{s['after_dpo'][skill]:11.1%}")
    sft = summary["sft"]
    if "eval_loss_before" in sft:
        lines.append(f"{'SFT eval loss':<18}{sft['eval_loss_before']:10.3f}{sft['eval_loss_after']:11.3f}")
    dpo = summary["dpo"]
    if "before" in dpo:
        lines.append("")
        lines.append(format_preference_table(dpo["before"], dpo["after"], labels=("after SFT", "after DPO")))
    lines.append(f"wall time {summary.get('wall_seconds', 0):.0f}s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.argv = sft_alias(sys.argv)
    main()
