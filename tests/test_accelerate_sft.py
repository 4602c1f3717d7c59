"""The real recipe under `accelerate launch`: one process, and two CPU processes (gloo DDP), each
training a tiny QLoRA model and saving ONE adapter in ONE run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"

pytestmark = pytest.mark.slow


def launch(tmp_path: Path, config: str, *overrides: str, timeout: int = 300, recipe: str = "sft") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MISTRAL_ALIGN_RUN_DIR", None)
    cmd = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "configs/accelerate" / config),
           str(ROOT / "recipes" / f"{recipe}.py"), "experiment=test_tiny", f"run.output_dir={tmp_path}", *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


def the_run_dir(tmp_path: Path) -> Path:
    runs = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs  # every rank wrote into the same directory
    return runs[0]


def check_run_dir(run: Path, world_size: int) -> dict:
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["world_size"] == world_size
    assert manifest["model"]["linear_4bit"] == 14
    assert manifest["model"]["trainable_params"] > 0
    assert len(manifest["data"]["fingerprint"]) == 64
    assert manifest["versions"]["trl"] and "commit" in manifest["git"]
    assert manifest["tokenizer_version"] == "v3"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (run / "tokenizer" / "tokenizer_config.json").is_file()
    assert (run / "config.yaml").is_file() and (run / "loss.png").is_file()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 4  # logging_steps=1, max_steps=4, one writer
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sft"]["after"]["loss"] < summary["sft"]["before"]["loss"]
    assert list((run / "checkpoints").glob("checkpoint-*"))
    return manifest


def test_one_process(tmp_path):
    launch(tmp_path, "cpu.yaml")
    check_run_dir(the_run_dir(tmp_path), world_size=1)


def test_two_processes_share_one_run_directory(tmp_path):
    out = launch(tmp_path, "cpu_ddp.yaml")
    manifest = check_run_dir(the_run_dir(tmp_path), world_size=2)
    assert manifest["distributed_type"] == "MULTI_CPU"  # gloo DDP
    assert manifest["trainer"]["world_size"] == 2 and manifest["trainer"]["parallel_mode"].endswith("DISTRIBUTED")
    # logs come once, from rank 0
    log = out.stdout + out.stderr
    assert log.count("run directory:") == 1
    assert "[rank 1] INFO" not in log


def adapter_tensors(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("recipe", ["sft", "dpo"])
def test_two_processes_train_one_model_whether_or_not_they_evaluate_first(tmp_path, recipe):
    """Evaluating before training once left the model unwrapped (no DDP): each rank trained alone and
    rank 0's adapter was saved. Evaluating must not change what is trained, and ranks must agree."""
    adapters = {}
    for before in ("true", "false"):
        out_dir = tmp_path / before
        out_dir.mkdir()
        launch(out_dir, "cpu_ddp.yaml", f"{recipe}.eval.loss_before={before}", f"{recipe}.train.max_steps=3",
               recipe=recipe)
        adapters[before] = adapter_tensors(the_run_dir(out_dir))
    assert adapters["true"].keys() == adapters["false"].keys()
    worst = max((adapters["true"][k] - adapters["false"][k]).abs().max().item() for k in adapters["true"])
    assert worst == 0.0, worst


def test_no_credentials_in_run_files(tmp_path):
    secret = "hf_THISISNOTAREALTOKEN123"
    env_token = {"HF_TOKEN": secret, "WANDB_API_KEY": secret}
    os.environ.update(env_token)
    try:
        launch(tmp_path, "cpu.yaml", "run.report_to=wandb", "run.wandb_mode=disabled", "sft.train.max_steps=1",
               "sft.train.logging_steps=1")
    finally:
        for k in env_token:
            os.environ.pop(k, None)
    run = the_run_dir(tmp_path)
    for path in run.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".jsonl", ".yaml", ".md", ".txt", ".log"}:
            assert secret not in path.read_text(errors="ignore"), path
