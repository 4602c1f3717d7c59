"""Outside the repository: the wheel built from this tree carries the Hydra configs, and its
`mistral-align estimate` composes them from a directory that is not a clone (issue 17 item 7)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_estimate_runs_from_an_installed_wheel(tmp_path):
    # Built from a copy of the tree, so nothing (build/, egg-info) is written into the checkout; with
    # this environment's setuptools (--no-build-isolation), so nothing is downloaded.
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(wheels), str(tree)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("mistral_align-*.whl")

    # A fresh environment that sees this one's dependencies (a path entry for its site-packages, whose
    # own .pth files, the editable install of this checkout among them, are not processed) and holds
    # mistral-align only as installed from the wheel.
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps_of_the_test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                              "-q", str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run = subprocess.run([str(env_dir / "bin" / "mistral-align"), "estimate", "model=mistral-7b-v0.3", "quant=nf4",
                          "sft.train.max_length=4096", "--accelerate-config", str(ROOT / "configs/accelerate/deepspeed_zero3.yaml"),
                          "--json"], capture_output=True, text=True, cwd=elsewhere, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["length"] == 4096 and report["parallel"] == "zero3" and report["num_gpus"] == 8
    assert 3.8e9 <= report["weights_as_loaded"] <= 4.3e9 and report["fits"]["80GB"]
    where = subprocess.run([str(python), "-c", "import mistral_align.files as f; print(f.CONFIG_DIR)"],
                           capture_output=True, text=True, cwd=elsewhere, env=env)
    # ... and they were the installed package's own.
    config_dir = Path(where.stdout.strip())
    assert config_dir.is_relative_to(Path(site)) and (config_dir / "model" / "mistral-7b-v0.3.yaml").is_file(), where

