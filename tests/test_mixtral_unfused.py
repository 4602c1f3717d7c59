"""Mixtral really 4-bit (model/mixtral_unfused.py): same logits as stock transformers on the same
weights, every expert linear quantised by bitsandbytes (nf4 and int8), router full precision and
frozen, LoRA on every expert trains."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from test_model_build import batch, build, cfg_for, train_a_few_steps
from transformers import MixtralConfig, MixtralForCausalLM

from mistral_align.model.facts import count_linear_layers, model_facts, parameter_bytes
from mistral_align.model.load import build_model
from mistral_align.model.mixtral_unfused import UnfusedMixtralForCausalLM

SMALL = MixtralConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                      num_experts_per_tok=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def stock_dir(tmp_path_factory):
    torch.manual_seed(0)
    stock = MixtralForCausalLM(SMALL)
    path = tmp_path_factory.mktemp("stock")
    stock.save_pretrained(path)  # transformers 5 writes the Hub's block_sparse_moe.experts.N.w1/w2/w3
    return path


def test_logits_equal_stock_mixtral_on_the_same_weights(stock_dir):
    stock = MixtralForCausalLM.from_pretrained(stock_dir, dtype=torch.float32).eval()
    ours = UnfusedMixtralForCausalLM.from_pretrained(stock_dir, dtype=torch.float32).eval()
    assert isinstance(ours.model.layers[0].mlp.experts[3].down_proj, torch.nn.Linear)
    ids = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = stock(ids).logits, ours(ids).logits
    assert (a - b).abs().max().item() <= 1e-5
    # and back: our save_pretrained writes the Hub names, which stock transformers loads
    out = stock_dir.parent / "ours"
    ours.save_pretrained(out)
    again = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (again(ids).logits - a).abs().max().item() <= 1e-5


@pytest.mark.parametrize("quant,cls,expected", [("nf4", bnb.nn.Linear4bit, "linear_4bit"), ("int8", bnb.nn.Linear8bitLt, "linear_8bit")])
def test_every_expert_linear_is_quantised(quant, cls, expected):
    cfg = cfg_for("tiny-mixtral", f"quant={quant}")
    m = build_model(cfg.model, cfg.quant, vocab_size=32000, seed=0, device_map={"": "cpu"})
    experts = {n: mod for n, mod in m.named_modules() if ".experts." in n and n.rsplit(".", 1)[-1].endswith("_proj")}
    assert len(experts) == 2 * 4 * 3
    assert all(isinstance(mod, cls) for mod in experts.values()), {n: type(x) for n, x in experts.items()}
    # router: a plain full-precision parameter
    assert m.model.layers[0].mlp.gate.weight.dtype == torch.float32
    counts = count_linear_layers(m)
    assert counts[expected] == 2 * (4 + 12) and counts["linear_full"] == 1  # lm_head skipped
    pb = parameter_bytes(m)
    assert set(pb["by_kind"]) == {"attention", "experts", "router", "embeddings", "norms"}
    assert pb["by_dtype"]["float32"] < pb["total"]


@pytest.mark.slow
def test_qlora_on_every_expert_trains_with_dropout_router_frozen():
    """Also test_model_build's tiny-Mixtral QLoRA test (the same config, built and trained once)."""
    cfg = cfg_for("tiny-mixtral", "peft.r=4", "peft.alpha=8", "peft.dropout=0.05")
    model = build(cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    for e in range(4):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert any(f"experts.{e}.{proj}.lora_A" in n for n in trainable), (e, proj)
    assert any("q_proj.lora_A" in n for n in trainable)
    assert not any(".gate." in n for n in trainable), "router must stay frozen"
    facts = model_facts(model)
    assert facts["num_local_experts"] == 4
    # every linear is 4-bit: 2 layers x (4 attention + 4 experts x 3) (model/mixtral_unfused.py)
    assert facts["linear_4bit"] == 32 and facts["linear_full"] == 1
    assert facts["parameter_bytes"]["by_kind"]["lora"] == 4 * facts["trainable_params"]
    losses = train_a_few_steps(model, batch("v1"))
    assert losses[-1] < losses[0] - 0.5, losses
    print("losses", losses)


def test_train_router_puts_lora_on_the_router():
    cfg = cfg_for("tiny-mixtral", "peft.r=4", "peft.dropout=0", "peft.train_router=true")
    model = build(cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".mlp.gate." in n and "lora" in n for n in trainable), trainable


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_loads_onto_stock_transformers_mixtral_with_plain_peft(stock_dir, tmp_path, rslora):
    from omegaconf import OmegaConf
    from peft import PeftModel, get_peft_model

    from mistral_align.model.lora import lora_config
    from mistral_align.model.mixtral_unfused import write_stock_adapter
    from mistral_align.schema.model import PeftConfig

    ours = UnfusedMixtralForCausalLM.from_pretrained(stock_dir, dtype=torch.float32)
    peft_cfg = OmegaConf.structured(PeftConfig(r=4, alpha=8, dropout=0.0, use_rslora=rslora,
                                               modules_to_save=["lm_head"]))
    ours = get_peft_model(ours, lora_config(peft_cfg, ours))
    torch.manual_seed(2)
    with torch.no_grad():  # a trained-looking adapter: B is zero at init
        for n, p in ours.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.05)
    ours.save_pretrained(tmp_path / "ours")
    write_stock_adapter(tmp_path / "ours", tmp_path / "stock")

    stock = MixtralForCausalLM.from_pretrained(stock_dir, dtype=torch.float32)
    stock = PeftModel.from_pretrained(stock, tmp_path / "stock").eval()
    ours.eval()
    ids = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ours(ids).logits, stock(ids).logits
        base = MixtralForCausalLM.from_pretrained(stock_dir, dtype=torch.float32)(ids).logits
    assert (a - base).abs().max() > 1e-2  # the adapter changes the output
    assert (a - b).abs().max().item() <= 1e-5, (a - b).abs().max().item()
    print("adapter logit diff", (a - b).abs().max().item())


def test_real_mixtral_8x7b_shape_every_linear_becomes_4bit_on_meta():
    """The real Mixtral-8x7B shape, built on the meta device (no weights), through transformers'
    own replace_with_bnb_linear: stock transformers 5 gets 128 4-bit layers (attention only),
    ours every attention and expert linear."""
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    counts = {}
    for cls in (MixtralForCausalLM, UnfusedMixtralForCausalLM):
        real = MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2)
        with torch.device("meta"):
            m = cls(real)
        m = replace_with_bnb_linear(m, modules_to_not_convert=["lm_head"], quantization_config=q)
        layers = [mod for mod in m.modules() if isinstance(mod, bnb.nn.Linear4bit)]
        covered = sum(mod.in_features * mod.out_features for mod in layers)
        counts[cls.__name__] = (len(layers), covered)
    assert counts["MixtralForCausalLM"] == (128, 1_342_177_280)
    assert counts["UnfusedMixtralForCausalLM"] == (32 * (4 + 8 * 3), 46_439_333_888)


def test_inline_mixtral_is_written_with_hub_names_and_loads_in_stock_transformers(tmp_path):
    """An inline Mixtral goes through the same Hub-name conversion as a Hub checkpoint."""
    import os

    from safetensors import safe_open

    from mistral_align.model.inline import save_inline_base

    cfg = cfg_for("tiny-mixtral", "quant=none")
    path = save_inline_base(cfg.model, 32000, 0, tmp_path / "base")
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    stock = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = build_model(cfg.model, cfg.quant, vocab_size=32000, seed=0, device_map={"": "cpu"}).eval()
    ids = torch.randint(0, 32000, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (stock(ids).logits - ours(ids).logits).abs().max().item() <= 1e-5


def test_peft_experts_false_leaves_experts_alone(stock_dir):
    from omegaconf import OmegaConf

    from mistral_align.model.lora import lora_config
    from mistral_align.schema.model import PeftConfig

    ours = UnfusedMixtralForCausalLM.from_pretrained(stock_dir, dtype=torch.float32)
    on = lora_config(OmegaConf.structured(PeftConfig()), ours)
    off = lora_config(OmegaConf.structured(PeftConfig(experts=False)), ours)
    assert {"gate_proj", "up_proj", "down_proj"} <= set(on.target_modules)
    assert set(off.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not on.target_parameters


def test_an_expert_without_tokens_still_gets_a_gradient_for_ddp():
    """DDP (find_unused_parameters=False) needs a gradient for every trainable parameter on every
    rank: an expert no token was routed to gets a zero one."""
    cfg = cfg_for("tiny-mixtral", "peft.r=4", "peft.dropout=0", "model.architecture.num_local_experts=8",
                  "model.architecture.num_experts_per_tok=1")
    model = build(cfg)
    model.train()
    ids = torch.randint(0, 32000, (1, 3), generator=torch.Generator().manual_seed(0))  # 3 tokens, 8 experts, top-1
    model(input_ids=ids, labels=ids).loss.backward()
    expert_lora = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and ".experts." in n}
    assert len(expert_lora) == 2 * 8 * 3 * 2
    assert all(g is not None for g in expert_lora.values())
    assert sum(bool(g.abs().sum() == 0) for g in expert_lora.values()) >= 2 * 5 * 3 * 2  # >= 5 idle experts a layer
