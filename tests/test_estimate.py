"""`estimate_memory`: weight and LoRA bytes equal the bytes measured on real tiny bitsandbytes models;
the real-shape figures match the issue's arithmetic; activations against measured memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_config import CONFIGS, ROOT

from mistral_align.chat import get_encoder
from mistral_align.model.estimate import (
    GiB,
    activation_bytes,
    estimate_memory,
    lora_params,
    model_shape,
    nf4_layer_bytes,
    weight_bytes,
)
from mistral_align.model.facts import parameter_bytes
from mistral_align.model.load import build_model
from mistral_align.model.lora import apply_peft
from mistral_align.schema.recipe import check_config, register_configs

register_configs()


def cfg_of(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("sft_dpo", overrides=list(overrides))


TINY = {
    "tiny-mistral": ["model.architecture.hidden_size=64", "model.architecture.intermediate_size=192",
                     "model.architecture.num_hidden_layers=2"],
    "tiny-mixtral": ["model.architecture.intermediate_size=96"],
}


@pytest.mark.parametrize("model", ["tiny-mistral", "tiny-mixtral"])
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_weight_and_lora_bytes_equal_measured(model, quant):
    # bfloat16 base so that peft's k-bit preparation (upcast of the non-quantised weights) shows
    cfg = cfg_of(f"model={model}", f"quant={quant}", "model.dtype=bfloat16", "peft.r=4",
                 "peft.modules_to_save=[lm_head]", *TINY[model])
    if quant == "nf4":
        cfg.quant.compute_dtype = "float32"
    check_config(cfg)
    enc = get_encoder(cfg.model.tokenizer_version)
    m = build_model(cfg.model, cfg.quant, vocab_size=enc.vocab_size, seed=0, device_map={"": "cpu"})
    shape = model_shape(cfg.model)
    loaded = parameter_bytes(m)
    est = weight_bytes(shape, cfg.quant, cfg.model.dtype, kbit_prepared=False)
    assert loaded["by_kind"] == est["by_kind"]
    assert loaded["by_dtype"] == est["by_dtype"]
    m = apply_peft(m, cfg.peft, quantized=True, gradient_checkpointing=False)
    trained = parameter_bytes(m)
    lora = trained["by_kind"].pop("lora")
    prepared = weight_bytes(shape, cfg.quant, cfg.model.dtype, kbit_prepared=True)
    assert trained["by_kind"] == prepared["by_kind"]
    assert lora == 4 * lora_params(shape, cfg.peft)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == lora_params(shape, cfg.peft)
    if model == "tiny-mixtral":
        assert "experts" in est["by_kind"] and est["by_dtype"].get("bfloat16", 0) < est["total"]


def test_nf4_layer_bytes_by_hand():
    # 4096 x 4096: 8 MiB packed, 262144 uint8 absmax, 1024 fp32 nested absmax, offset, two code tables
    n = 4096 * 4096
    assert nf4_layer_bytes(n) == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4 + 1024 + 64


def test_real_shapes_match_the_issue_arithmetic():
    mixtral = estimate_memory(cfg_of("model=mixtral-8x7b-v0.1", "quant=nf4"))
    assert mixtral["params"] == 46_702_792_704
    assert 24e9 <= mixtral["weights_as_loaded"] <= 25e9
    assert 24e9 <= mixtral["per_gpu"]["weights"] <= 25.1e9  # after k-bit preparation (fp32 embeddings)
    quantised = mixtral["params_quantised"]
    assert abs(mixtral["weights_by_kind"]["experts"] + mixtral["weights_by_kind"]["attention"] - 0.5159 * quantised) < 0.001 * quantised
    # the alignment handbook's QLoRA length and batch (2048 x 4, gradient checkpointing on)
    handbook = estimate_memory(cfg_of("model=mixtral-8x7b-v0.1", "quant=nf4", "sft.train.max_length=2048",
                                      "sft.train.per_device_batch_size=4", "sft.train.gradient_checkpointing=true"))
    assert handbook["fits"]["80GB"] and not handbook["fits"]["24GB"]
    mistral = estimate_memory(cfg_of("model=mistral-7b-v0.3", "quant=nf4"))
    assert 3.8e9 <= mistral["weights_as_loaded"] <= 4.3e9
    bf16 = estimate_memory(cfg_of("model=mixtral-8x7b-v0.1", "quant=none"))
    assert 93e9 <= bf16["weights_as_loaded"] <= 94e9 and not bf16["fits"]["80GB"]


def test_sharding_divides_weights_and_state():
    one = estimate_memory(cfg_of("model=mixtral-8x7b-v0.1", "quant=none"), num_gpus=8, parallel="ddp")
    fsdp = estimate_memory(cfg_of("model=mixtral-8x7b-v0.1", "quant=none"), num_gpus=8, parallel="fsdp")
    assert fsdp["per_gpu"]["weights"] * 8 >= one["per_gpu"]["weights"] > fsdp["per_gpu"]["weights"] * 7
    assert fsdp["per_gpu"]["activations"] == one["per_gpu"]["activations"]
    eight = estimate_memory(cfg_of("model=mixtral-8x7b-v0.1", "quant=nf4", "sft.train.optim=paged_adamw_8bit"))
    adam = estimate_memory(cfg_of("model=mixtral-8x7b-v0.1", "quant=nf4"))
    assert eight["per_gpu"]["optimizer"] < adam["per_gpu"]["optimizer"] / 3


def test_cli_estimate_json_and_table(capsys, monkeypatch):
    from mistral_align.entry.cli import main

    monkeypatch.chdir(ROOT)
    cmd = ["estimate", "model=mixtral-8x7b-v0.1", "quant=nf4"]
    assert main([*cmd, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["fits"]["80GB"] is True and 24e9 <= r["weights_as_loaded"] <= 25e9
    assert main(cmd) == 0
    table = capsys.readouterr().out
    assert "fits on 24GB: no" in table and "80GB: yes" in table
    assert main([*cmd, "quant.mode=nf5"]) == 2
    bad = capsys.readouterr().err
    assert bad.count("\n") == 1 and "quant.mode" in bad


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="the peak-RSS probe measured ~2.9 GB for every mode when run inside the whole "
                   "suite and in a fresh-clone CI run (0.45-0.64 GB when run alone); unexplained, see the issue 9 note")
@pytest.mark.parametrize(
    "model,overrides",
    [
        ("tiny-mistral", ["model.architecture.hidden_size=512", "model.architecture.intermediate_size=1024",
                          "model.architecture.num_hidden_layers=6"]),
        ("tiny-mixtral", ["model.architecture.hidden_size=256", "model.architecture.intermediate_size=512",
                          "model.architecture.num_hidden_layers=6"]),
    ],
)
def test_activation_estimate_against_measured_peak(model, overrides):
    """Measured: peak RSS of forward + backward over the RSS before it (tests/measure_activation_peak.py).
    Tolerance: total within 10%; the part gradient checkpointing saves within 25%."""
    import os

    batch, length = 2, 512
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    measured = {}
    for mode in ("gc", "nogc"):
        run = subprocess.run([sys.executable, str(ROOT / "tests/measure_activation_peak.py"), model, mode, str(batch),
                              str(length), *overrides], capture_output=True, text=True, env=env, cwd=ROOT)
        assert run.returncode == 0, run.stderr[-2000:]
        measured[mode] = json.loads(run.stdout.strip().splitlines()[-1])["peak"]
    cfg = cfg_of(f"model={model}", *overrides)
    shape = model_shape(cfg.model)
    est = {mode: activation_bytes(shape, batch, length, 4, mode == "gc", lora_r=4)["total"] for mode in ("gc", "nogc")}
    print(model, "measured", measured, "estimated", est)
    for mode in ("gc", "nogc"):
        assert abs(est[mode] - measured[mode]) <= 0.10 * measured[mode], (mode, est, measured)
    saved_est, saved_measured = est["nogc"] - est["gc"], measured["nogc"] - measured["gc"]
    assert abs(saved_est - saved_measured) <= 0.25 * saved_measured, (saved_est, saved_measured)


def test_before_and_after_for_mixtral_8x7b():
    """Stock transformers 5 (fused experts, skipped by bitsandbytes) against ours, as the issue counts."""
    cfg = cfg_of("model=mixtral-8x7b-v0.1", "quant=nf4")
    s = model_shape(cfg.model)
    before = weight_bytes(s, cfg.quant, "bfloat16", kbit_prepared=False, fused_experts=True)
    before_prepared = weight_bytes(s, cfg.quant, "bfloat16", kbit_prepared=True, fused_experts=True)
    after = weight_bytes(s, cfg.quant, "bfloat16", kbit_prepared=False)
    assert 91e9 <= before["total"] <= 92e9 and 182e9 <= before_prepared["total"] <= 183e9
    assert 24e9 <= after["total"] <= 25e9


# Published parameter counts of the models we ship configs for (model cards).
PUBLISHED = {"mistral-7b-v0.1": 7.24e9, "mistral-7b-v0.3": 7.25e9, "mixtral-8x7b-v0.1": 46.7e9,
             "mixtral-8x22b-v0.1": 141e9, "mistral-nemo-12b": 12.2e9, "ministral-8b-instruct-2410": 8.0e9,
             "mistral-small-24b-2501": 23.6e9}


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_every_hub_model_config_has_a_shape_that_matches_its_size(model):
    r = estimate_memory(cfg_of(f"model={model}", "quant=nf4"))
    assert abs(r["params"] - PUBLISHED[model]) <= 0.02 * PUBLISHED[model], r["params"]


def test_every_hub_model_config_names_its_shape():
    import yaml

    for path in sorted((CONFIGS / "model").glob("*.yaml")):
        content = yaml.safe_load(path.read_text()) or {}
        if content.get("hub_id"):
            assert content.get("shape"), f"{path.name}: no shape (mistral-align estimate needs one)"


def test_warn_if_wont_fit_warns_before_loading(caplog):
    import logging

    from mistral_align.model.estimate import warn_if_wont_fit

    cfg = cfg_of("model=mixtral-8x7b-v0.1", "quant=nf4")
    with caplog.at_level(logging.WARNING, logger="mistral_align.model.estimate"):
        r = warn_if_wont_fit(cfg, gpu_bytes=24 * GiB)
    assert r is not None and "this GPU has 24.0 GiB" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mistral_align.model.estimate"):
        warn_if_wont_fit(cfg, gpu_bytes=80 * GiB)
    assert caplog.text == ""
    assert warn_if_wont_fit(cfg) is None  # no CUDA device here: nothing to compare with


def test_dpo_stage_counts_both_halves_of_each_pair():
    cfg = cfg_of("model=mistral-7b-v0.3", "quant=nf4", "dpo.train.per_device_batch_size=4", "dpo.train.max_length=1024")
    dpo = estimate_memory(cfg, stage="dpo")
    assert dpo["batch"] == 4 and dpo["length"] == 1024
    sft = estimate_memory(cfg_of("model=mistral-7b-v0.3", "quant=nf4", "sft.train.per_device_batch_size=8",
                                 "sft.train.max_length=1024"))
    assert dpo["per_gpu"]["activations"] == sft["per_gpu"]["activations"]
