"""The mistakes a new user makes at the command line, each ending in one line `error: ...` (exit 2)
within a second or two, and a run directory that a failed start does not poison.

The recipes run in this process (runpy, sys.argv as a shell would give it), through the same
`run_hydra_recipe` their `__main__` calls; one subprocess checks what a fresh interpreter imports
before a config mistake is reported."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "data" / "sft_example.jsonl"


def recipe(name: str, *argv: str, monkeypatch) -> int:
    """Run recipes/NAME.py as `python recipes/NAME.py ARGV...` would, in this process; its exit code."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / "recipes" / name), *argv])
    monkeypatch.chdir(ROOT)
    try:
        runpy.run_path(str(ROOT / "recipes" / name), run_name="__main__")
    except SystemExit as e:
        return e.code
    return 0


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# -- item 11: did you mean ------------------------------------------------------------------------

# One per path an override's mistake takes through Hydra and the schema.
MISTAKES = [
    # TRL's and transformers' name for our setting (Hydra: a key the node lacks)
    ("sft.train.learning_rate=1e-4",
     "error: sft.train.learning_rate: not a setting of mistral-align; did you mean `sft.train.lr`? (TRL's and "
     "transformers' name)"),
    # the same with Hydra's own advice followed (`+key`): refused by the schema's own check
    ("+sft.train.learning_rate=1e-4", "error: sft.train.learning_rate: not a setting of mistral-align; "
                                      "did you mean `sft.train.lr`?"),
    # a typo; a node that does not exist; a field of a list's element
    ("sft.train.lrr=1", "error: sft.train.lrr: not a setting of mistral-align; did you mean `sft.train.lr`?"),
    ("train.max_length=4096", "error: train.max_length: not a setting of mistral-align; did you mean "
                              "`sft.train.max_length` or `dpo.train.max_length`?"),
    ("sft.data.train=[{path: a.jsonl, ignore_field: [score]}]",
     "error: sft.data.train.ignore_field: not a setting of mistral-align; did you mean `sft.data.train.ignore_fields`?"),
    # a group option: the closest configs/model/ names, then all of them
    ("model=mistral-8b", "error: model=mistral-8b: no model config of that name; did you mean "
                         "`model=ministral-8b-instruct-2410` or `model=mistral-7b-v0.1` or `model=mistral-7b-v0.3`? "
                         "(configs/model/ has ministral-8b-instruct-2410, "),
    # a value of the wrong type; an override Hydra cannot parse
    ("sft.train.lr=fast", "error: sft.train.lr: Value 'fast' of type 'str' could not be converted to Float"),
    ("sft.train.lr", "error: sft.train.lr: Hydra cannot read this override (missing EQUAL at '<EOF>')"),
]


@pytest.mark.parametrize("override,expected", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_mistake_on_the_command_line_is_one_line_with_what_was_meant(override, expected, monkeypatch, capsys, tmp_path):
    assert recipe("sft.py", override, f"run.output_dir={tmp_path}", monkeypatch=monkeypatch) == 2
    line = one_error_line(capsys)
    assert line.startswith(expected), line
    assert not any(tmp_path.iterdir())  # nothing was started


@pytest.mark.parametrize("key,meant", [
    ("sft.train.num_train_epochs", "`sft.train.epochs`? (TRL's and transformers' name)"),
    ("dpo.train.gradient_accumulation_steps", "`dpo.train.grad_accum`?"),
    ("sft.train.per_device_train_batch_size", "`sft.train.per_device_batch_size`?"),
    ("sft.train.micro_batch_size", "`sft.train.per_device_batch_size`? (axolotl's name)"),
    ("sft.train.lr_scheduler_type", "`sft.train.lr_scheduler`?"),
    ("sft.train.max_seq_length", "`sft.train.max_length`?"),
    ("peft.lora_alpha", "`peft.alpha`? (peft's name)"),
    ("lora_r", "`peft.r`?"),
    ("sft.train.seed", "`run.seed`?"),
    ("sft.train.load_in_4bit", "`quant=nf4`? (transformers' name)"),
    ("dpo.train.beta", "`dpo.beta`?"),
    ("sft.lr", "`sft.train.lr`?"),
    ("modle", "`model`?"),
    ("run.sed", "`run.seed`?"),
])
def test_foreign_names_and_typos_name_our_setting(key, meant):
    from mistral_align.schema.recipe import RecipeConfig
    from mistral_align.schema.suggest import unknown_key_message

    assert unknown_key_message(key, RecipeConfig).startswith(f"{key}: not a setting of mistral-align; did you mean {meant}")


def test_a_key_nothing_resembles_points_at_the_whole_config():
    from mistral_align.schema.recipe import RecipeConfig
    from mistral_align.schema.suggest import unknown_key_message

    assert unknown_key_message("sft.train.zzz", RecipeConfig) == (
        "sft.train.zzz: not a setting of mistral-align; `--cfg job` prints every setting")


def test_group_options_are_matched_part_by_part():
    from mistral_align.schema.suggest import unknown_option_message

    models = sorted(p.stem for p in (ROOT / "configs" / "model").glob("*.yaml"))
    first = lambda name: unknown_option_message("model", name, models).split("did you mean `")[1].split("`")[0]  # noqa: E731
    assert first("mistral-8b") == "model=ministral-8b-instruct-2410"
    assert first("mixtral-8x7b-instruct") == "model=mixtral-8x7b-instruct-v0.1"
    assert first("tiny_mistral") == "model=tiny-mistral"
    assert first("nemo") == "model=mistral-nemo-12b"
    assert unknown_option_message("experiment", "dmeo", ["demo", "test_tiny"]) == (
        "experiment=dmeo: no experiment config of that name; did you mean `experiment=demo`? "
        "(configs/experiment/ has demo, test_tiny)")


def test_the_pipeline_and_dpo_recipes_say_the_same(monkeypatch, capsys):
    assert recipe("sft_dpo.py", "dpo.train.beta=0.2", monkeypatch=monkeypatch) == 2
    assert one_error_line(capsys) == "error: dpo.train.beta: not a setting of mistral-align; did you mean `dpo.beta`?"
    assert recipe("dpo.py", "dpo.train.learning_rate=1e-6", monkeypatch=monkeypatch) == 2
    assert "did you mean `dpo.train.lr`?" in one_error_line(capsys)


def test_hydras_full_trace_is_kept_for_who_asks_for_it(monkeypatch, capsys):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        recipe("sft.py", "sft.train.lrr=1", monkeypatch=monkeypatch)


# -- item 11: --cfg job prints what the recipe runs -----------------------------------------------


@pytest.mark.parametrize("name,stages", [("sft.py", {"sft"}), ("dpo.py", {"dpo"}), ("sft_dpo.py", {"sft", "dpo"})])
def test_cfg_job_prints_only_the_stages_the_recipe_runs(name, stages, monkeypatch, capsys):
    import yaml

    argv = ["--cfg", "job", "experiment=demo", "peft.r=8"]
    argv = argv[2:] + argv[:2] if name == "sft.py" else argv  # overrides after the flag, or before it
    assert recipe(name, *argv, monkeypatch=monkeypatch) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert set(cfg) == {"model", "quant", "peft", "run", "hub"} | stages
    assert cfg["peft"]["r"] == 8


def test_cfg_job_refuses_what_a_run_would_refuse(monkeypatch, capsys):
    assert recipe("sft.py", "--cfg", "job", "dpo.beta=0.3", monkeypatch=monkeypatch) == 2
    assert one_error_line(capsys) == "error: dpo.beta: recipes/sft.py runs no DPO stage; recipes/dpo.py or recipes/sft_dpo.py does"


# -- item 11: the config is checked before the training code is imported ---------------------------


def test_a_config_mistake_is_reported_before_torch_or_transformers_is_imported():
    """A fresh interpreter (the one subprocess of this file): the recipe stops at `sft.train.lr=0`
    having imported neither torch nor transformers nor TRL, which take seconds."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{str(ROOT / 'recipes/sft.py')!r}, 'sft.train.lr=0']\n"
        "try:\n"
        f"    runpy.run_path({str(ROOT / 'recipes/sft.py')!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print(e.code, sorted(m for m in ('torch', 'transformers', 'trl', 'datasets', 'peft') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.stderr.strip() == "error: sft.train.lr: must be > 0, got 0.0", out.stderr[-2000:]
    assert out.stdout.strip() == "2 []"


def test_the_schemas_names_are_the_installed_transformers_names():
    """schema/train.py writes transformers' scheduler and optimiser names out (importing them costs
    seconds): the day transformers changes them, this fails."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from mistral_align.schema.train import LR_SCHEDULERS, OPTIMIZERS

    assert LR_SCHEDULERS == tuple(s.value for s in SchedulerType)
    assert OPTIMIZERS == tuple(o.value for o in OptimizerNames)


# -- item 11: the CLI's own frictions ---------------------------------------------------------------


def test_the_top_level_help_says_how_to_train(capsys):
    from mistral_align.entry.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for line in ("recipes/sft.py 'sft.data.train=[{path: chat.jsonl}]'", "recipes/dpo.py dpo.init_from=",
                 "recipes/sft_dpo.py experiment=demo", "accelerate launch --config_file configs/accelerate/cpu_ddp.yaml"):
        assert line in out


def test_validate_summarises_a_reason_repeated_on_many_rows(tmp_path, capsys):
    from mistral_align.entry.cli import main

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}], "sytem": "x"}
            for i in range(500)]
    rows[250] = {"messages": [{"role": "assistant", "content": "first"}]}  # another reason, still shown
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["validate", "--kind", "sft", "--data", str(data)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[1] for line in out[:4]] == ["1", "2", "3", "251"]
    assert out[4] == "... and 496 more bad row(s) of the kind 'unknown field' (lines 4 to 500); --json lists every row"
    assert len(out) < 12
    assert main(["validate", "--kind", "sft", "--data", str(data), "--json"]) == 1
    assert len(json.loads(capsys.readouterr().out)["bad_rows"]) == 500


@pytest.mark.slow
def test_merge_and_chat_print_no_deprecation_warnings(tiny_run, tmp_path, capsys):
    from mistral_align.entry.cli import main

    run = tiny_run  # conftest.py: the session's small QLoRA run (read only)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")  # what python shows a user, and DeprecationWarnings too
        assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
        assert main(["chat", str(run), "--prompt", "copy: a b", "--max-new-tokens", "2", "--temperature", "0"]) == 0
    noisy = [f"{w.category.__name__}: {w.message}" for w in seen if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not noisy


# -- item 10: a failed start does not poison its run directory ---------------------------------------


def test_a_missing_data_file_stops_before_the_run_directory_is_made(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    for name in ("sft.py", "sft_dpo.py"):
        argv = ["experiment=test_tiny", f"run.dir={run_dir}", "sft.synthetic.enabled=false", "dpo.synthetic.enabled=false",
                f"sft.data.train=[{{path: {EXAMPLE}}}]", "dpo.data.train=[{path: prefs-missing.jsonl}]"]
        if name == "sft.py":
            argv = [a for a in argv if not a.startswith("dpo.")]
            argv[-1] = "sft.data.train=[{path: chat-missing.jsonl}]"
        assert recipe(name, *argv, monkeypatch=monkeypatch) == 2
        stage = "sft" if name == "sft.py" else "dpo"  # the pipeline's DPO file: found missing before SFT trains
        assert one_error_line(capsys) == (f"error: {'chat' if stage == 'sft' else 'prefs'}-missing.jsonl: no such file "
                                          f"({stage}.data.train[0].path; a relative path is read from {ROOT})")
        assert not run_dir.exists()


@pytest.mark.slow
def test_a_start_refused_by_a_bad_row_can_be_rerun_with_other_data(tmp_path, monkeypatch, capsys):
    """A bad row stops the run after its directory holds config.yaml and manifest.json; the rerun with
    other data (and LoRA rank) and the same run.dir trains (it was refused as "trained with a
    different config"). Once it has trained, a changed config is refused again."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(EXAMPLE.read_text() + json.dumps({"messages": [{"role": "assistant", "content": "x"}]}) + "\n")
    run_dir = tmp_path / "run"
    base = ["experiment=test_tiny", f"run.dir={run_dir}", "sft.synthetic.enabled=false", "sft.train.max_steps=2",
            "sft.eval.loss_before=false"]
    # (the first launch also had another LoRA rank: a shared key, free to change while nothing trained)
    assert recipe("sft.py", *base, f"sft.data.train=[{{path: {bad}}}]", "peft.r=4", monkeypatch=monkeypatch) == 2
    assert "1 bad row(s) in the SFT data" in capsys.readouterr().err
    assert (run_dir / "config.yaml").is_file() and (run_dir / "manifest.json").is_file()

    assert recipe("sft.py", *base, f"sft.data.train=[{{path: {EXAMPLE}}}]", monkeypatch=monkeypatch) == 0
    capsys.readouterr()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sft"]["steps"] == 2
    import yaml

    assert yaml.safe_load((run_dir / "config.yaml").read_text())["sft"]["data"]["train"][0]["path"] == str(EXAMPLE)

    assert recipe("sft.py", *base, f"sft.data.train=[{{path: {EXAMPLE}}}]", "sft.train.lr=5e-4",
                  monkeypatch=monkeypatch) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(  # after the run's own log line
        f"error: {run_dir} was trained with a different config (sft.train.lr: 0.001 -> 0.0005)")


def test_an_inline_base_left_by_a_launch_that_trained_nothing_is_made_again(tmp_path):
    """A launch that failed after making base/ (a model that would not train, a kill before the first
    save): the rerun with another architecture or seed remakes it; once a stage kept a checkpoint
    or its adapter, the base stays what the adapter was trained on (rundir/drift.py)."""
    from omegaconf import OmegaConf

    from mistral_align.errors import RunDirError
    from mistral_align.model.inline import INLINE_BASE_FACTS, ensure_inline_base
    from mistral_align.schema.model import ModelConfig
    from mistral_align.rundir.drift import stages_started

    arch = dict(type="mistral", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=64)
    model = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": "tiny", "architecture": arch})
    base = tmp_path / "base"
    ensure_inline_base(model, 128, seed=1, path=base)
    assert not stages_started(tmp_path, ("sft",))
    ensure_inline_base(model, 128, seed=2, path=base, remake_other=True)
    assert json.loads((base / INLINE_BASE_FACTS).read_text())["seed"] == 2
    (tmp_path / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-2" / "COMPLETE.json").write_text("{}")
    assert stages_started(tmp_path, ("sft",)) == {"sft"}
    with pytest.raises(RunDirError, match="made with other settings"):
        ensure_inline_base(model, 128, seed=3, path=base, remake_other=not stages_started(tmp_path, ("sft",)))
