"""The two things our trainers change about TRL's, each with a canary that fails the day TRL changes
what we rely on: float32 trainable weights where 4-bit layers compute in float32 (one mechanism for
both stages), and TRL's private `_use_triton` replaced only while our trainer runs."""

from __future__ import annotations

import inspect

import pytest
import torch
import trl.trainer.utils as trl_utils
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, MistralConfig, MistralForCausalLM, TrainerCallback
from trl import DPOConfig, SFTConfig

from mistral_align.chat import get_encoder
from mistral_align.chat.hf_tokenizer import load_hf_tokenizer, save_hf_tokenizer
from mistral_align.chat.schema import parse_preference, parse_sft_messages
from mistral_align.model.bnb_cpu import disable_cpu_inference_repacking
from mistral_align.train.dpo_trainer import PretokenizedDPOTrainer
from mistral_align.train.precision import trainable_snapshot
from mistral_align.train.sft import build_sft_trainer
from mistral_align.train.stage import build_trainer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mechanics")
    enc = get_encoder("v3")
    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(vocab_size=enc.vocab_size, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp / "base")  # fmt: skip
    save_hf_tokenizer("v3", tmp / "tok")

    def qlora():
        model = AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))  # fmt: skip
        disable_cpu_inference_repacking(model)
        model.config.use_cache = False
        torch.manual_seed(1)
        return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))

    sft_rows = [vars(enc.encode_sft(parse_sft_messages([{"role": "user", "content": f"Copy: w{i}"},
                                                         {"role": "assistant", "content": f"w{i}"}]))) for i in range(8)]  # fmt: skip
    sft_rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in sft_rows]
    dpo_rows = [vars(enc.encode_dpo(parse_preference({"prompt": f"Add: {i} + 1", "chosen": str(i + 1), "rejected": str(i)})))
                for i in range(8)]  # fmt: skip
    return tmp, qlora, load_hf_tokenizer(tmp / "tok"), Dataset.from_list(sft_rows), Dataset.from_list(dpo_rows)


def sft_trainer(parts, keep_float32: bool, callbacks=()):
    tmp, qlora, tok, sft_ds, _ = parts
    model = qlora()
    before = trainable_snapshot(model)
    args = SFTConfig(output_dir=str(tmp / "sft_out"), max_steps=2, per_device_train_batch_size=4, report_to=[],
                     use_cpu=True, save_strategy="no", bf16=False, logging_steps=1, max_length=64)  # fmt: skip
    return build_sft_trainer(model, tok, args, sft_ds, callbacks=callbacks, keep_float32=keep_float32), before


def dpo_trainer(parts, keep_float32: bool):
    tmp, qlora, tok, _, dpo_ds = parts
    model = qlora()
    before = trainable_snapshot(model)
    args = DPOConfig(output_dir=str(tmp / "dpo_out"), max_steps=2, per_device_train_batch_size=4, report_to=[],
                     use_cpu=True, save_strategy="no", bf16=False, max_length=64)  # fmt: skip
    return build_trainer(PretokenizedDPOTrainer, model, tok, args, dpo_ds, keep_float32=keep_float32), before


def trainable(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow
@pytest.mark.parametrize("make", [sft_trainer, dpo_trainer], ids=["sft", "dpo"])
def test_keep_float32_restores_the_exact_adapter_in_both_stages(parts, make):
    # Canary: TRL still casts a quantised model's adapter to bf16 (if this fails, the mechanism may go).
    cast, _ = make(parts, keep_float32=False)
    assert {p.dtype for p in trainable(cast).values()} == {torch.bfloat16}
    kept, before = make(parts, keep_float32=True)
    after = trainable(kept)
    assert after.keys() == before.keys() and len(after) > 0
    for name, param in after.items():
        assert param.dtype == torch.float32
        assert torch.equal(param.detach(), before[name]), name  # exact values, not bf16-rounded ones


def test_trl_still_consults_the_function_we_replace():
    """Canary: fails the day TRL renames `_use_triton` or stops deciding the fused head's positions with it."""
    assert callable(trl_utils._use_triton) and trl_utils._use_triton(CPU) is False
    assert "_use_triton(hidden_states.device)" in inspect.getsource(trl_utils.add_fused_lm_head)


class RecordUseTriton(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(trl_utils._use_triton(CPU))


@pytest.mark.slow
def test_the_patch_holds_only_while_our_trainer_runs(parts):
    record = RecordUseTriton()
    trainer, _ = sft_trainer(parts, keep_float32=True, callbacks=[record])
    assert trl_utils._use_triton(CPU) is False  # building our trainer changed nothing
    result = trainer.train()
    assert record.seen == [True, True]  # while it trained, the CPU scored labelled positions only
    assert trl_utils._use_triton(CPU) is False  # and TRL is as it was afterwards
    assert result.global_step == 2
    trainer.evaluate(parts[3])
    assert trl_utils._use_triton(CPU) is False


def test_the_trainer_internals_our_hooks_rely_on_are_still_there():
    """Canaries for train/hooks.py's table: each fails the day transformers or TRL moves what a hook needs."""
    from transformers import Trainer
    from trl import DPOTrainer, SFTTrainer

    # DPO (private): TRL still prepares, that is tokenises, every data set in its constructor through
    # _prepare_dataset(dataset, processing_class, args, dataset_name), which ours replaces.
    assert list(inspect.signature(DPOTrainer._prepare_dataset).parameters) == [
        "self", "dataset", "processing_class", "args", "dataset_name"]  # fmt: skip
    assert "self._prepare_dataset(" in inspect.getsource(DPOTrainer.__init__)
    assert "_tokenize(" in inspect.getsource(DPOTrainer._prepare_dataset)
    # eval_on_start: the held-out metrics before training are measured after the model is prepared
    # (wrapped for DDP), not before it.
    loop = inspect.getsource(Trainer._inner_training_loop)
    assert loop.index("self._prepare_for_training(") < loop.index("if args.eval_on_start:")
    # on_save runs once the checkpoint's files are written.
    save = inspect.getsource(Trainer._maybe_log_save_evaluate)
    assert save.index("self._save_checkpoint(") < save.index("self.callback_handler.on_save(")
    # TRL writes its model card into each checkpoint through the public create_model_card.
    for trainer in (SFTTrainer, DPOTrainer):
        assert "self.create_model_card(" in inspect.getsource(trainer._save_checkpoint)


@pytest.mark.slow
def test_checkpoints_are_renamed_into_place_complete_and_hold_no_model_card(parts):
    from mistral_align.rundir.checkpoints import checkpoint_problem, newest_complete
    from mistral_align.train.checkpointing import checkpoint_dirs

    tmp, qlora, tok, sft_ds, _ = parts
    aside, final = checkpoint_dirs(tmp / "ckpt" / "checkpoints")
    args = SFTConfig(output_dir=str(aside), max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                     save_strategy="steps", save_steps=1, save_total_limit=1, bf16=False, max_length=64)  # fmt: skip
    build_sft_trainer(qlora(), tok, args, sft_ds).train()
    newest = newest_complete(final)
    assert newest is not None and newest.name == "checkpoint-2" and checkpoint_problem(newest) is None
    assert sorted(p.name for p in final.glob("checkpoint-*")) == ["checkpoint-2"]  # save_total_limit=1
    assert not any(aside.iterdir())  # nothing left aside: TRL's card (README.md there) is not written either
    assert not (final / "README.md").exists()  # (peft's adapter card inside checkpoint-2 is another file)
