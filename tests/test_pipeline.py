"""The real recipes end to end on a tiny QLoRA Mistral: SFT -> DPO in one run directory, resuming
past a finished stage, standalone DPO from an SFT run, and DPO under two-process DDP on the CPU.
One process runs in this process (runfixtures.run_recipe_script); two are launched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from runfixtures import Ran, adapter_max_diff, run_recipe_script
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
ENV.pop("MISTRAL_ALIGN_RUN_DIR", None)


def run(cmd: list[str], cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=ENV)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


def recipe(name: str, tmp_path: Path, *argv: str, expect: int = 0) -> Ran:
    """recipes/NAME in this process."""
    out = run_recipe_script(name, "experiment=test_tiny", *argv, cwd=tmp_path)
    assert out.returncode == expect, out.stdout[-3000:] + out.stderr[-6000:]
    return out


def pipeline(tmp_path: Path, run_dir: Path, *overrides: str) -> Ran:
    return recipe("sft_dpo.py", tmp_path, f"run.output_dir={tmp_path}", f"run.dir={run_dir}", *overrides)


def adapter_tensors(adapter_dir: Path) -> set[str]:
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as f:
        return set(f.keys())


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    run_dir = tmp / "run"
    # sft.* is the SFT stage, dpo.* the DPO stage, spelt the same in every recipe.
    out = pipeline(tmp, run_dir, "sft.train.max_steps=3", "dpo.beta=0.2")
    return tmp, run_dir, out


def test_pipeline_runs_both_stages_in_one_run_directory(pipeline_run):
    _, run_dir, out = pipeline_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stage"] == "sft_dpo" and manifest["world_size"] == 1
    assert manifest["sft"]["global_step"] == 3  # sft.train.max_steps reached the SFT stage
    assert manifest["dpo"]["trainer"]["beta"] == 0.2
    assert manifest["dpo"]["init_from"] == str(run_dir / "sft" / "adapter")
    assert manifest["dpo"]["reference"] == "frozen copy of the SFT adapter"
    assert manifest["sft"]["model"]["linear_4bit"] == manifest["dpo"]["model"]["linear_4bit"] == 14
    assert manifest["model"]["linear_4bit"] == 14 and manifest["tokenizer_version"] == "v3"
    assert not (run_dir / "sft" / "manifest.json").exists() and not (run_dir / "dpo" / "manifest.json").exists()

    for stage in ("sft", "dpo"):
        keys = adapter_tensors(run_dir / stage / "adapter")
        assert keys and not any(".ref." in k for k in keys)  # the frozen reference is never saved
        assert (run_dir / stage / "adapter" / "tokenizer_config.json").is_file()
    assert not (run_dir / "dpo" / "adapter" / "ref").exists()

    stages = [json.loads(line)["stage"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert stages.count("sft") >= 3 and stages.count("dpo") >= 4 and stages.index("dpo") > stages.index("sft")
    assert (run_dir / "loss.png").is_file()

    summary = json.loads((run_dir / "summary.json").read_text())
    dpo = summary["dpo"]
    # Step 0 of DPO: the policy is the reference (the SFT model), so every reward is 0 and the loss ln 2.
    assert dpo["before"]["reward_margin"] == 0.0 and dpo["before"]["reward_accuracy"] == 0.0
    assert dpo["before"]["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert dpo["after"]["reward_margin"] > dpo["before"]["reward_margin"]
    assert summary["sft"]["after"]["loss"] < summary["sft"]["before"]["loss"]
    assert "SFT -> DPO on held-out data" in out.stdout


def test_pipeline_resume_skips_a_finished_stage(pipeline_run):
    tmp, run_dir, _ = pipeline_run
    sft_adapter = run_dir / "sft" / "adapter" / "adapter_model.safetensors"
    sft_mtime = sft_adapter.stat().st_mtime_ns
    # As if the launch had died during DPO: its stage directory holds no summary.
    (run_dir / "dpo" / "summary.json").unlink()
    out = pipeline(tmp, run_dir, "sft.train.max_steps=3", "dpo.beta=0.2")
    assert "SFT stage already finished" in out.stderr + out.stdout
    assert sft_adapter.stat().st_mtime_ns == sft_mtime
    assert json.loads((run_dir / "manifest.json").read_text())["sft"]["resumed"] is True
    assert (run_dir / "dpo" / "summary.json").is_file()


@pytest.mark.ranks
def test_standalone_dpo_from_an_sft_run_under_two_processes(pipeline_run, tmp_path):
    _, run_dir, _ = pipeline_run
    out_dir = tmp_path / "ddp"
    # 2 processes x 1 pair: the same global batch as the pipeline's one-process DPO stage.
    run([str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "configs/accelerate/cpu_ddp.yaml"),
         str(ROOT / "recipes/dpo.py"), "experiment=test_tiny", f"dpo.init_from={run_dir / 'sft'}",
         f"run.output_dir={out_dir}", "dpo.beta=0.2", "dpo.train.per_device_batch_size=1"], cwd=tmp_path)  # fmt: skip
    runs = [p for p in out_dir.iterdir() if p.is_dir()]
    assert len(runs) == 1  # both ranks wrote into one run directory
    dpo_run = runs[0]
    manifest = json.loads((dpo_run / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["trainer"]["world_size"] == 2
    assert manifest["init_from"] == str(run_dir / "sft" / "adapter")
    summary = json.loads((dpo_run / "summary.json").read_text())
    assert summary["dpo"]["before"]["reward_margin"] == 0.0
    assert summary["dpo"]["after"]["reward_margin"] > 0.0
    assert adapter_tensors(dpo_run / "adapter") == adapter_tensors(run_dir / "dpo" / "adapter")  # no ".ref."
    metrics = [json.loads(line) for line in (dpo_run / "metrics.jsonl").read_text().splitlines()]
    assert len([m for m in metrics if "loss" in m]) == 4  # one writer, not one per rank
    # DDP averages the gradients of both ranks: the adapter is the one one process trains.
    diff = adapter_max_diff(dpo_run / "adapter", run_dir / "dpo" / "adapter")
    print(f"\nDDP DPO: 2 processes vs 1, same global batch: max |adapter diff| = {diff:.3g}")
    assert diff <= 1e-5


def test_standalone_dpo_with_shared_prompts_trains_the_same_adapter(pipeline_run, tmp_path):
    # dpo.shared_prompt computes each pair's prompt once; the loss, and so the adapter, stay the padded path's.
    _, run_dir, _ = pipeline_run
    out_dir = tmp_path / "shared"
    recipe("dpo.py", tmp_path, f"dpo.init_from={run_dir / 'sft'}", f"run.output_dir={out_dir}", "dpo.beta=0.2",
           "dpo.shared_prompt=true")  # fmt: skip
    (dpo_run,) = [p for p in out_dir.iterdir() if p.is_dir()]
    manifest = json.loads((dpo_run / "manifest.json").read_text())
    assert manifest["trainer"]["shared_prompt"] is True and manifest["trainer"]["padding_free"] is True
    diff = adapter_max_diff(dpo_run / "adapter", run_dir / "dpo" / "adapter")  # also: the same tensors
    print(f"\nshared-prompt DPO vs padded: max |adapter diff| = {diff:.3g}")
    assert diff <= 1e-5


def test_dpo_refuses_an_init_from_that_holds_no_adapter(tmp_path):
    out = recipe("dpo.py", tmp_path, f"dpo.init_from={tmp_path}", f"run.output_dir={tmp_path / 'runs'}", expect=2)
    assert f"dpo.init_from: {tmp_path} holds no adapter" in out.stderr


def test_dpo_refuses_a_truncated_adapter_before_the_model_loads(tmp_path):
    """An adapter cut short (a copy that stopped half way) is named, with exit 2, before anything
    loads; peft used to fail only after the base model had loaded, with safetensors' message alone."""
    from safetensors.torch import save_file
    import torch

    adapter = tmp_path / "sft" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    weights = adapter / "adapter_model.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(weights))
    size = weights.stat().st_size
    os.truncate(weights, size // 2)
    out = recipe("dpo.py", tmp_path, f"dpo.init_from={tmp_path / 'sft'}", f"run.output_dir={tmp_path / 'runs'}",
                 expect=2)
    assert out.stderr.strip() == (f"error: dpo.init_from: {weights}: truncated: {size // 2} bytes, but its header "
                                  f"describes {size}; copy the adapter again or point dpo.init_from at a whole one")
    assert not (tmp_path / "runs").exists()  # no run was opened, no model loaded
