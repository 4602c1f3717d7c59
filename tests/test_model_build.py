"""Tiny Mistral and tiny Mixtral, built from the shipped configs, with REAL bitsandbytes 4-bit layers
and LoRA: the right layers are quantised and adapted, and a few optimiser steps lower the loss."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from hydra import compose, initialize_config_dir
from test_config import CONFIGS

from mistral_align.chat import Message, get_encoder
from mistral_align.errors import ConfigError
from mistral_align.model.facts import model_facts
from mistral_align.model.load import build_model
from mistral_align.model.lora import apply_peft
from mistral_align.schema.recipe import check_config, register_configs

register_configs()


def cfg_for(model: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("sft", overrides=[f"model={model}", "quant=nf4", "quant.compute_dtype=float32", *overrides])
    check_config(cfg)
    return cfg


def batch(version: str):
    enc = get_encoder(version)
    rows = [
        enc.encode_sft([Message("user", "Copy: apple river"), Message("assistant", "apple river")]),
        enc.encode_sft([Message("user", "Reverse: stone cloud"), Message("assistant", "cloud stone")]),
    ]
    width = max(len(r.input_ids) for r in rows)
    ids = torch.tensor([r.input_ids + [0] * (width - len(r.input_ids)) for r in rows])
    labels = torch.tensor([r.labels + [-100] * (width - len(r.labels)) for r in rows])
    mask = (torch.arange(width)[None] < torch.tensor([[len(r.input_ids)] for r in rows])).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_a_few_steps(model, inputs, steps: int = 8, lr: float = 5e-3) -> list[float]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**inputs, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def build(cfg):
    enc = get_encoder(cfg.model.tokenizer_version)
    model = build_model(cfg.model, cfg.quant, vocab_size=enc.vocab_size, seed=0, device_map={"": "cpu"})
    assert model.config.vocab_size == enc.vocab_size
    model = apply_peft(model, cfg.peft, quantized=True, gradient_checkpointing=True)
    return model


@pytest.mark.slow
def test_tiny_mistral_qlora_trains():
    cfg = cfg_for("tiny-mistral", "model.architecture.hidden_size=64", "model.architecture.intermediate_size=128",
                  "model.architecture.num_hidden_layers=2", "model.architecture.num_attention_heads=4",
                  "model.architecture.num_key_value_heads=2", "peft.dropout=0")
    model = build(cfg)
    facts = model_facts(model)
    # q k v o gate up down in each of 2 layers are 4-bit; lm_head stays full precision
    assert facts["linear_4bit"] == 14 and facts["linear_full"] == 1
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 14
    assert facts["trainable_params"] > 0 and facts["trainable_fraction"] < 0.05
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f"{proj}.lora_A" in n for n in lora), proj
    assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.quant_type == "nf4"
    losses = train_a_few_steps(model, batch("v3"))
    assert losses[-1] < losses[0] - 0.5, losses


# The tiny-Mixtral QLoRA training test (every linear 4-bit, LoRA on the experts, router frozen, loss
# falls) is test_mixtral_unfused.py's test_qlora_on_every_expert_trains_with_dropout_router_frozen:
# the same config, built and trained once.


def test_lora_attention_only_and_modules_to_save():
    cfg = cfg_for("tiny-mistral", "peft=lora-attn", "model.architecture.num_hidden_layers=1",
                  "peft.modules_to_save=[lm_head]")
    model = build(cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any("mlp" in n for n in trainable)
    assert any("lm_head.modules_to_save" in n for n in trainable)


def test_int8_builds_and_counts():
    cfg = cfg_for("tiny-mistral", "quant=int8", "model.architecture.num_hidden_layers=1")
    enc = get_encoder("v3")
    model = build_model(cfg.model, cfg.quant, vocab_size=enc.vocab_size, device_map={"": "cpu"})
    facts = model_facts(model)
    assert facts["linear_8bit"] == 7 and facts["linear_4bit"] == 0


def test_sliding_window_and_attention_are_honoured():
    cfg = cfg_for("tiny-mistral", "quant=none", "model.sliding_window=16", "model.attn_implementation=eager",
                  "model.architecture.num_hidden_layers=1")
    model = build_model(cfg.model, cfg.quant, vocab_size=32768, device_map={"": "cpu"})
    assert model.config.sliding_window == 16
    assert model.config._attn_implementation == "eager"


def test_model_needs_hub_id_or_architecture():
    cfg = cfg_for("tiny-mistral", "quant=none")
    cfg.model.architecture = None
    with pytest.raises(ConfigError, match="^model:"):
        check_config(cfg)
    cfg.model.hub_id = "mistralai/Mistral-7B-v0.3"
    check_config(cfg)
