"""FSDP-QLoRA on a GPU (scripts/gpu_check.sh): SFT -> DPO on 4-bit weights stored in bf16 so FSDP
shards them with the other bf16 weights (configs/accelerate/fsdp_qlora.yaml), the held-out metrics
before and after each stage, the final adapters.

The generation eval (`<stage>.eval.generate`) runs on the main process alone, so under FSDP or
DeepSpeed ZeRO-3, whose processes each hold a shard of the weights, it would wait forever for the
others in its first forward pass: it is refused in one line at start (train/preflight.py), tested
here in process on the CPU with the environment `accelerate launch` sets, and for real on a GPU.

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
             "sft.train.max_steps=3", "dpo.train.max_steps=3")  # fmt: skip
GENERATE = ("sft.eval.generate=true", "sft.eval.max_prompts=4", "sft.eval.max_new_tokens=8")


def test_the_fsdp_qlora_overrides_make_a_checked_config():
    from mistral_align.entry.estimate_command import compose_config
    from mistral_align.schema.recipe import check_config

    cfg = compose_config("sft_dpo", list(OVERRIDES))
    check_config(cfg, stages=("sft", "dpo"))
    assert (cfg.quant.mode, cfg.quant.storage_dtype, cfg.quant.compute_dtype, cfg.model.dtype) == (
        "nf4", "bfloat16", "bfloat16", "bfloat16")  # what fsdp_qlora.yaml asks for
    assert not cfg.sft.eval.generate and not cfg.dpo.eval.generate and cfg.sft.synthetic.enabled


def launch_fsdp(tmp_path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """recipes/sft_dpo.py under `accelerate launch` with fsdp_qlora.yaml, one process."""
    # A free port of its own: gpu_check.sh runs this beside the sharded-save test's launches (port 29500).
    cmd = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "configs/accelerate/fsdp_qlora.yaml"),
           "--num_processes", "1", "--main_process_port", "0", str(ROOT / "recipes/sft_dpo.py"), *OVERRIDES,
           *overrides, f"run.dir={tmp_path / 'run'}"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=ENV)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp_qlora_sft_then_dpo_evaluates_and_saves_the_trained_adapters(tmp_path):
    run_dir = tmp_path / "run"
    out = launch_fsdp(tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-8000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for stage in ("sft", "dpo"):
        assert manifest[stage]["model"]["linear_4bit"] == 14, manifest[stage]["model"]  # every linear but the head
        summary = json.loads((run_dir / stage / "summary.json").read_text())
        print(f"\nFSDP-QLoRA {stage}: {summary[stage]}")
        assert set(summary[stage]) >= {"before", "after"}  # held-out metrics before and after training
        with safe_open(str(run_dir / stage / "adapter" / "adapter_model.safetensors"), "pt") as f:
            keys = set(f.keys())
        assert keys and all("lora_" in k for k in keys) and not any(".ref." in k for k in keys), sorted(keys)[:5]
        checkpoints = sorted((run_dir / stage / "checkpoints").glob("checkpoint-*"))
        assert checkpoints and all((c / "COMPLETE.json").is_file() for c in checkpoints)


@pytest.mark.parametrize("environ, refused", [
    ({"ACCELERATE_USE_FSDP": "true"}, "FSDP"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "DeepSpeed ZeRO-3"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "zero3.json"}, "DeepSpeed ZeRO-3"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, None),  # whole weights per process
    ({}, None),
])  # fmt: skip
def test_generation_eval_on_a_sharded_model_is_refused_in_one_line_at_start(tmp_path, monkeypatch, capsys, environ, refused):
    from runfixtures import run_recipe

    from mistral_align.train.preflight import sharding_launch

    (tmp_path / "zero3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    monkeypatch.chdir(tmp_path)
    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
                "ACCELERATE_DEEPSPEED_CONFIG_FILE"):  # fmt: skip
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    assert sharding_launch() == refused
    if refused is None:
        return
    # The recipe as `accelerate launch` starts it in each process: one line, exit 2, nothing written.
    with pytest.raises(SystemExit) as e:
        run_recipe("sft_dpo", [*OVERRIDES, *GENERATE, f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == (
        f"error: sft.eval.generate: the generation eval runs on the main process alone and cannot run on a model "
        f"sharded across processes by {refused}; set sft.eval.generate=false (the held-out loss and metrics are "
        "still measured), or launch with DDP (configs/accelerate/multi_gpu.yaml)")
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp_launch_refuses_the_generation_eval_before_anything_loads(tmp_path):
    """The real launcher on a GPU: FSDP's processes start, and each stops at the config check."""
    out = launch_fsdp(tmp_path, *GENERATE, timeout=300)
    assert out.returncode != 0, out.stdout[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert lines == [lines[0]] and lines[0].startswith("error: sft.eval.generate: ") and "by FSDP" in lines[0], out.stderr[-4000:]
    assert not (tmp_path / "run").exists()
