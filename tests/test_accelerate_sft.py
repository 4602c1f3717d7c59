"""The real recipe under `accelerate launch`: one process, and two CPU processes (gloo DDP), each
training a tiny QLoRA model and saving ONE adapter in ONE run directory; two processes train the
same adapter as one process given the same global batch. What needs no launcher (no credential in
any file written) runs the recipe in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from doc_commands import as_run_here, doc_commands
from runfixtures import adapter_max_diff, run_recipe_script

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"

pytestmark = pytest.mark.slow

# Three steps of 2 rows: full batches only. The packed tiny data ends in a partial batch, which one
# process trains alone and two processes fill up with a repeated row (accelerate's even_batches).
STEPS = 3


def launch(tmp_path: Path, config: str, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MISTRAL_ALIGN_RUN_DIR", None)
    if config == "cpu_ddp.yaml":  # the command docs/launching.md shows, as written
        (shown,) = doc_commands("--config_file configs/accelerate/cpu_ddp.yaml recipes/sft.py experiment=test_tiny")
        command = as_run_here(shown)
    else:
        command = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "configs/accelerate" / config),
                   str(ROOT / "recipes/sft.py"), "experiment=test_tiny"]  # fmt: skip
    cmd = [*command, f"run.output_dir={tmp_path}", *overrides]
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
    assert len(losses) == STEPS  # logging_steps=1, one writer
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sft"]["after"]["loss"] < summary["sft"]["before"]["loss"]
    assert list((run / "checkpoints").glob("checkpoint-*"))
    return manifest


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """A one-process run: 2 rows a step."""
    tmp_path = tmp_path_factory.mktemp("one")
    launch(tmp_path, "cpu.yaml", f"sft.train.max_steps={STEPS}")
    return the_run_dir(tmp_path)


def test_one_process(one_process):
    manifest = check_run_dir(one_process, world_size=1)
    assert manifest["num_nodes"] == 1


@pytest.mark.ranks
def test_two_processes_share_one_run_directory_and_train_one_model(tmp_path, one_process):
    # 2 processes x 1 row: the same global batch as the one-process run.
    out = launch(tmp_path, "cpu_ddp.yaml", f"sft.train.max_steps={STEPS}", "sft.train.per_device_batch_size=1")
    run = the_run_dir(tmp_path)
    manifest = check_run_dir(run, world_size=2)
    assert manifest["distributed_type"] == "MULTI_CPU"  # gloo DDP
    assert manifest["trainer"]["world_size"] == 2 and manifest["trainer"]["parallel_mode"].endswith("DISTRIBUTED")
    assert manifest["num_nodes"] == 1
    # logs come once, from rank 0
    log = out.stdout + out.stderr
    assert log.count("run directory:") == 1
    assert "[rank 1] INFO" not in log
    # Gradients are averaged over the ranks (DDP really wraps the model, also with the held-out
    # evaluation before training: train/hooks.py), so the saved adapter is the one-process adapter.
    diff = adapter_max_diff(one_process / "adapter", run / "adapter")  # also: the same tensors
    print(f"\nDDP: 2 processes vs 1, same global batch: max |adapter diff| = {diff:.3g}")
    assert diff <= 1e-5


def test_no_credentials_in_run_files(tmp_path, monkeypatch):
    secret = "hf_THISISNOTAREALTOKEN123"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("WANDB_API_KEY", secret)
    out = run_recipe_script("sft.py", "experiment=test_tiny", f"run.output_dir={tmp_path}", "run.report_to=wandb",
                     "run.wandb_mode=disabled", "sft.train.max_steps=1", "sft.train.logging_steps=1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-6000:]
    assert secret not in out.stdout + out.stderr
    run = the_run_dir(tmp_path)
    for path in run.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".jsonl", ".yaml", ".md", ".txt", ".log"}:
            assert secret not in path.read_text(errors="ignore"), path


# -- a GPU-only accelerate config on a machine without GPUs ---------------------------------------

GPU_ONLY_MESSAGE = "error: this accelerate config asks for GPUs ({}), but torch finds no CUDA GPU on this machine"


@pytest.mark.ranks
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without GPUs")
def test_a_gpu_only_config_on_the_cpu_stops_every_process_with_one_line(tmp_path):
    """fsdp_qlora.yaml here used to start its processes, each loading data and a model and failing
    with its own traceback (124 lines with 2 processes, 345 with the config's 8). Now every rank
    stops before anything loads and rank 0 says why, once.

    What follows our line is torchrun's own report (about 40 lines, a traceback of the `accelerate`
    command itself, exit code 1): accelerate raises whenever a process exits non-zero, before and
    outside our code, so the launcher's exit code cannot be 2. Each process did exit 2."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("MISTRAL_ALIGN_RUN_DIR", None)
    cmd = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "configs/accelerate/fsdp_qlora.yaml"),
           "--num_processes", "2", "--main_process_port", "0", str(ROOT / "recipes/sft.py"), "experiment=test_tiny",
           f"run.output_dir={tmp_path / 'runs'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert out.returncode != 0
    message = GPU_ONLY_MESSAGE.format("distributed_type FSDP")
    ours = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and ours[0].startswith(message), out.stderr[-3000:]
    assert "cpu_ddp.yaml" in ours[0]
    # Our processes printed no traceback: the one left is the launcher's, naming exit code 2.
    assert out.stderr.count("Traceback") == 1 and "mistral_align" not in out.stderr, out.stderr[-3000:]
    assert "exitcode  : 2" in out.stderr
    assert len(out.stderr.splitlines()) < 50, out.stderr
    assert "[rank 0] INFO" not in out.stderr  # nothing was loaded: no run directory, no data
    assert not (tmp_path / "runs").exists()


def test_which_launches_ask_for_gpus():
    from mistral_align.train.process import _gpu_only_launch

    two = {"WORLD_SIZE": "2"}
    assert _gpu_only_launch({**two, "ACCELERATE_USE_FSDP": "true"}) == "distributed_type FSDP"
    assert _gpu_only_launch({"ACCELERATE_USE_FSDP": "true"}) == "distributed_type FSDP"  # even one process
    assert _gpu_only_launch({**two, "ACCELERATE_USE_DEEPSPEED": "true"}) == "distributed_type DEEPSPEED"
    # multi_gpu.yaml / multi_node.yaml (bf16) against cpu_ddp.yaml (no mixed precision): both MULTI_GPU.
    assert _gpu_only_launch({**two, "ACCELERATE_MIXED_PRECISION": "bf16"}) == "multi-GPU DDP with mixed_precision bf16"
    assert _gpu_only_launch({**two, "ACCELERATE_MIXED_PRECISION": "no"}) is None
    assert _gpu_only_launch({"ACCELERATE_MIXED_PRECISION": "bf16"}) is None  # single_gpu.yaml: one process
    assert _gpu_only_launch({}) is None
