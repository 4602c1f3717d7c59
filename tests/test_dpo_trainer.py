"""DPO on a tiny QLoRA Mistral that starts from an SFT adapter: our ids reach the model, the
reference is the SFT model (step 0: rewards 0, loss ln 2), the reference never moves, margins grow."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from runfixtures import save_tiny_mistral
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from trl import DPOConfig

from mistral_align.chat import get_encoder
from mistral_align.chat.hf_tokenizer import load_hf_tokenizer, save_hf_tokenizer
from mistral_align.chat.schema import parse_preference
from mistral_align.model.bnb_cpu import disable_cpu_inference_repacking
from mistral_align.train.dpo_trainer import PretokenizedDPOTrainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    enc = get_encoder("v3")
    save_tiny_mistral(tmp / "base", enc.vocab_size, max_position_embeddings=256)

    def load_4bit():
        model = AutoModelForCausalLM.from_pretrained(
            tmp / "base",
            dtype=torch.float32,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
            ),
        )  # fmt: skip
        assert disable_cpu_inference_repacking(model) == 14  # 2 layers x 7 projections
        return model

    # An "SFT adapter" whose weights are far from zero, so the SFT model differs from the base model:
    # a reference that silently fell back to the base model would give non-zero rewards at step 0.
    torch.manual_seed(1)
    sft = get_peft_model(load_4bit(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    sft.save_pretrained(tmp / "sft")
    save_hf_tokenizer("v3", tmp / "tok")

    rows = []
    for i in range(16):
        a, b = i % 7, (i * 3) % 5
        pair = parse_preference({"prompt": f"Add: {a} + {b}", "chosen": str(a + b), "rejected": str(a + b + 1)})
        rows.append(vars(enc.encode_dpo(pair)))
    return tmp, load_4bit, Dataset.from_list(rows)


def make_trainer(setup, **overrides):
    tmp, load_4bit, data = setup
    model = PeftModel.from_pretrained(load_4bit(), tmp / "sft", is_trainable=True)
    args = dict(
        output_dir=str(tmp / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=8, max_steps=24,
        learning_rate=5e-3, beta=0.1, report_to=[], logging_steps=4, max_length=64, use_cpu=True,
        save_strategy="no", gradient_checkpointing=False, bf16=False,
    )  # fmt: skip
    args.update(overrides)
    return PretokenizedDPOTrainer(
        model=model, args=DPOConfig(**args), train_dataset=data, eval_dataset=data,
        processing_class=load_hf_tokenizer(tmp / "tok"),
    )  # fmt: skip


def test_step0_reference_is_the_sft_model_and_never_moves_while_margins_grow(setup):
    trainer = make_trainer(setup)
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert set(model.peft_config) == {"default", "ref"}

    before = trainer.evaluate()
    assert before["eval_rewards/chosen"] == 0.0
    assert before["eval_rewards/rejected"] == 0.0
    assert before["eval_rewards/margins"] == 0.0
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)

    ref_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".ref." in n}
    policy_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
    assert ref_before and not any(p.requires_grad for n, p in model.named_parameters() if ".ref." in n)

    with warnings.catch_warnings():
        # bitsandbytes warns when backprop reaches a 4-bit kernel with no autograd (dropped gradients).
        warnings.filterwarnings("error", message=".*autograd kernel was not registered.*")
        trainer.train()
    after = trainer.evaluate()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in ref_before.items()), "the reference adapter moved"
    assert any(not torch.equal(params[n], p) for n, p in policy_before.items()), "the policy did not train"
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"] + 0.005
    assert after["eval_rewards/accuracies"] > 0.5
    assert after["eval_loss"] < before["eval_loss"]


def test_the_ids_that_reach_forward_are_ours(setup):
    _, _, data = setup
    trainer = make_trainer(setup, max_steps=1)
    seen = []
    handle = trainer.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((kwargs["input_ids"], kwargs["attention_mask"])), with_kwargs=True
    )
    trainer.train()
    handle.remove()
    expected = {tuple(r["prompt_ids"] + r["chosen_ids"]) for r in data} | {
        tuple(r["prompt_ids"] + r["rejected_ids"]) for r in data
    }
    enc = get_encoder("v3")
    rows = [tuple(ids[mask.bool()].tolist()) for input_ids, masks in seen for ids, mask in zip(input_ids, masks)]
    assert rows and all(row in expected for row in rows)
    for row in rows:
        assert row.count(enc.bos_id) == 1 and row[0] == enc.bos_id
        assert row.count(enc.eos_id) == 1 and row[-1] == enc.eos_id
        assert row.count(enc.end_inst) == 1


def test_untokenised_preference_data_is_refused(setup):
    tmp, load_4bit, _ = setup
    text = Dataset.from_list([{"prompt": "hi", "chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match="load_dpo_dataset"):
        PretokenizedDPOTrainer(
            model=PeftModel.from_pretrained(load_4bit(), tmp / "sft", is_trainable=True),
            args=DPOConfig(output_dir=str(tmp / "x"), use_cpu=True, report_to=[]),
            train_dataset=text, processing_class=load_hf_tokenizer(tmp / "tok"),
        )  # fmt: skip


def test_precomputed_reference_log_probs_are_the_sft_models(setup):
    trainer = make_trainer(setup, precompute_ref_log_probs=True, max_steps=8)
    assert "ref_chosen_logps" in trainer.train_dataset.column_names
    before = trainer.evaluate()
    # Scored once up front by the frozen SFT adapter: at step 0 the policy agrees with it (up to
    # the float noise of a different batch composition), as it would with a live reference.
    assert abs(before["eval_rewards/margins"]) < 1e-4
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)
    trainer.train()
    assert trainer.evaluate()["eval_rewards/margins"] > before["eval_rewards/margins"]


def test_truncation_keeps_bos_and_the_whole_prompt_and_drops_prompts_that_fill_max_length(setup):
    tmp, load_4bit, data = setup
    enc = get_encoder("v3")
    long_prompt = vars(enc.encode_dpo(parse_preference({"prompt": "Add: " + " + ".join(["1"] * 20), "chosen": "20", "rejected": "21"})))
    rows = [*data, long_prompt]
    max_length = max(len(r["prompt_ids"]) for r in data) + 1  # room for one reply token only
    assert len(long_prompt["prompt_ids"]) >= max_length
    trainer = PretokenizedDPOTrainer(
        model=PeftModel.from_pretrained(load_4bit(), tmp / "sft", is_trainable=True),
        args=DPOConfig(output_dir=str(tmp / "trunc"), per_device_train_batch_size=4, max_steps=2, report_to=[],
                       use_cpu=True, max_length=max_length, save_strategy="no", bf16=False),
        train_dataset=Dataset.from_list(rows), processing_class=load_hf_tokenizer(tmp / "tok"),
    )  # fmt: skip
    assert trainer.dropped_long_prompts == 1 and len(trainer.train_dataset) == len(data)
    seen = []
    handle = trainer.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((kwargs["input_ids"], kwargs["attention_mask"])), with_kwargs=True
    )
    trainer.train()
    handle.remove()
    prompts = {tuple(r["prompt_ids"]) for r in data}
    for input_ids, masks in seen:
        for ids, mask in zip(input_ids, masks):
            row = ids[mask.bool()].tolist()
            assert len(row) <= max_length
            assert any(tuple(row[: len(p)]) == p and len(row) > len(p) for p in prompts)  # BOS ... [/INST] + reply
