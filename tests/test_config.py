"""Every shipped config composes against the typed schema; presets validate; typos fail naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from mistral_align.config import ConfigError, SFTConfig, TrainConfig, check_config, register_configs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
register_configs()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _compose(overrides: list[str], name: str = "sft"):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in ("model", "quant", "peft", "data", "train") for o in options(g)],
)
def test_every_group_option_composes(group, option):
    cfg = _compose([f"{group}={option}"])
    assert OmegaConf.is_config(cfg[group])
    # every value resolves and has the schema's type
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    if group != "data":  # data/example needs a file of the user's; the rest passes the checks
        check_config(cfg)


@pytest.mark.parametrize("preset", options("experiment"))
def test_every_experiment_preset_validates(preset):
    cfg = _compose([f"experiment={preset}"])
    check_config(cfg)
    assert cfg.model.tokenizer_version


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


def test_command_line_overrides():
    cfg = _compose(["model=mixtral-8x7b-v0.1", "quant=nf4", "peft.r=64", "train.lr=1e-4", "model.sliding_window=0"])
    assert cfg.model.hub_id == "mistralai/Mixtral-8x7B-v0.1"
    assert cfg.peft.r == 64 and cfg.train.lr == 1e-4 and cfg.quant.mode == "nf4"
    check_config(cfg)


def test_misspelt_override_names_the_key():
    with pytest.raises(ConfigCompositionException) as e:
        _compose(["train.lrr=1e-4"])
    assert "lrr" in str(e.value) + str(e.value.__cause__)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigCompositionException) as e:
        _compose(["train.lr=fast"])
    assert "train.lr" in str(e.value) + str(e.value.__cause__)


def test_misspelt_key_in_a_yaml_file_names_the_key(tmp_path):
    schema = OmegaConf.structured(SFTConfig)
    with pytest.raises(ConfigKeyError) as e:
        OmegaConf.merge(schema, {"train": {"per_device_bach_size": 2}})
    assert "per_device_bach_size" in str(e.value)
    with pytest.raises(ValidationError) as e:
        OmegaConf.merge(OmegaConf.structured(TrainConfig), {"epochs": "many"})
    assert "epochs" in str(e.value)


def test_shipped_yaml_files_have_no_unknown_keys():
    # Composition above merges each file into the schema; this also catches keys in files of groups
    # that no default selects, read directly.
    schemas = {"model": "ModelConfig", "quant": "QuantConfig", "peft": "PeftConfig", "train": "TrainConfig"}
    import mistral_align.config as c

    for group, schema in schemas.items():
        for path in (CONFIGS / group).glob("*.yaml"):
            content = yaml.safe_load(path.read_text()) or {}
            content.pop("defaults", None)  # an alias file (model/mixtral-8x7b.yaml) composes another option
            OmegaConf.merge(OmegaConf.structured(getattr(c, schema)), content)


@pytest.mark.parametrize(
    "override,key",
    [
        ("quant.mode=nf5", "quant.mode"),
        ("model.tokenizer_version=v9", "model.tokenizer_version"),
        ("run.report_to=mlflow", "run.report_to"),
        ("train.packing_strategy=magic", "train.packing_strategy"),
    ],
)
def test_bad_choice_names_the_key(override, key):
    cfg = _compose(["experiment=demo", override])
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        check_config(cfg)


def test_full_finetune_of_quantised_model_is_refused():
    cfg = _compose(["experiment=demo", "peft=none"])
    with pytest.raises(ConfigError, match="^peft.method"):
        check_config(cfg)


def test_recipe_fails_at_start_on_a_typo():
    """The real entry point: a misspelt key stops it before any data or model is loaded."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "recipes/sft.py"), "experiment=test_tiny", "train.lrr=1"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert out.returncode != 0
    assert "lrr" in out.stderr


def test_recipe_prints_composed_config():
    out = subprocess.run(
        [sys.executable, str(ROOT / "recipes/sft.py"), "model=mixtral-8x7b-v0.1", "peft.r=64", "--cfg", "job"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["peft"]["r"] == 64 and cfg["model"]["tokenizer_version"] == "v1"


@pytest.mark.parametrize("primary", ["sft", "dpo", "sft_dpo"])
@pytest.mark.parametrize("preset", options("experiment"))
def test_every_preset_composes_under_every_recipe(primary, preset):
    from mistral_align.config import check_dpo_config

    cfg = _compose([f"experiment={preset}"], name=primary)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    check_config(cfg)
    if primary != "sft":
        check_dpo_config(cfg)


@pytest.mark.parametrize("option", options("data"))
def test_every_data_option_composes_for_the_dpo_stage(option):
    cfg = _compose([f"data@dpo.data={option}"], name="sft_dpo")
    OmegaConf.to_container(cfg.dpo.data, resolve=True, throw_on_missing=True)


def test_dpo_stage_overrides_and_their_mistakes():
    from mistral_align.config import check_dpo_config

    cfg = _compose(["experiment=test_tiny", "dpo.beta=0.3", "dpo.train.lr=1e-5", "dpo.loss_type=[sigmoid,sft]",
                    "dpo.loss_weights=[1.0,0.5]"], name="sft_dpo")  # fmt: skip
    check_dpo_config(cfg)
    assert (cfg.dpo.beta, cfg.dpo.train.lr, list(cfg.dpo.loss_type)) == (0.3, 1e-5, ["sigmoid", "sft"])
    with pytest.raises(Exception, match="betta"):
        _compose(["dpo.betta=0.3"], name="dpo")
    for override, key in [("dpo.loss_type=[sigmoidd]", "dpo.loss_type"), ("dpo.beta=0", "dpo.beta"),
                          ("dpo.loss_weights=[1.0,2.0]", "dpo.loss_weights"), ("dpo.label_smoothing=0.7", "dpo.label_smoothing")]:  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            check_dpo_config(_compose(["experiment=test_tiny", override], name="dpo"))
