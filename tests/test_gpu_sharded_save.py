"""Saving under FSDP and DeepSpeed ZeRO-3, where every rank holds only a shard of each weight (GPU only).

Neither runs on the CPU with accelerate 1.15: its FullyShardedDataParallelPlugin raises "There are
currently no available devices found, must be one of 'XPU', 'CUDA', 'MLU', 'NPU', 'MUSA', or 'HPU'"
without an accelerator (and AcceleratorState never selects FSDP for MULTI_CPU); DeepSpeed is not
installed in the CPU environment. So these run where a GPU is lent (scripts/gpu_check.sh).

The whole SFT -> DPO pipeline (plain LoRA, float32, a few steps, a checkpoint per stage) under FSDP
(full shard) or ZeRO-3 on up to 2 GPUs must save, for each stage, an adapter that holds only the
trainable LoRA tensors (never the frozen DPO reference, never base weights), that peft loads, and
that equals what one process without sharding saves from the same seed and global batch. With one
GPU the sharded run has one process: the save paths (state-dict gathering, the DPO reference left
out) are still FSDP's / DeepSpeed's.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("MISTRAL_ALIGN_RUN_DIR", None)

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]  # fmt: skip

GLOBAL_BATCH = 2
# float32 everywhere, so that sharded and unsharded runs can be compared closely.
PIPELINE = ("experiment=test_tiny", "quant=none", "model.dtype=float32", "sft.train.bf16=false",
            "dpo.train.bf16=false", "sft.train.max_steps=3", "dpo.train.max_steps=3", "sft.train.save_steps=2",
            "dpo.train.save_steps=2", "sft.eval.loss_before=false")  # fmt: skip

SHARDED = {
    "fsdp": ["--config_file", str(ROOT / "configs/accelerate/fsdp_qlora.yaml")],  # FULL_SHARD, sharded checkpoints
    "zero3": ["--config_file", str(ROOT / "configs/accelerate/deepspeed_zero3.yaml")],
}


def pipeline(tmp_path: Path, name: str, launcher: list[str], processes: int) -> Path:
    run_dir = tmp_path / name
    per_device = GLOBAL_BATCH // processes
    cmd = [str(ACCELERATE), "launch", *launcher, "--num_processes", str(processes), "--mixed_precision", "no",
           str(ROOT / "recipes/sft_dpo.py"), *PIPELINE, f"run.dir={run_dir}",
           f"sft.train.per_device_batch_size={per_device}", f"dpo.train.per_device_batch_size={per_device}"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=ENV)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-8000:]
    return run_dir


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("one")
    return pipeline(tmp, "one", ["--config_file", str(ROOT / "configs/accelerate/single_gpu.yaml")], 1)


@pytest.mark.ranks
@pytest.mark.parametrize("kind", ["fsdp", "zero3"])
def test_sharded_runs_save_only_the_trained_adapter_and_the_same_one(kind, unsharded, tmp_path):
    if kind == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed not installed")
    processes = min(2, torch.cuda.device_count())
    sharded = pipeline(tmp_path, kind, SHARDED[kind], processes)
    for stage in ("sft", "dpo"):
        adapter = sharded / stage / "adapter"
        tensors, reference = load_file(str(adapter / "adapter_model.safetensors")), load_file(
            str(unsharded / stage / "adapter" / "adapter_model.safetensors"))
        # Only the trained LoRA tensors: no frozen DPO reference ("ref"), no base weights.
        assert tensors.keys() == reference.keys() and all("lora_" in k for k in tensors), sorted(tensors)[:5]
        assert not any(".ref." in k for k in tensors) and not (adapter / "ref").exists()
        diff = max((tensors[k].float() - reference[k].float()).abs().max().item() for k in tensors)
        print(f"\n{kind} x{processes} {stage}: max |adapter diff| vs one unsharded process = {diff:.3g}")
        assert diff <= (1e-5 if kind == "fsdp" else 1e-3)  # ZeRO-3 gathers 16-bit copies
        assert_loads_with_peft(sharded / "base", adapter)
        checkpoints = sorted((sharded / stage / "checkpoints").glob("checkpoint-*"))
        assert checkpoints and all((c / "COMPLETE.json").is_file() for c in checkpoints)


def assert_loads_with_peft(base_dir: Path, adapter_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    loaded = {n for n, _ in model.named_parameters() if "lora_" in n}
    assert loaded and all(".default." in n for n in loaded)
