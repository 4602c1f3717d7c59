"""FSDP-QLoRA on a GPU (scripts/gpu_check.sh): SFT -> DPO on 4-bit weights stored in bf16 so FSDP
shards them with the other bf16 weights (configs/accelerate/fsdp_qlora.yaml), the generation eval
before and after each stage, the final adapters.

The run needs a GPU: accelerate 1.15's FSDP plugin refuses a machine without an accelerator (see
tests/test_gpu_sharded_save.py). On one GPU it is one FSDP process, which still goes through FSDP's
wrapping, mixed precision, state-dict gathering and the generation eval on the wrapped model. The
overrides themselves are checked on the CPU, so a typo in them costs no device time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("MISTRAL_ALIGN_RUN_DIR", None)

OVERRIDES = ("experiment=test_tiny", "model.dtype=bfloat16", "quant.compute_dtype=bfloat16", "quant.storage_dtype=bfloat16",
             "sft.train.max_steps=3", "dpo.train.max_steps=3", "sft.eval.generate=true", "dpo.eval.generate=true",
             "sft.eval.max_prompts=4", "dpo.eval.max_prompts=4", "sft.eval.max_new_tokens=8", "dpo.eval.max_new_tokens=8")  # fmt: skip


def test_the_fsdp_qlora_overrides_make_a_checked_config():
    from mistral_align.entry.estimate_command import compose_config
    from mistral_align.schema.recipe import check_config

    cfg = compose_config("sft_dpo", list(OVERRIDES))
    check_config(cfg, stages=("sft", "dpo"))
    assert (cfg.quant.mode, cfg.quant.storage_dtype, cfg.quant.compute_dtype, cfg.model.dtype) == (
        "nf4", "bfloat16", "bfloat16", "bfloat16")  # what fsdp_qlora.yaml asks for
    assert cfg.sft.eval.generate and cfg.dpo.eval.generate and cfg.sft.synthetic.enabled


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp_qlora_sft_then_dpo_generates_and_saves_the_trained_adapters(tmp_path):
    run_dir = tmp_path / "run"
    # A free port of its own: gpu_check.sh runs this beside the sharded-save test's launches (port 29500).
    cmd = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "configs/accelerate/fsdp_qlora.yaml"),
           "--num_processes", "1", "--main_process_port", "0", str(ROOT / "recipes/sft_dpo.py"), *OVERRIDES,
           f"run.dir={run_dir}"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=ENV)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-8000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for stage in ("sft", "dpo"):
        assert manifest[stage]["model"]["linear_4bit"] == 14, manifest[stage]["model"]  # every linear but the head
        summary = json.loads((run_dir / stage / "summary.json").read_text())
        print(f"\nFSDP-QLoRA {stage}: {summary[stage]}, exact match {summary['eval'].get('exact_match')}")
        assert set(summary["eval"]["exact_match"]) == {"before", "after"} and summary["eval"]["n"] >= 1
        with safe_open(str(run_dir / stage / "adapter" / "adapter_model.safetensors"), "pt") as f:
            keys = set(f.keys())
        assert keys and all("lora_" in k for k in keys) and not any(".ref." in k for k in keys), sorted(keys)[:5]
        checkpoints = sorted((run_dir / stage / "checkpoints").glob("checkpoint-*"))
        assert checkpoints and all((c / "COMPLETE.json").is_file() for c in checkpoints)
