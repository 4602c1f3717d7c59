"""Padding-free DPO (chosen and rejected packed into one row, position ids restarting at 0), and
shared-prompt DPO (each pair's prompt computed once), give the padded path's loss, metrics and
gradients within 1e-5, on a real tiny Mistral, float32 and NF4 QLoRA, with a live reference and
with precomputed reference log-probs."""

from __future__ import annotations

import random

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from trl import DPOConfig

from mistral_align.chat import get_encoder
from mistral_align.chat.hf_tokenizer import load_hf_tokenizer, save_hf_tokenizer
from mistral_align.chat.schema import parse_preference
from mistral_align.model.bnb_cpu import disable_cpu_inference_repacking
from mistral_align.train.dpo_padding_free import (
    PaddingFreePreferenceCollator,
    shared_prefix_length,
    shared_prefix_mask,
    unpack_shifted,
)
from mistral_align.train.dpo_trainer import PretokenizedDPOTrainer

from runfixtures import WORDS, pair_ids, random_pairs, save_tiny_mistral

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo_pf")
    enc = get_encoder("v3")
    save_tiny_mistral(tmp / "base", enc.vocab_size, max_position_embeddings=512)
    save_hf_tokenizer("v3", tmp / "tok")
    rng = random.Random(0)
    rows = random_pairs(enc, rng, 8, prompt=(3, 8, 20), chosen=(1, 5, 30), rejected=(2, 9, 15))
    text = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    # Replies that begin alike (the shared prefix runs into the completions), and a rejected reply that is
    # a prefix of the chosen one (all of it but its last token shared).
    start = text(6)
    for chosen, rejected in ((start + " " + text(9), start + " " + text(4)), (start + " " + text(5), start)):
        pair = parse_preference({"prompt": text(5), "chosen": chosen, "rejected": rejected})
        rows.append(pair_ids(enc.encode_dpo(pair)))
    return tmp, Dataset.from_list(rows)


def load_model(tmp, quantized: bool, base: str = "base", **config):
    kw = dict(config)
    if quantized:
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tmp / base, dtype=torch.float32, **kw)
    if quantized:
        disable_cpu_inference_repacking(model)
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))


def make_trainer(setup, quantized, padding_free, shared_prompt=False, model_config=None, base="base", **overrides):
    tmp, data = setup
    args = dict(
        output_dir=str(tmp / "out"), per_device_train_batch_size=10, per_device_eval_batch_size=10, max_steps=1,
        learning_rate=1e-3, beta=0.1, report_to=[], max_length=256, save_strategy="no",
        use_cpu=not torch.cuda.is_available(),  # where a GPU is, bitsandbytes puts the 4-bit model on it
        gradient_checkpointing=False, bf16=False,
    )  # fmt: skip
    args.update(overrides)
    trainer = PretokenizedDPOTrainer(
        model=load_model(tmp, quantized, base, **(model_config or {})), args=DPOConfig(**args), train_dataset=data,
        processing_class=load_hf_tokenizer(tmp / "tok"), keep_float32=quantized, padding_free=padding_free,
        shared_prompt=shared_prompt,
    )  # fmt: skip
    # The trainer keeps the starting adapter as the frozen "ref": move the policy away from it.
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in sorted(trainer.model.named_parameters()):
            if ".default." in name:
                param.add_(0.2 * torch.randn(param.shape, generator=gen, dtype=param.dtype).to(param.device))
    return trainer


def loss_metrics_grads(trainer, data):
    inputs = trainer._prepare_inputs(trainer.data_collator([data[i] for i in range(len(data))]))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.item(), metrics, grads


@pytest.mark.parametrize("quantized", [False, True], ids=["float32", "nf4"])
@pytest.mark.parametrize("precompute", [False, True], ids=["live-ref", "precomputed-ref"])
def test_padding_free_equals_padded(setup, quantized, precompute):
    _, data = setup
    padded = make_trainer(setup, quantized, padding_free=False, precompute_ref_log_probs=precompute)
    packed = make_trainer(setup, quantized, padding_free=True, precompute_ref_log_probs=precompute)
    if precompute:
        assert_same_reference(padded, packed)
    seen = []
    handle = packed.model.base_model.model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((kwargs["input_ids"].shape, kwargs.get("attention_mask"))),
        with_kwargs=True,
    )
    assert_same_step(padded, packed)
    handle.remove()
    longest = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in data)
    # sdpa: rows as long as the longest sequence (first-fit decreasing), no attention mask, fewer rows than 2B
    assert seen and all(shape[1] == longest and shape[0] < 2 * len(data) and mask is None for shape, mask in seen)


def assert_same_reference(padded, packed):
    for col in ("ref_chosen_logps", "ref_rejected_logps"):
        assert torch.allclose(torch.tensor(padded.train_dataset[col]), torch.tensor(packed.train_dataset[col]), atol=1e-5, rtol=0)


def assert_same_step(padded, packed):
    loss_a, metrics_a, grads_a = loss_metrics_grads(padded, padded.train_dataset)
    loss_b, metrics_b, grads_b = loss_metrics_grads(packed, packed.train_dataset)
    assert abs(loss_a - 0.6931) > 1e-3  # the policy really differs from the reference
    assert loss_b == pytest.approx(loss_a, abs=1e-5)
    assert metrics_a.keys() == metrics_b.keys()
    for key in metrics_a:
        assert metrics_b[key] == pytest.approx(metrics_a[key], abs=1e-5, rel=1e-5), key
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("quantized,precompute", [(False, False), (True, True)], ids=["float32-live-ref", "nf4-precomputed-ref"])
def test_shared_prompt_equals_padded(setup, quantized, precompute):
    _, data = setup
    padded = make_trainer(setup, quantized, padding_free=False, precompute_ref_log_probs=precompute)
    shared = make_trainer(setup, quantized, padding_free=True, shared_prompt=True, precompute_ref_log_probs=precompute)
    if precompute:
        assert_same_reference(padded, shared)
    seen = []
    handle = shared.model.base_model.model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["input_ids"].numel()), with_kwargs=True)
    assert_same_step(padded, shared)
    handle.remove()
    # Each pair's tokens once, its shared prefix once: fewer token slots than padding-free's real tokens.
    real = sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in data)
    prompts = sum(len(r["prompt_ids"]) - 1 for r in data)
    assert seen and seen[0] <= real - prompts + max(len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
                                                     for r in data)  # fmt: skip
    assert seen[0] < real


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_shared_prompt_keeps_the_sliding_window(setup, attn):
    # A window shorter than the longer rows: a mask that forgot it would differ from the padded path.
    config = {"sliding_window": 12, "attn_implementation": attn}
    padded = make_trainer(setup, False, padding_free=False, model_config=config)
    shared = make_trainer(setup, False, padding_free=True, shared_prompt=True, model_config=config)
    assert_same_step(padded, shared)


def test_shared_prompt_refuses_flash_attention(setup):
    with pytest.raises(ValueError, match="sdpa or eager"):
        make_trainer(setup, False, padding_free=True, shared_prompt=True, model_config={"attn_implementation": "flex_attention"})


@pytest.mark.parametrize("shared_prompt", [False, True], ids=["padding-free", "shared-prompt"])
def test_mixture_of_experts_router_loss_stays_the_padded_batchs(setup, shared_prompt):
    # TRL adds Mixtral's load-balancing loss; packed rows (padding blocks, shared prefixes, a 4-D mask)
    # must give the padded batch's value, not one over the packed rows.
    from transformers import MixtralConfig, MixtralForCausalLM

    tmp, _ = setup
    if not (tmp / "mixtral").exists():
        config = MixtralConfig(vocab_size=get_encoder("v3").vocab_size, hidden_size=64, intermediate_size=96,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2, router_aux_loss_coef=0.5, max_position_embeddings=512,
                               tie_word_embeddings=False, output_router_logits=True)  # as model/inline.py sets it  # fmt: skip
        torch.manual_seed(0)
        MixtralForCausalLM(config).save_pretrained(tmp / "mixtral")
    padded = make_trainer(setup, False, padding_free=False, base="mixtral")
    packed = make_trainer(setup, False, padding_free=True, shared_prompt=shared_prompt, base="mixtral")
    assert padded.aux_loss_enabled and packed.aux_loss_enabled
    assert_same_step(padded, packed)
    assert padded._metrics["train"]["aux_loss"][-1] > 0


def test_shared_prefix_length_stops_one_short_of_the_common_prefix():
    ids = lambda *t: torch.tensor(t)  # noqa: E731
    # prompt [1 2 3], replies [4 5] / [6]: tokens 0..2 common, token 2's output scores 4 in one and 6 in the other
    assert shared_prefix_length(ids(1, 2, 3, 4, 5), ids(1, 2, 3, 6, 0), ids(0, 0, 0, 1, 1), ids(0, 0, 0, 1, 0), 5, 4) == 2
    # replies that begin alike: the shared part runs into them
    assert shared_prefix_length(ids(1, 2, 4, 5, 7), ids(1, 2, 4, 5, 8), ids(0, 0, 1, 1, 1), ids(0, 0, 1, 1, 1), 5, 5) == 3
    # the same tokens, trained in one and not in the other: nothing past where the masks part
    assert shared_prefix_length(ids(1, 2, 4, 5), ids(1, 2, 4, 5), ids(0, 0, 1, 1), ids(0, 0, 0, 1), 4, 4) == 1
    # one sequence a prefix of the other: all of it but its last token
    assert shared_prefix_length(ids(1, 2, 4, 5), ids(1, 2, 4, 0), ids(0, 0, 1, 1), ids(0, 0, 1, 0), 4, 3) == 2
    assert shared_prefix_length(ids(9, 2), ids(1, 2), ids(0, 1), ids(0, 1), 2, 2) == 0


def test_collator_shares_each_pairs_prompt():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    collate = PaddingFreePreferenceCollator(DataCollatorForPreference(pad_token_id=0), rows="longest", pad_token_id=0,
                                            shared_prompt=True)  # fmt: skip
    batch = collate([{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
                     {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]}])  # fmt: skip
    # units: [1 2 3 4 5 | 3 6] (7 tokens) and [7 8 9 | 8 10 11] (6 tokens) -> two rows of 7
    assert batch["packed_input_ids"].tolist() == [[1, 2, 3, 4, 5, 3, 6], [7, 8, 9, 8, 10, 11, 0]]
    assert batch["packed_position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3], [0, 1, 2, 1, 2, 3, 0]]
    flat = batch["packed_input_ids"].view(-1)
    assert flat[batch["packed_index"]].tolist() == batch["input_ids"][batch["attention_mask"].bool()].tolist()
    mask = shared_prefix_mask(batch["packed_position_ids"], batch["packed_segment_ids"], batch["packed_parent_ids"],
                              batch["packed_shared"], None, True)[:, 0]  # fmt: skip
    # the copy of token 3 (row 0, slot 5) sees tokens 1 2 and itself; token 6 also sees the copy, never 4 or 5
    assert mask[0, 5].tolist() == [True, True, False, False, False, True, False]
    assert mask[0, 6].tolist() == [True, True, False, False, False, True, True]
    assert mask[0, 4].tolist() == [True, True, True, True, True, False, False]
    assert mask[1, 6].tolist() == [False] * 6 + [True]  # padding: a block of its own
    window = shared_prefix_mask(batch["packed_position_ids"], batch["packed_segment_ids"], batch["packed_parent_ids"],
                                batch["packed_shared"], 2, True)[:, 0]  # fmt: skip
    assert window[0, 6].tolist() == [False, False, False, False, False, True, True]  # positions 2..3 only


def test_padding_free_trains_and_evaluates(setup):
    trainer = make_trainer(setup, quantized=True, padding_free=True, max_steps=3, per_device_train_batch_size=4)
    trainer.train()
    assert trainer.evaluate(trainer.train_dataset)["eval_loss"] > 0


def test_unpack_shifted_places_each_prediction_in_its_row():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    packed = torch.arange(1.0, 9.0).unsqueeze(0)  # T = 9 tokens -> 8 shifted predictions
    out = unpack_shifted(packed, mask)
    # row 0: tokens 0..2 -> predictions 1,2 (then the boundary prediction 3, zeroed by the fused head in practice)
    assert out.tolist() == [[1, 2, 3], [4, 5, 0], [6, 7, 8]]
    # packed into three rows of 4 (seq1 in row 0, seq0 in row 1, seq2 in row 2): each token's flat packed index
    two_rows = torch.tensor([[10.0, 11, 0, 0], [1, 2, 3, 0], [6, 7, 8, 0]])[:, :3]  # (3 rows, T'=4 -> 3 shifted)
    index = torch.tensor([4, 5, 6, 0, 1, 8, 9, 10, 11])
    assert unpack_shifted(two_rows, mask, index).tolist() == [[1, 2, 3], [10, 11, 0], [6, 7, 8]]


def test_collator_packs_rows_of_the_longest_length_first_fit_decreasing():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    collate = PaddingFreePreferenceCollator(DataCollatorForPreference(pad_token_id=0), rows="longest", pad_token_id=0)
    batch = collate([{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
                     {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]}])  # fmt: skip
    # lengths 5, 3, 4, 4 -> rows of 5: [seq0], [seq2, pad], [seq3, pad], [seq1, pad, pad]
    assert batch["packed_input_ids"].tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0], [7, 8, 9, 0, 0]]
    assert batch["packed_position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 0], [0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    flat = batch["packed_input_ids"].view(-1)
    assert flat[batch["packed_index"]].tolist() == batch["input_ids"][batch["attention_mask"].bool()].tolist()


def test_collator_packs_rows_in_order_with_restarting_positions():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    collate = PaddingFreePreferenceCollator(DataCollatorForPreference(pad_token_id=0))
    batch = collate([{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
                     {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]}])  # fmt: skip
    assert batch["packed_input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 8, 9, 1, 2, 3, 6, 7, 8, 10, 11]]
    assert batch["packed_position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3]]
