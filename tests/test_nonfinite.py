"""Non-finite steps (train/nonfinite.py, `train.on_nonfinite: stop | skip`).

The fast tests prove the row tracing: every row of a batch, packed or not, is named by its real
FILE:LINE. The slow ones run the real recipes with a real NaN (tests/fault_recipe.py: a forward hook
on the model's final norm layer poisons chosen training forwards), in this process, and under two
processes: stop names the step, the rows of the bad micro-batch and the last complete checkpoint in
one `error:` line; skip leaves the weights exactly as they were, counts the step and trains on; with
two processes a NaN on one rank stops or skips the step on both.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

from mistral_align.chat.encoder import get_encoder
from mistral_align.data.encode import check_row
from mistral_align.data.load import load_dpo_dataset, load_sft_dataset
from mistral_align.schema.data import DataConfig, SFTDataConfig, SourceConfig
from mistral_align.train.nonfinite import ROW_KEYS, RowKeysCollator, RowNames

from fault_recipe import with_faults
from runfixtures import run_recipe_script

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT / "src")}  # fmt: skip
ENV.pop("MISTRAL_ALIGN_RUN_DIR", None)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _write(path: Path, lines: list) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def _sft(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"say {i} " * (1 + i % 4)},
                         {"role": "assistant", "content": f"number {i}"}]}  # fmt: skip


def _line(origin: str) -> str:
    path, line = origin.rsplit(":", 1)
    return Path(path).read_text().split("\n")[int(line) - 1]


def test_packed_sft_batches_name_every_row_by_file_and_line(tmp_path):
    from trl import pack_dataset

    # Blank lines and a bad row (skipped) so that line numbers and row positions differ; two sources,
    # one repeated by its weight, and an eval split that shuffles the training rows.
    a = _write(tmp_path / "a.jsonl", [_sft(i) for i in range(6)] + ["", "{not json", _sft(6)])
    b = _write(tmp_path / "b.jsonl", ["", _sft(10), _sft(11)])
    cfg = SFTDataConfig(train=[SourceConfig(a), SourceConfig(b, weight=3)], eval_fraction=0.2, on_bad_rows="skip")
    v3 = get_encoder("v3")
    data = load_sft_dataset(cfg, v3)
    assert len(data.train_rows) == len(data.train) and data.train.column_names == ["input_ids", "labels"]
    for origin, row in zip(data.train_rows, data.train):  # each origin is the line the row was encoded from
        assert check_row("sft", _line(origin), v3).ids["input_ids"] == row["input_ids"]

    # As the trainer sees them: packed (bfd), in batches of 2 packed rows; the collator adds the keys.
    packed = pack_dataset(data.train.select_columns(["input_ids", "labels"]), 64, "bfd")
    collate = RowKeysCollator(lambda examples: {"input_ids": "batch"})
    names = RowNames("sft", data.train, data.train_rows, max_length=64)
    seen = []
    for start in range(0, len(packed), 2):
        examples = [packed[i] for i in range(start, min(start + 2, len(packed)))]
        batch = collate(examples)
        assert batch["input_ids"] == "batch" and len(batch[ROW_KEYS]) == sum(len(e["seq_lengths"]) for e in examples)
        seen += names(batch[ROW_KEYS])
    assert sorted(set(seen)) == sorted(set(data.train_rows)) and "not traced" not in " ".join(seen)


def test_preference_batches_name_their_pairs(tmp_path):
    rows = [{"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    path = _write(tmp_path / "prefs.jsonl", rows[:2] + [""] + rows[2:])
    data = load_dpo_dataset(DataConfig(train=[SourceConfig(path)]), get_encoder("v3"))
    collate = RowKeysCollator(lambda examples: {})
    batch = collate([data.train[3], data.train[1]])
    assert RowNames("dpo", data.train, data.train_rows)(batch[ROW_KEYS]) == [f"{path}:5", f"{path}:2"]
    # A sequence that is no row (a cut one) is counted, not misnamed.
    assert RowNames("dpo", data.train, data.train_rows)([123]) == ["1 sequence(s) not traced to a row"]


def test_on_nonfinite_is_checked_in_both_stages():
    from hydra import compose, initialize_config_dir

    from mistral_align.errors import ConfigError
    from mistral_align.schema.recipe import check_config, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("sft_dpo", overrides=["experiment=test_tiny"])
        assert cfg.sft.train.on_nonfinite == "stop" and cfg.dpo.train.on_nonfinite == "stop"
        check_config(cfg)
        cfg.dpo.train.on_nonfinite = "ignore"
        with pytest.raises(ConfigError, match=r"dpo.train.on_nonfinite: 'ignore' is not one of stop, skip"):
            check_config(cfg)


# -- real runs -------------------------------------------------------------------------------------

slow = pytest.mark.slow


def _run(tmp_path, recipe: str, run_dir: Path, *overrides: str, nan_at: str, stage: str = "sft", expect=0,
         monkeypatch=None, launch: list[str] | None = None, nan_rank: str | None = None):
    """The recipe with NaN training forwards at `nan_at`: in this process (monkeypatch), or started by `launch`."""
    faults = {"NAN_STAGE": stage, "NAN_AT": nan_at, "NAN_DUMP": str(tmp_path / "nan_batches.jsonl")}
    if nan_rank is not None:
        faults["NAN_RANK"] = nan_rank
    args = ["experiment=test_tiny", f"run.dir={run_dir}", *overrides]
    if launch is None:
        with monkeypatch.context() as m:
            for key, value in faults.items():
                m.setenv(key, value)
            with_faults(m)
            out = run_recipe_script(recipe, *args, cwd=tmp_path)
    else:
        out = subprocess.run([*launch, str(ROOT / "tests" / "fault_recipe.py"), recipe, *args], capture_output=True,
                             text=True, timeout=900, cwd=tmp_path, env={**ENV, **faults})  # fmt: skip
    assert out.returncode == expect, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def _error_line(stderr: str, one_process: bool = True) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-5000:]
    if one_process:  # (accelerate's launcher reports a failed rank with a traceback of its own)
        assert "Traceback" not in stderr, stderr[-5000:]
    return lines[0]


def _named_rows(line: str) -> list[str]:
    return line.split("(rows: ", 1)[1].split(");", 1)[0].split(", ")


def _contents(names: list[str]) -> set[str]:
    """The distinct rows named (the synthetic data repeats some rows; every line holding the ids of a
    row in the batch is named)."""
    return {_line(n) for n in names}


def _adapter(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "adapter_model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _train_rows(run_dir: Path, stage: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == stage and "loss" in r]


# Unpacked rows, batches of 2, 2 micro-batches a step: micro-batch 4 is the first half of step 3.
SFT = ("sft.train.packing=false", "sft.train.grad_accum=2", "sft.train.save_steps=1", "sft.eval.loss_before=false")


@slow
def test_sft_nan_stops_naming_the_step_its_rows_and_the_last_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    out = _run(tmp_path, "sft.py", run, *SFT, "sft.train.save_total_limit=null", nan_at="4", expect=2,
               monkeypatch=monkeypatch)
    line = _error_line(out.stderr)
    assert line.startswith("error: SFT: non-finite loss at step 3 (rows: ")
    assert f"last good checkpoint: {run / 'checkpoints' / 'checkpoint-2'};" in line
    assert "sft.train.on_nonfinite=skip" in line
    # The two rows named are the two rows of the poisoned micro-batch, as the model received them.
    names = _named_rows(line)
    assert len(_contents(names)) == 2 and all(n.startswith(f"{run / 'data' / 'train.jsonl'}:") for n in names)
    (batch,) = [json.loads(x) for x in (tmp_path / "nan_batches.jsonl").read_text().splitlines()]
    v3 = get_encoder("v3")
    named_ids = [check_row("sft", text, v3).ids["input_ids"] for text in _contents(names)]
    assert len(batch) == 2
    assert all(any(row[: len(ids)] == ids for row in batch) for ids in named_ids)  # rows are right-padded
    # Nothing of step 3 was saved; the run directory is free for a rerun.
    assert [p.name for p in sorted((run / "checkpoints").glob("checkpoint-*"))] == ["checkpoint-1", "checkpoint-2"]
    assert not (run / "run.lock").exists() and not (run / "summary.json").exists()


@slow
def test_sft_nan_skip_leaves_the_weights_counts_the_step_and_trains_on(tmp_path, monkeypatch):
    run = tmp_path / "run"
    out = _run(tmp_path, "sft.py", run, *SFT, "sft.train.save_total_limit=null", "sft.train.max_steps=8",
               "sft.train.lr=1e-2", "sft.train.on_nonfinite=skip", nan_at="4", monkeypatch=monkeypatch)
    assert "non-finite loss at step 3 (rows: " in out.stderr and "update skipped (1 so far" in out.stderr
    ckpt = {n: _adapter(run / "checkpoints" / f"checkpoint-{n}") for n in range(1, 9)}
    assert _same(ckpt[2], ckpt[3])  # the skipped step changed no weight
    assert all(not _same(ckpt[n], ckpt[n + 1]) for n in (1, 3, 4, 5, 6, 7))  # every other step did
    final = _adapter(run / "adapter")
    assert all(torch.isfinite(t).all() for t in final.values())
    rows = _train_rows(run, "sft")
    assert [r["nonfinite_skipped"] for r in rows] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert math.isnan(rows[2]["loss"])  # the skipped step's loss is not made up
    losses = [r["loss"] for r in rows if not math.isnan(r["loss"])]
    assert losses[-1] < losses[0] - 0.05  # still learning after the skipped step
    summary = json.loads((run / "summary.json").read_text())["sft"]
    assert summary["nonfinite_skipped"] == 1
    assert summary["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)  # skipped step left out


@slow
def test_dpo_nan_stop_and_skip(tmp_path, monkeypatch):
    steps = ("dpo.train.save_steps=1", "dpo.train.save_total_limit=null", "dpo.eval.loss_before=false")
    stopped = tmp_path / "stop"
    out = _run(tmp_path, "dpo.py", stopped, *steps, nan_at="2", stage="dpo", expect=2, monkeypatch=monkeypatch)
    line = _error_line(out.stderr)
    assert line.startswith("error: DPO: non-finite loss at step 3 (rows: ")
    assert f"last good checkpoint: {stopped / 'checkpoints' / 'checkpoint-2'};" in line
    names = _named_rows(line)
    assert len(_contents(names)) == 2 and all(n.startswith(f"{stopped / 'data' / 'train.jsonl'}:") for n in names)
    # The pairs named are the pairs of the poisoned batch (prompt + chosen rows first in TRL's batch).
    (batch,) = [json.loads(x) for x in (tmp_path / "nan_batches.jsonl").read_text().splitlines()]
    v3 = get_encoder("v3")
    for name in names:
        ids = check_row("dpo", _line(name), v3).ids
        assert any(row[: len(ids["prompt_ids"]) + len(ids["chosen_ids"])] == ids["prompt_ids"] + ids["chosen_ids"]
                   for row in batch)

    skipped = tmp_path / "skip"
    _run(tmp_path, "dpo.py", skipped, *steps, "dpo.train.on_nonfinite=skip", nan_at="2", stage="dpo",
         monkeypatch=monkeypatch)
    ckpt = {n: _adapter(skipped / "checkpoints" / f"checkpoint-{n}") for n in range(1, 5)}
    assert _same(ckpt[2], ckpt[3]) and not _same(ckpt[3], ckpt[4])
    assert json.loads((skipped / "summary.json").read_text())["dpo"]["nonfinite_skipped"] == 1
    assert [r["nonfinite_skipped"] for r in _train_rows(skipped, "dpo")] == [0, 0, 1, 1]


def _launch() -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "configs/accelerate/cpu_ddp.yaml")]


@slow
@pytest.mark.ranks
def test_two_processes_agree_when_only_one_rank_sees_nan(tmp_path):
    """One two-rank launch of the pipeline: SFT skips a step NaN on rank 1 only (its first micro-batch
    of step 2; rank 0's is fine), DPO stops on one (rank 1's third micro-batch, step 3): both ranks
    skip, then both stop, and rank 0 names rank 1's rows."""
    run = tmp_path / "run"
    steps = (*SFT, "sft.train.save_total_limit=null", "sft.train.on_nonfinite=skip", "dpo.train.save_steps=1",
             "dpo.train.save_total_limit=null", "dpo.eval.loss_before=false")  # fmt: skip
    out = _run(tmp_path, "sft_dpo.py", run, *steps, nan_at="2", stage="sft,dpo", nan_rank="1", launch=_launch(),
               expect=1)  # fmt: skip
    sft = run / "sft"
    ckpt = {n: _adapter(sft / "checkpoints" / f"checkpoint-{n}") for n in range(1, 5)}
    assert _same(ckpt[1], ckpt[2]) and not _same(ckpt[2], ckpt[3])
    assert all(torch.isfinite(t).all() for t in _adapter(sft / "adapter").values())
    assert json.loads((sft / "summary.json").read_text())["sft"]["nonfinite_skipped"] == 1

    line = _error_line(out.stderr, one_process=False)  # printed once, by rank 0, naming rank 1's rows
    assert line.startswith("error: DPO: non-finite loss at step 3 (rows: ") and len(_contents(_named_rows(line))) == 2
    assert f"last good checkpoint: {run / 'dpo' / 'checkpoints' / 'checkpoint-2'};" in line
