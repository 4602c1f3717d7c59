"""GPU-only checks (skipped without CUDA; scripts/gpu_check.sh runs them): 4-bit layers on CUDA,
padding-free DPO equal to padded with sdpa and FlashAttention-2, FA2 packed-vs-unpacked SFT loss,
Liger kernels on/off loss equality, torch.compile over 4-bit layers."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

needs_fa2 = pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn not installed")
needs_liger = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel not installed")
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


def tiny(tmp_path, attn="sdpa", quantized=False, dtype=torch.bfloat16):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, MistralConfig, MistralForCausalLM

    path = tmp_path / "base"
    if not path.exists():
        torch.manual_seed(0)
        arch = MistralConfig(vocab_size=32768, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                             tie_word_embeddings=False)  # fmt: skip
        MistralForCausalLM(arch).save_pretrained(path)
    kw = {}
    if quantized:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=dtype)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn, device_map={"": 0}, **kw)
    model.config.use_cache = False
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))


def rows(n=6, seed=0):
    import random

    rng = random.Random(seed)
    return [[1] + [rng.randrange(5, 32000) for _ in range(rng.choice([5, 40, 300]))] + [2] for _ in range(n)]


def per_row_losses(model, seqs, packed: bool):
    """Summed next-token NLL of each sequence, computed packed (one row, position ids) or one by one."""
    from torch.nn.functional import cross_entropy

    if not packed:
        out = []
        for s in seqs:
            ids = torch.tensor([s], device="cuda")
            logits = model(input_ids=ids).logits.float()
            out.append(cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
        return torch.stack(out)
    ids = torch.tensor([sum(seqs, [])], device="cuda")
    pos = torch.tensor([sum((list(range(len(s))) for s in seqs), [])], device="cuda")
    logits = model(input_ids=ids, position_ids=pos).logits.float()[0]
    out, o = [], 0
    for s in seqs:
        out.append(cross_entropy(logits[o : o + len(s) - 1], ids[0, o + 1 : o + len(s)], reduction="sum"))
        o += len(s)
    return torch.stack(out)


@needs_fa2
def test_flash_attention_2_packed_equals_unpacked(tmp_path):
    model = tiny(tmp_path, attn="flash_attention_2")
    seqs = rows()
    with torch.no_grad():
        a, b = per_row_losses(model, seqs, packed=False), per_row_losses(model, seqs, packed=True)
    assert torch.allclose(a, b, rtol=2e-2, atol=0.5), (a, b)  # bf16


@needs_bnb
def test_4bit_on_cuda_trains(tmp_path):
    model = tiny(tmp_path, quantized=True)
    seqs = rows(3)
    loss = per_row_losses(model, seqs, packed=True).sum()
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@needs_bnb
def test_torch_compile_with_4bit_layers(tmp_path):
    model = tiny(tmp_path, quantized=True)
    seqs = rows(3)
    with torch.no_grad():
        eager = per_row_losses(model, seqs, packed=False)
        compiled = per_row_losses(torch.compile(model), seqs, packed=False)
    assert torch.allclose(eager, compiled, rtol=2e-2, atol=0.5), (eager, compiled)


@needs_liger
def test_liger_kernel_on_off_same_sft_loss(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from mistral_align.chat.hf_tokenizer import load_hf_tokenizer, save_hf_tokenizer

    save_hf_tokenizer("v3", tmp_path / "tok")
    data = Dataset.from_list([{"input_ids": s, "labels": [-100] * 3 + s[3:]} for s in rows(8)])
    losses = []
    for liger in (False, True):
        args = SFTConfig(output_dir=str(tmp_path / f"o{liger}"), per_device_train_batch_size=4, max_steps=1,
                         report_to=[], bf16=True, use_liger_kernel=liger, packing=True, max_length=1024,
                         save_strategy="no")  # fmt: skip
        trainer = SFTTrainer(model=tiny(tmp_path), args=args, train_dataset=data,
                             processing_class=load_hf_tokenizer(tmp_path / "tok"))  # fmt: skip
        batch = trainer._prepare_inputs(trainer.data_collator([data[i] for i in range(4)]))
        losses.append(trainer.compute_loss(trainer.model, batch).item())
    assert losses[1] == pytest.approx(losses[0], rel=2e-2), losses


@pytest.mark.parametrize("attn", ["sdpa", pytest.param("flash_attention_2", marks=needs_fa2)])
@pytest.mark.parametrize("quantized", [False, pytest.param(True, marks=needs_bnb)], ids=["bf16", "nf4"])
def test_padding_free_dpo_equals_padded_on_cuda(tmp_path, attn, quantized):
    from datasets import Dataset
    from trl import DPOConfig

    from mistral_align.chat.hf_tokenizer import load_hf_tokenizer, save_hf_tokenizer
    from mistral_align.train.dpo_trainer import PretokenizedDPOTrainer

    save_hf_tokenizer("v3", tmp_path / "tok")
    seqs = rows(8, seed=3)
    data = Dataset.from_list([{"prompt_ids": s[:4], "chosen_ids": s[4:], "rejected_ids": s[4:][::-1]} for s in seqs])
    losses = []
    # padded, packed, and (sdpa only: it needs a dense mask) packed with each prompt computed once
    modes = [(False, False), (True, False)] + ([(True, True)] if attn == "sdpa" else [])
    for padding_free, shared_prompt in modes:
        args = DPOConfig(output_dir=str(tmp_path / f"o{padding_free}{shared_prompt}"), per_device_train_batch_size=8, max_steps=1,
                         report_to=[], bf16=True, save_strategy="no", max_length=1024)  # fmt: skip
        trainer = PretokenizedDPOTrainer(model=tiny(tmp_path, attn=attn, quantized=quantized), args=args,
                                         train_dataset=data, processing_class=load_hf_tokenizer(tmp_path / "tok"),
                                         padding_free=padding_free, shared_prompt=shared_prompt)  # fmt: skip
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():  # move the policy away from the frozen "ref" copy
            for name, p in sorted(trainer.model.named_parameters()):
                if ".default." in name:
                    p.add_((0.2 * torch.randn(p.shape, generator=gen)).to(p.device, p.dtype))
        batch = trainer._prepare_inputs(trainer.data_collator([data[i] for i in range(8)]))
        losses.append(trainer.compute_loss(trainer.model, batch).item())
    assert abs(losses[0] - 0.6931) > 1e-3
    assert all(loss == pytest.approx(losses[0], abs=2e-2) for loss in losses[1:]), losses  # bf16 activations
