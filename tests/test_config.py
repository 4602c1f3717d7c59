"""Every shipped config composes against the typed schema, under every recipe, with every preset;
the stage schemas refuse the mistakes users make, naming the key, before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from mistral_align.errors import ConfigError
from mistral_align.schema.data import SFTDataConfig
from mistral_align.schema.model import ModelConfig, PeftConfig, QuantConfig
from mistral_align.schema.recipe import RecipeConfig, check_config, register_configs
from mistral_align.schema.train import SFTTrainConfig, TrainConfig

from runfixtures import Ran, run_recipe_script

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PRIMARIES = {"sft": ("sft",), "dpo": ("dpo",), "sft_dpo": ("sft", "dpo")}
register_configs()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def _hydra():
    # One initialisation for the module: composing is then fast enough to try every combination.
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        yield


def _compose(overrides: list[str], name: str = "sft_dpo"):
    return compose(name, overrides=overrides)


def _refused(overrides: list[str], key: str, name: str = "sft_dpo", match: str = "") -> None:
    cfg = _compose(overrides, name)
    with pytest.raises(ConfigError, match=rf"^{key}(?![\w.]).*{match}"):
        check_config(cfg, PRIMARIES[name])


# -- composition ---------------------------------------------------------------------------------

GROUP_OPTIONS = (
    [(f"{g}={o}", g) for g in ("model", "quant", "peft") for o in options(g)]
    + [(f"data@sft.data={o}", "sft.data") for o in options("data") if o not in ("example_dpo", "ultrafeedback")]
    + [(f"data@dpo.data={o}", "dpo.data") for o in options("data") if o not in ("example", "ultrachat")]
    + [("train@sft.train=sft", "sft.train"), ("train@dpo.train=dpo", "dpo.train")]
)


@pytest.mark.parametrize("primary", PRIMARIES)
@pytest.mark.parametrize("preset", options("experiment"))
def test_every_primary_composes_with_every_preset(primary, preset):
    cfg = _compose([f"experiment={preset}"], primary)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    check_config(cfg, PRIMARIES[primary])


@pytest.mark.parametrize("primary", PRIMARIES)
@pytest.mark.parametrize("override,node", GROUP_OPTIONS)
def test_every_primary_composes_with_every_group_option(primary, override, node):
    stage = node.split(".")[0]
    generated = [f"{stage}.synthetic.enabled=true"] if override.endswith("=synthetic") else []
    cfg = _compose([override, *generated], primary)
    assert OmegaConf.is_config(OmegaConf.select(cfg, node))
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    check_config(cfg, PRIMARIES[primary])


def test_the_primaries_differ_only_in_the_run_name():
    bodies = {}
    for name in PRIMARIES:
        body = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        assert body["defaults"] == ["base", "_self_", {"experiment": None}]
        bodies[name] = body["run"]["name"]
    assert bodies == {"sft": "sft", "dpo": "dpo", "sft_dpo": "sft_dpo"}
    assert "hydra" in yaml.safe_load((CONFIGS / "base.yaml").read_text())  # the hydra block lives once


def test_each_model_names_its_tokenizer():
    expected = {
        "mistral-7b-v0.1": "v1",
        "mistral-7b-instruct-v0.2": "v1",
        "mistral-7b-v0.3": "v3",
        "mixtral-8x7b-v0.1": "v1",
        "tiny-mistral": "v3",
        "tiny-mixtral": "v1",
    }
    for model, version in expected.items():
        assert _compose([f"model={model}"]).model.tokenizer_version == version


def test_the_same_spelling_works_in_every_recipe_that_runs_the_stage():
    for name in ("sft", "sft_dpo"):
        cfg = _compose(["model=mixtral-8x7b-v0.1", "quant=nf4", "peft.r=64", "sft.train.lr=1e-4",
                        "data@sft.data=ultrachat", "model.sliding_window=0"], name)  # fmt: skip
        assert cfg.model.hub_id == "mistralai/Mixtral-8x7B-v0.1" and cfg.sft.data.train[0].path.endswith("ultrachat_200k")
        assert cfg.peft.r == 64 and cfg.sft.train.lr == 1e-4 and cfg.quant.mode == "nf4"
        check_config(cfg, PRIMARIES[name])
    for name in ("dpo", "sft_dpo"):
        cfg = _compose(["experiment=test_tiny", "dpo.beta=0.3", "dpo.train.lr=1e-5", "dpo.loss_type=[sigmoid,sft]",
                        "dpo.loss_weights=[1.0,0.5]"], name)  # fmt: skip
        check_config(cfg, PRIMARIES[name])
        assert (cfg.dpo.beta, cfg.dpo.train.lr, list(cfg.dpo.loss_type)) == (0.3, 1e-5, ["sigmoid", "sft"])
        cfg = _compose(["data@dpo.data=ultrafeedback"], name)
        assert cfg.dpo.data.train[0].path.endswith("ultrafeedback_binarized")
        check_config(cfg, PRIMARIES[name])


def test_stage_schemas_hold_only_their_own_settings():
    with pytest.raises(ConfigCompositionException):
        _compose(["dpo.train.packing=true"])  # preference pairs are never packed
    with pytest.raises(ConfigCompositionException):
        _compose(["dpo.data.train_on=last"])
    with pytest.raises(ConfigCompositionException):
        _compose(["train.lr=0"])  # there is no top-level train node any more
    with pytest.raises(ConfigCompositionException):
        _compose(["train@dpo.train=sft"])  # the SFT train preset has packing keys the DPO stage lacks


def test_misspelt_override_names_the_key():
    with pytest.raises(ConfigCompositionException) as e:
        _compose(["sft.train.lrr=1e-4"])
    assert "lrr" in str(e.value) + str(e.value.__cause__)
    with pytest.raises(Exception, match="betta"):
        _compose(["dpo.betta=0.3"], "dpo")


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigCompositionException) as e:
        _compose(["sft.train.lr=fast"])
    assert "sft.train.lr" in str(e.value) + str(e.value.__cause__)


def test_misspelt_key_in_a_yaml_file_names_the_key():
    schema = OmegaConf.structured(RecipeConfig)
    with pytest.raises(ConfigKeyError) as e:
        OmegaConf.merge(schema, {"sft": {"train": {"per_device_bach_size": 2}}})
    assert "per_device_bach_size" in str(e.value)
    with pytest.raises(ValidationError) as e:
        OmegaConf.merge(OmegaConf.structured(TrainConfig), {"epochs": "many"})
    assert "epochs" in str(e.value)


def test_a_key_added_with_plus_is_refused():
    """Hydra's own hint for an unknown key, `+sft.train.lrr=1`, must not slip past the schema."""
    _refused(["experiment=test_tiny", "+sft.train.lrr=1"], "sft.train.lrr", match="not a setting")
    cfg = _compose(["experiment=test_tiny", "+sft.train.extra.neftune_noise_alpha=5"])
    check_config(cfg)  # train.extra is the one free-form node (passed to TRL verbatim)


def test_shipped_yaml_files_have_no_unknown_keys():
    # Composition above merges each file into the schema; this also reads every file of every group
    # directly, so a file no test selects cannot hide a stale key.
    schemas = {"model": ModelConfig, "quant": QuantConfig, "peft": PeftConfig}
    for group, schema in schemas.items():
        for path in (CONFIGS / group).glob("*.yaml"):
            content = yaml.safe_load(path.read_text()) or {}
            content.pop("defaults", None)  # an alias file (model/mixtral-8x7b.yaml) composes another option
            OmegaConf.merge(OmegaConf.structured(schema), content)
    OmegaConf.merge(OmegaConf.structured(SFTTrainConfig), yaml.safe_load((CONFIGS / "train/sft.yaml").read_text()))
    OmegaConf.merge(OmegaConf.structured(TrainConfig), yaml.safe_load((CONFIGS / "train/dpo.yaml").read_text()))
    for path in (CONFIGS / "data").glob("*.yaml"):
        OmegaConf.merge(OmegaConf.structured(SFTDataConfig), yaml.safe_load(path.read_text()))


# -- the checks ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,key",
    [
        ("quant.mode=nf5", "quant.mode"),
        ("model.tokenizer_version=v9", "model.tokenizer_version"),
        ("run.report_to=mlflow", "run.report_to"),
        ("sft.train.packing_strategy=magic", "sft.train.packing_strategy"),
        ("sft.train.optim=adamw_fake", "sft.train.optim"),
        ("sft.train.lr_scheduler=bogus", "sft.train.lr_scheduler"),
        ("dpo.train.optim=adamw_fake", "dpo.train.optim"),
        ("sft.train.bf16=maybe", "sft.train.bf16"),
        ("sft.data.train_on=first", "sft.data.train_on"),
        ("dpo.loss_type=[sigmoidd]", r"dpo.loss_type\[0\]"),
        ("sft.synthetic.skills=[juggle]", r"sft.synthetic.skills\[0\]"),
    ],
)
def test_bad_choice_names_the_key(override, key):
    _refused(["experiment=demo", override], key, match="is not one of")


@pytest.mark.parametrize(
    "override,key",
    [
        ("sft.train.lr=0", "sft.train.lr"),
        ("dpo.train.lr=-1e-5", "dpo.train.lr"),
        ("sft.train.per_device_batch_size=0", "sft.train.per_device_batch_size"),
        ("dpo.train.per_device_batch_size=0", "dpo.train.per_device_batch_size"),
        ("dpo.train.grad_accum=0", "dpo.train.grad_accum"),
        ("sft.train.max_steps=0", "sft.train.max_steps"),
        ("sft.train.warmup_ratio=5", "sft.train.warmup_ratio"),
        ("sft.train.save_total_limit=0", "sft.train.save_total_limit"),
        ("sft.train.max_length=-1", "sft.train.max_length"),
        ("sft.data.max_length=0", "sft.data.max_length"),
        ("sft.data.eval_fraction=1.5", "sft.data.eval_fraction"),
        ("dpo.data.eval_fraction=-0.1", "dpo.data.eval_fraction"),
        ("peft.r=0", "peft.r"),
        ("peft.alpha=-5", "peft.alpha"),
        ("peft.dropout=1.0", "peft.dropout"),
        ("dpo.beta=0", "dpo.beta"),
        ("dpo.label_smoothing=0.7", "dpo.label_smoothing"),
        ("dpo.loss_weights=[1.0,2.0,3.0]", "dpo.loss_weights"),
        ("sft.eval.max_new_tokens=0", "sft.eval.max_new_tokens"),
        ("sft.synthetic.n_train=0", "sft.synthetic.n_train"),
        ("run.cpu_threads=0", "run.cpu_threads"),
    ],
)
def test_out_of_range_values_name_the_key(override, key):
    _refused(["experiment=demo", override], key)


def test_synthetic_bars_name_a_skill_trained_and_a_value_in_range():
    _refused(["experiment=demo", "++sft.synthetic.bars.juggle=0.5"], "sft.synthetic.bars.juggle", match="not one of")
    _refused(["experiment=demo", "sft.synthetic.bars.copy=1.5"], "sft.synthetic.bars.copy", match=r"in \[0, 1\]")
    _refused(["experiment=demo", "sft.synthetic.skills=[copy,add]"], "sft.synthetic.bars.reverse", match="not one of")
    # the generated tool_call rows offer tools: v1 has no tokens for them
    _refused(["experiment=demo", "model.tokenizer_version=v1"], "sft.synthetic.skills", match="tool_call")


def test_data_of_the_other_stages_shape_is_refused():
    _refused(["data@dpo.data=ultrachat"], "dpo.data", match="chat conversations")
    _refused(["data@sft.data=ultrafeedback"], "sft.data", match="preference pairs")
    _refused(["data@dpo.data=example"], "dpo.data", name="dpo")


def test_a_stage_the_recipe_does_not_run_is_not_checked():
    """dpo.yaml trains no SFT stage, so a value only SFT would use cannot stop it."""
    cfg = _compose(["experiment=test_tiny", "sft.train.lr=0"], "dpo")
    check_config(cfg, ("dpo",))
    with pytest.raises(ConfigError, match="^sft.train.lr"):
        check_config(cfg, ("sft",))


def test_a_truncating_dpo_stage_is_refused():
    _refused(["dpo.data.on_long_rows=truncate"], "dpo.data.on_long_rows", match="SFT only")


def test_full_finetune_of_quantised_model_is_refused():
    _refused(["experiment=demo", "peft=none"], "peft.method")


def test_user_data_is_never_replaced_by_the_presets_generated_data():
    _refused(["experiment=demo", "sft.data.train=[{path: mine.jsonl}]"], "sft.synthetic.enabled", match="mine.jsonl")
    _refused(["experiment=demo", "dpo.data.train=[{path: prefs.jsonl}]"], "dpo.synthetic.enabled", match="prefs.jsonl")
    cfg = _compose(["experiment=demo", "sft.data.train=[{path: mine.jsonl}]", "sft.synthetic.enabled=false"])
    check_config(cfg)


# -- the real entry points -----------------------------------------------------------------------


def _recipe(*args: str, recipe: str = "sft.py") -> Ran:
    return run_recipe_script(recipe, *args, cwd=ROOT)


@pytest.mark.slow
def test_recipe_fails_at_start_on_a_mistake_with_one_line(tmp_path):
    """A misspelt key or a bad value stops the recipe before any data or model is loaded: one line, exit 2."""
    for args, message in [
        (["sft.train.lr=0"], "error: sft.train.lr: must be > 0"),
        (["+sft.train.lrr=1"], "error: sft.train.lrr: not a setting"),
        (["dpo.beta=0.3"], "error: dpo.beta: recipes/sft.py runs no DPO stage"),
        (["data@dpo.data=example"], "error: dpo.data: recipes/sft.py runs no DPO stage"),
        # a GPU-only option on a machine without it (not installed, or no CUDA): refused, never a traceback
        (["sft.train.use_liger_kernel=true"], "error: sft.train.use_liger_kernel: "),
    ]:
        out = _recipe("experiment=test_tiny", f"run.output_dir={tmp_path}", *args)
        assert out.returncode == 2, out.stderr[-2000:]
        assert out.stderr.strip() == message or out.stderr.strip().startswith(message), out.stderr[-2000:]
        assert "Traceback" not in out.stderr
    # Hydra's own composition errors (it prints its message) exit 2 too: one code for user mistakes.
    for args in (["sft.train.lrr=1"], ["model=no-such-model"]):
        out = _recipe("experiment=test_tiny", f"run.output_dir={tmp_path}", *args)
        assert out.returncode == 2 and args[0].split("=")[1 if "model" in args[0] else 0].split(".")[-1] in out.stderr
    out = _recipe("experiment=test_tiny", f"run.output_dir={tmp_path}", "sft.train.lr=1", recipe="dpo.py")
    assert out.returncode == 2 and "recipes/dpo.py runs no SFT stage" in out.stderr
    assert not any(tmp_path.iterdir())  # no run directory was made for a run that never started


def test_recipe_prints_composed_config():
    out = _recipe("model=mixtral-8x7b-v0.1", "peft.r=64", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["peft"]["r"] == 64 and cfg["model"]["tokenizer_version"] == "v1"


def test_shared_prompts_need_a_dense_attention_mask():
    _refused(["experiment=demo", "dpo.shared_prompt=true", "model.attn_implementation=flash_attention_2"],
             "dpo.shared_prompt", match="sdpa or eager")


def test_gpu_options_reach_the_trainer_arguments(tmp_path):
    from mistral_align.train.objectives import preference_args
    from mistral_align.train.sft import make_sft_args

    cfg = _compose(["experiment=test_tiny", "sft.train.torch_compile=true", "dpo.train.use_liger_kernel=true"])
    sft, dpo = make_sft_args(cfg.sft, 0, tmp_path, [], False), preference_args(cfg.dpo, 0, tmp_path, [], False)
    assert (sft.torch_compile, sft.use_liger_kernel) == (True, False)
    assert (dpo.torch_compile, dpo.use_liger_kernel) == (False, True)
    assert sft.optim == dpo.optim == "adamw_torch_fused"
