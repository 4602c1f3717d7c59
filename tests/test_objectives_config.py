"""`dpo.objective` in the typed schema: each objective composes with its own keys, and every
combination that makes no sense is refused in one line naming the key, before anything loads."""

from __future__ import annotations

import copy
import runpy
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mistral_align.errors import ConfigError
from mistral_align.schema.objectives import DEFAULT_BETA, OBJECTIVES, objective_beta
from mistral_align.schema.recipe import register_configs
from mistral_align.schema.stages import check_dpo_stage

ROOT = Path(__file__).resolve().parents[1]
register_configs()


@pytest.fixture(scope="module")
def composed():
    """recipes/dpo.py's test_tiny config, composed once (composing takes about a second)."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("dpo", overrides=["experiment=test_tiny"])


def checked(composed, overrides: list[str], recipe: str = "dpo"):
    """The config with `overrides` (KEY=VALUE, as on the command line) set, its `dpo` node checked as
    check_config checks it for `recipe` (the whole tree's other checks cost a second a call; the
    recipe-level test below runs them all)."""
    cfg = copy.deepcopy(composed)
    for override in overrides:
        key, value = override.split("=", 1)
        OmegaConf.update(cfg, key, yaml.safe_load(value), merge=False)
    check_dpo_stage(cfg.dpo, cfg.model.attn_implementation, True, ("sft", "dpo") if recipe == "sft_dpo" else ("dpo",))
    return cfg


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_objective_composes_with_its_own_keys_and_its_beta(composed, objective):
    own = {"kto": ["dpo.desirable_weight=1.2", "dpo.undesirable_weight=0.8", "dpo.precompute_ref_log_probs=true"],
           "simpo": ["dpo.simpo_gamma=1.0", "dpo.cpo_alpha=0.1", "dpo.label_smoothing=0.1", "dpo.shared_prompt=true"],
           "orpo": ["dpo.orpo_prompt_loss=true", "dpo.padding_free=true"],
           "dpo": ["dpo.loss_type=[sigmoid,sft]", "dpo.loss_weights=[1,0.5]"]}[objective]  # fmt: skip
    cfg = checked(composed, [f"dpo.objective={objective}", "dpo.beta=null", *own])
    assert objective_beta(cfg.dpo) == DEFAULT_BETA[objective]
    assert DEFAULT_BETA["simpo"] == 2.0 and objective_beta(checked(composed, ["dpo.beta=0.3"]).dpo) == 0.3


REFUSED = [
    (["dpo.objective=orpo"], "sft_dpo", "dpo.objective",
     "orpo trains SFT and the preference in one stage from the base model.*use recipes/dpo.py dpo.objective=orpo"),
    (["dpo.objective=orpo", "dpo.init_from=runs/sft-1"], "dpo", "dpo.init_from", "starts from the base model"),
    (["dpo.objective=kto", "dpo.loss_type=[sigmoid,sft]", "dpo.loss_weights=[1,1]"], "dpo",
     "dpo.loss_type, dpo.loss_weights", r"settings of dpo.objective=dpo, which dpo.objective=kto would ignore; set "
     r"them back: dpo.loss_type=\[sigmoid\] dpo.loss_weights=null"),
    (["dpo.objective=simpo", "dpo.precompute_ref_log_probs=true"], "dpo", "dpo.precompute_ref_log_probs",
     "a setting of dpo.objective=dpo/kto"),
    (["dpo.objective=orpo", "dpo.label_smoothing=0.1"], "dpo", "dpo.label_smoothing", "dpo.objective=dpo/simpo"),
    (["dpo.desirable_weight=2"], "dpo", "dpo.desirable_weight", "dpo.objective=kto, which dpo.objective=dpo"),
    (["dpo.objective=kto", "dpo.simpo_gamma=1"], "dpo", "dpo.simpo_gamma", "back: dpo.simpo_gamma=0.5"),
    (["dpo.objective=simpo", "dpo.orpo_prompt_loss=true"], "dpo", "dpo.orpo_prompt_loss", "back: dpo.orpo_prompt_loss=false"),
    (["dpo.objective=kto", "dpo.shared_prompt=true"], "dpo", "dpo.shared_prompt", "not pairs"),
    (["dpo.objective=kto", "dpo.train.per_device_batch_size=1"], "dpo", "dpo.train.per_device_batch_size",
     "at least 2 rows"),
    (["dpo.objective=kto", "dpo.undesirable_weight=0"], "dpo", "dpo.undesirable_weight", "must be > 0"),
    (["dpo.objective=simpo", "dpo.beta=0"], "dpo", "dpo.beta", "must be > 0"),
    (["dpo.objective=rl"], "dpo", "dpo.objective", "'rl' is not one of dpo, kto, orpo, simpo"),
    (["dpo.data.kind=kto"], "dpo", "dpo.data", "holds single replies marked desirable or not .*dpo.objective=kto"),
    (["dpo.objective=kto", "dpo.data.kind=sft"], "dpo", "dpo.data", "preference stage with dpo.objective=kto trains on"),
]


@pytest.mark.parametrize("overrides, recipe, key, match", REFUSED, ids=[" ".join(r[0]) for r in REFUSED])
def test_combinations_that_make_no_sense_are_refused_naming_the_key(composed, overrides, recipe, key, match):
    with pytest.raises(ConfigError, match=rf"^{key}: .*{match}") as e:
        checked(composed, overrides, recipe)
    assert "\n" not in str(e.value)


def test_kto_accepts_preference_pair_presets(composed):
    assert checked(composed, ["dpo.objective=kto", "dpo.data.kind=dpo"]).dpo.data.kind == "dpo"


def test_the_recipe_refuses_orpo_after_sft_in_one_line_before_anything_loads(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(ROOT / "recipes/sft_dpo.py"), "experiment=demo", "dpo.objective=orpo"])
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "recipes/sft_dpo.py"), run_name="__main__")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: dpo.objective: orpo trains SFT"), err


def test_peers_names_point_at_the_objective_keys():
    from mistral_align.schema.recipe import RecipeConfig
    from mistral_align.schema.suggest import unknown_key_message

    assert "did you mean `dpo.desirable_weight`? (axolotl's name)" in unknown_key_message("dpo.kto_desirable_weight", RecipeConfig)
    assert "did you mean `dpo.simpo_gamma`?" in unknown_key_message("dpo.gamma_beta_ratio", RecipeConfig)
    assert "did you mean `dpo.objective`?" in unknown_key_message("rl", RecipeConfig)


def test_the_memory_estimate_counts_ktos_rows_as_one_sequence_each(composed):
    from mistral_align.model.estimate import estimate_memory

    pairs = estimate_memory(checked(composed, []), stage="dpo")["activations_detail"]["total"]
    rows = estimate_memory(checked(composed, ["dpo.objective=kto"]), stage="dpo")["activations_detail"]["total"]
    assert rows * 2 == pytest.approx(pairs, rel=0.05)
