"""What a new user runs first, run as they would: the README's commands on the shipped example
files, a sweep, and the mistakes in data that must end in one line (issue 10)."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from doc_commands import DocCommand, doc_commands

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
ENV.pop("MISTRAL_ALIGN_RUN_DIR", None)


def recipe_commands(commands: list[DocCommand]) -> list[list[str]]:
    """The `.venv/bin/python recipes/...` ones among the docs' commands, each once, as argv lists."""
    texts = dict.fromkeys(c.text for c in commands if c.text.startswith(".venv/bin/python recipes/"))
    assert texts, [c.text for c in commands]
    return [[sys.executable, *shlex.split(t)[1:]] for t in texts]


def checkout(tmp_path: Path) -> Path:
    """A working directory that looks like the repository root to a command, and keeps `runs/` here."""
    for name in ("recipes", "configs", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def losses(run: Path) -> list[float]:
    return [m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_readme_example_commands_train_on_the_example_files(tmp_path, monkeypatch):
    """The example files have 10 rows: the default eval_fraction (2%, 5%) used to leave 0 eval rows
    and stop the run; now one row is held out, with a note, and both stages train. Then the README's
    KTO, SimPO and ORPO commands, on the same files (in this process, as `python recipes/dpo.py ...`)."""
    cwd = checkout(tmp_path)
    sft_cmd, dpo_cmd = [c for c in recipe_commands(doc_commands("examples/data/")) if "dpo.objective=" not in " ".join(c)]
    assert "recipes/sft.py" in sft_cmd[1] and "recipes/dpo.py" in dpo_cmd[1]
    old = os.umask(0o022)
    try:
        sft = subprocess.run(sft_cmd, capture_output=True, text=True, timeout=400, cwd=cwd, env=ENV)
        assert sft.returncode == 0, sft.stderr[-4000:]
        dpo = subprocess.run(dpo_cmd, capture_output=True, text=True, timeout=400, cwd=cwd, env=ENV)
        assert dpo.returncode == 0, dpo.stderr[-4000:]
    finally:
        os.umask(old)
    assert "sft.data.eval_fraction=0.02 of 10 training row(s) is 0.2 rows: holding out 1 row(s)" in sft.stderr
    assert "SFT data: 9 train rows, 1 eval rows" in sft.stderr
    run = cwd / "runs" / "example-sft"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sft"]["steps"] == 10 and "after" in summary["sft"]
    assert losses(run)[-1] < losses(run)[0]  # it trained
    assert "dpo.data.eval_fraction=0.05 of 10 training row(s) is 0.5 rows: holding out 1 row(s)" in dpo.stderr
    (dpo_run,) = [p for p in (cwd / "runs").iterdir() if p.name.startswith("dpo-")]
    assert json.loads((dpo_run / "summary.json").read_text())["dpo"]["steps"] == 10
    # Saved weights follow the umask like every other file (safetensors alone writes 0600).
    for path in (run / "adapter" / "adapter_model.safetensors", run / "base" / "model.safetensors",
                 dpo_run / "adapter" / "adapter_model.safetensors", run / "adapter" / "adapter_config.json"):
        assert mode(path) == 0o644, (path, oct(mode(path)))
    objectives = recipe_commands(doc_commands("dpo.objective="))
    assert [o for c in objectives for o in c if o.startswith("dpo.objective=")] == [
        "dpo.objective=kto", "dpo.objective=simpo", "dpo.objective=orpo"]  # fmt: skip
    monkeypatch.chdir(cwd)
    for key in ("OMP_NUM_THREADS", "WANDB_MODE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, ENV[key])
    for cmd in objectives:
        objective = next(o.split("=")[1] for o in cmd if o.startswith("dpo.objective="))
        assert run_in_process(cmd, monkeypatch) == 0, objective
        run = cwd / "runs" / f"example-{objective}"
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["trainer"]["objective"] == objective
        assert json.loads((run / "summary.json").read_text())["dpo"]["steps"] == 4
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
        # KTO and SimPO continue the SFT adapter; ORPO starts a new one on the base model.
        assert (manifest["init_from"] is None) == (objective == "orpo"), manifest["init_from"]
        # The pushed model card names the objective (tag, title line, settings).
        from mistral_align.entry.cli import main as cli

        assert cli(["push", str(run), "--repo-id", f"me/{objective}", "--dry-run", str(tmp_path / f"push-{objective}")]) == 0
        card = (tmp_path / f"push-{objective}" / "README.md").read_text()
        name = {"kto": "KTO", "simpo": "SimPO", "orpo": "ORPO"}[objective]
        assert f'\n  - "{objective}"\n' in card and f"({name} stage, " in card and f"- {name}: beta=" in card

    run_adapter_commands(cwd, monkeypatch)


def run_adapter_commands(cwd: Path, monkeypatch) -> None:
    """The docs' push (dry run), merge, export-gguf and chat commands on runs/example-sft, as written,
    from the checkout (merge first: the others read its folder). The interactive chat reads a
    scripted stdin."""
    import io

    from mistral_align.entry.cli import main as cli

    commands = [*doc_commands("mistral-align push runs/example-sft"), *doc_commands("mistral-align merge runs/example-sft"),
                *doc_commands("mistral-align export-gguf merged/"), *doc_commands("mistral-align chat")]  # fmt: skip
    texts = dict.fromkeys(c.text for c in sorted(commands, key=lambda c: c.argv[1] != "merge") if not c.marks)
    assert len(texts) >= 6, texts
    for text in texts:
        argv = shlex.split(text)[1:]
        monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n/exit\n"))
        assert cli(argv) == 0, text
    assert (cwd / "pushed" / "adapter_model.safetensors").is_file()
    assert (cwd / "merged" / "config.json").is_file() and (cwd / "model.f16.gguf").stat().st_size > 0


def run_in_process(cmd: list[str], monkeypatch) -> int:
    """`python recipes/X.py ARGS` (a README command's argv) in this process; its exit code."""
    import runpy

    monkeypatch.setattr(sys, "argv", cmd[1:])
    try:
        runpy.run_path(cmd[1], run_name="__main__")
    except SystemExit as e:
        return e.code
    return 0


def test_a_sweep_records_each_jobs_own_overrides_and_checkpoints_are_readable(tmp_path):
    cmd = [sys.executable, str(ROOT / "recipes/sft.py"), "-m", "experiment=test_tiny", "sft.train.lr=1e-3,2e-3",
           f"run.output_dir={tmp_path / 'runs'}", "sft.train.save_total_limit=2"]
    old = os.umask(0o022)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=ENV)
    finally:
        os.umask(old)
    assert out.returncode == 0, out.stderr[-4000:]
    manifests = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").glob("test-tiny-*/manifest.json"))]
    assert len(manifests) == 2
    by_lr = {}
    for m in manifests:
        (lr,) = [o for o in m["overrides"] if o.startswith("sft.train.lr=")]
        by_lr[lr] = m
        assert m["command"] == ["sft.py", *m["overrides"]]
        assert "1e-3,2e-3" not in " ".join(m["command"])  # the sweep, not this job
        assert m["sweep"]["command"] == ["sft.py", *cmd[2:]]
    assert sorted(by_lr) == ["sft.train.lr=0.001", "sft.train.lr=0.002"]
    assert sorted(m["sweep"]["job"] for m in manifests) == [0, 1]
    checkpoints = list((tmp_path / "runs").glob("test-tiny-*/checkpoints/checkpoint-*/adapter_model.safetensors"))
    assert checkpoints and all(mode(p) == 0o644 for p in checkpoints), [oct(mode(p)) for p in checkpoints]


def _recipe(tmp_path: Path, recipe: str, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "recipes" / recipe), f"run.output_dir={tmp_path / 'runs'}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ENV)


def test_data_mistakes_end_the_recipes_in_one_line(tmp_path):
    """A lone surrogate, an empty file, a directory: one line naming the file, exit 2, before any model."""
    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                   '{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "b"}]}\n')
    dpo = tmp_path / "dpo.jsonl"
    dpo.write_text('{"prompt": "p", "chosen": "a\\udfff", "rejected": "b"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        ("sft.py", f"sft.data.train=[{{path: {sft}}}]",
         f"error: 1 bad row(s) in the SFT data (fix them, or set sft.data.on_bad_rows=skip to drop them):\n"
         f"{sft}:2: messages[0].content: not valid Unicode: a lone surrogate \\ud800 at character 0"),
        ("dpo.py", f"dpo.data.train=[{{path: {dpo}}}]",
         f"error: 1 bad row(s) in the DPO data (fix them, or set dpo.data.on_bad_rows=skip to drop them):\n"
         f"{dpo}:1: chosen: not valid Unicode: a lone surrogate \\udfff at character 1"),
        ("dpo.py", f"dpo.data.train=[{{path: {empty}}}]", f"error: {empty}: has no rows"),
        ("sft.py", f"sft.data.train=[{{path: {tmp_path}}}]", f"error: {tmp_path}: is a directory"),
    ]
    for recipe, data, message in cases:
        out = _recipe(tmp_path, recipe, data)
        assert out.returncode == 2, out.stderr[-3000:]
        errors = out.stderr[out.stderr.index("error: "):]
        assert errors.startswith(message), errors
        assert "Traceback" not in out.stderr and "model:" not in out.stderr  # the model never loaded
    # on_bad_rows=skip trains on the rest.
    out = _recipe(tmp_path, "sft.py", f"sft.data.train=[{{path: {sft}}}]", "sft.data.on_bad_rows=skip",
                  "sft.data.eval_fraction=0", "sft.train.max_steps=1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "skipped 1 of 2 rows (1 invalid Unicode)" in out.stderr
