"""The pieces of the real-size GPU benchmark (scripts/bench_7b.py, scripts/measure_mixtral_memory.py,
scripts/bench_common.py) that run on the CPU: the FLOPs arithmetic behind the MFU figures, the
token counts of real TRL batches, the time box that stops training and counts only its timed
steps, the random-weights checkpoint that loads through transformers' own NF4 path, and both
scripts end to end on tiny shapes (the dry run of what scripts/gpu_check.sh runs on the GPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_common as bc  # noqa: E402

# -- FLOPs -------------------------------------------------------------------------------------------------


def test_flop_terms_of_the_7b_shape_by_hand_and_against_the_estimates_layer_list():
    from mistral_align.model.estimate import Shape, linear_layers

    shape, version = bc.bench_shape("7b", "mistral-7b-v0.3")
    assert version == "v3" and (shape.hidden_size, shape.num_hidden_layers, shape.vocab_size) == (4096, 32, 32768)
    terms = bc.flop_terms(shape)
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336  # q, o; k, v (8 KV heads x 128); gate, up, down
    assert terms == {"n_body": 32 * per_layer, "n_head": 32768 * 4096, "layers": 32, "d_attn": 4096}
    assert terms["n_body"] == 6_979_321_856  # 7.25 B parameters less 2 x 134 M of embeddings and head
    s = Shape(**{k: getattr(shape, k) for k in ("type", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")})  # fmt: skip
    assert terms["n_body"] == sum(i * o for name, _, i, o in linear_layers(s) if name != "lm_head")


def test_flop_terms_of_mixtral_count_the_routed_experts_and_the_router():
    from mistral_align.model.estimate import Shape, linear_layers

    shape, _ = bc.bench_shape("8x7b", "mixtral-8x7b-v0.1")
    terms = bc.flop_terms(shape)
    s = Shape(type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
              num_key_value_heads=8, head_dim=128, vocab_size=32000, num_local_experts=8)  # fmt: skip
    layers = linear_layers(s)
    experts = sum(i * o for _, kind, i, o in layers if kind == "experts")
    attention = sum(i * o for _, kind, i, o in layers if kind == "attention")
    assert terms["n_body"] == attention + experts * 2 // 8 + 32 * 8 * 4096  # 2 of 8 experts per token, the router


def test_model_flops_and_mfu_arithmetic():
    terms = {"n_body": 10, "n_head": 3, "layers": 2, "d_attn": 4}
    # 5 tokens in sequences of 2 and 3 (4 + 9 = 13), 2 of them scored
    assert bc.model_flops(terms, tokens=5, scored=2, sum_sq=13) == 6 * (10 * 5 + 3 * 2 + 2 * 4 * 13)
    assert bc.model_flops(terms, 5, 2, 13, reference_forward=True) == 8 * (50 + 6 + 104)
    assert bc.mfu(3e12, 2.0, peak_tflops=1.5) == pytest.approx(1.0)
    assert bc.mfu(3e12, 2.0, None) is None and bc.mfu(3e12, 0.0, 1.0) is None


# -- token counts of real collated batches -----------------------------------------------------------------


def test_sft_counts_of_trl_padding_free_and_padded_batches():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = [{"input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7]}, {"input_ids": [1, 8, 9], "labels": [-100, 8, 9]}]
    free = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(rows)
    assert free["input_ids"].shape == (1, 7) and padded["input_ids"].shape == (2, 4)
    # 7 real tokens in sequences of 4 and 3; the 4 labelled ones are scored.
    expected = {"tokens": 7, "scored": 4, "sum_sq": 16 + 9, "sequences": 2}
    assert bc.sft_batch_counts(free) == expected
    assert bc.sft_batch_counts(padded) == expected
    del free["cu_seq_lens_q"]  # the same from the restarting position ids alone
    assert bc.sequence_lengths(free) == [4, 3]


def test_dpo_counts_of_trl_and_our_packed_preference_batches():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from mistral_align.train.dpo_padding_free import PaddingFreePreferenceCollator

    rows = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
            {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11, 12]}]  # fmt: skip
    padded = DataCollatorForPreference(pad_token_id=0)
    expected = {"tokens": 5 + 3 + 4 + 5, "scored": 2 + 1 + 1 + 3, "sum_sq": 25 + 9 + 16 + 25, "sequences": 4, "pairs": 2}
    assert bc.dpo_batch_counts(padded(rows)) == expected
    assert bc.dpo_batch_counts(PaddingFreePreferenceCollator(padded, rows="one")(rows)) == expected


# -- the time box ------------------------------------------------------------------------------------------


class Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 1)

    def forward(self, x, y):
        return {"loss": torch.nn.functional.mse_loss(self.w(x).squeeze(-1), y)}


def tiny_trainer(tmp_path, epochs: int, box):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    data = Dataset.from_list([{"x": [float(i), 1.0], "y": float(2 * i)} for i in range(40)])
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, num_train_epochs=epochs,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)  # fmt: skip
    trainer = Trainer(model=Regression(), args=args, train_dataset=data, callbacks=[box])
    counter = bc.StepCounter(trainer, box, lambda batch: {"rows": len(batch["y"]), "steps": 1})
    return trainer, counter


class Clock:
    """A clock that moves one second each time it is read."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 1.0
        return self.t


@pytest.mark.slow  # a real Trainer loop on a 3-parameter model: a second or two
def test_the_time_box_stops_training_and_counts_only_its_timed_steps(tmp_path):
    # Read at train begin (1), at the first timed step's start (2), at each timed step's end (3, 4, ...)
    # and once more when it stops: 5 s are reached at the end of the 5th timed step (clock 7 - 2), and
    # the stop reads 8: 6 s timed.
    box = bc.TimeBox(seconds=5, warmup=3, sync=lambda: None, clock=Clock())
    trainer, counter = tiny_trainer(tmp_path, epochs=100, box=box)
    trainer.train()
    assert (box.steps, box.ran_out, box.elapsed, box.warmup_seconds) == (5, False, 6.0, 1.0)
    assert trainer.state.global_step == 3 + 5  # stopped after its timed steps, long before 100 epochs
    assert counter.totals == {"rows": 2 * 5, "steps": 5}  # the warm-up's batches are not counted
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == list(range(1, 9))  # a loss per step
    assert bc.epoch_counts(trainer, lambda batch: {"rows": len(batch["y"])}) == {"rows": 40}


@pytest.mark.slow
def test_the_time_box_says_when_the_data_ran_out_first(tmp_path):
    box = bc.TimeBox(seconds=10_000, warmup=2, sync=lambda: None, clock=Clock())
    trainer, counter = tiny_trainer(tmp_path, epochs=1, box=box)
    trainer.train()
    assert box.ran_out and box.steps == 20 - 2 and counter.totals["steps"] == 18 and not box.timing


# -- random weights through transformers' own loading and NF4 quantisation ------------------------------------


def test_a_random_mixtral_checkpoint_loads_in_nf4_as_a_hub_one_and_its_bytes_are_the_estimates():
    import bitsandbytes as bnb

    from mistral_align.model.estimate import model_shape, weight_bytes
    from mistral_align.model.facts import parameter_bytes
    from mistral_align.model.load import model_class
    from mistral_align.model.quantize import quantization_config
    from mistral_align.schema.model import QuantConfig

    shape, _ = bc.bench_shape("tiny-mixtral", "mixtral-8x7b-v0.1")
    config = bc.transformers_config(shape)
    checkpoint = bc.random_checkpoint(config, torch.float32, "cpu")
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in checkpoint  # the Hub's names
    a, b = checkpoint["model.layers.0.self_attn.q_proj.weight"], checkpoint["model.layers.0.self_attn.k_proj.weight"]
    assert torch.equal(a[...], a[...]) and not torch.equal(a[...][:64], b[...][:64])  # seeded by name
    quant = QuantConfig(mode="nf4", compute_dtype="float32")
    model = model_class(config).from_pretrained(None, config=config, state_dict=checkpoint, dtype=torch.float32,
                                                quantization_config=quantization_config(quant), device_map={"": "cpu"})  # fmt: skip
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and m.weight.quant_state is not None]
    assert len(four_bit) == 2 * (4 + 4 * 3)  # every attention and expert linear quantised as it loaded
    from omegaconf import OmegaConf

    node = OmegaConf.create({"name": "x", "tokenizer_version": "v1", "shape": vars(shape)})
    assert parameter_bytes(model)["total"] == weight_bytes(model_shape(node), OmegaConf.structured(quant), "float32",
                                                           kbit_prepared=False)["total"]  # fmt: skip


def test_a_random_base_folder_loads_through_build_model_like_a_hub_model(tmp_path):
    from mistral_align.model.load import build_model
    from mistral_align.schema.model import ModelConfig, QuantConfig

    shape, version = bc.bench_shape("tiny", "mistral-7b-v0.3")
    folder = bc.write_random_base(bc.transformers_config(shape), tmp_path / "base", torch.float32, "cpu", shard_bytes=2**20)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded like a Hub repository
    model = build_model(ModelConfig(name="x", hub_id=str(folder), tokenizer_version=version, dtype="float32"),
                        QuantConfig(mode="nf4", compute_dtype="float32"), vocab_size=shape.vocab_size)  # fmt: skip
    from mistral_align.model.facts import count_linear_layers

    assert count_linear_layers(model)["linear_4bit"] == 2 * 7
    loss = model(input_ids=torch.tensor([[1, 5, 9, 2]]), labels=torch.tensor([[1, 5, 9, 2]])).loss
    assert abs(loss.item() - torch.log(torch.tensor(32768.0)).item()) < 0.5  # random init: about ln(vocab)


# -- the scripts end to end, tiny (the CPU path of scripts/gpu_check.sh) -----------------------------------------


@pytest.mark.slow
def test_bench_7b_dry_run_reports_every_pair_with_equal_tokens_and_losses(tmp_path, monkeypatch):
    import bench_7b

    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench_7b.py", "--shape", "tiny", "--pairs", "sft:128,dpo:128", "--rounds", "2",
                                      "--seconds", "0.25", "--warmup", "1", "--sft-rows", "40", "--dpo-pairs", "16",
                                      "--json", str(out)])  # fmt: skip
    bench_7b.main()
    report = json.loads(out.read_text())
    assert report["base"]["weights_tensor_bytes_after_load"] == report["base"]["weights_estimate_bytes_as_loaded"]
    for spec, names in (("sft:128", ["ours", "trl-packed"]), ("dpo:128", ["ours-pf", "trl"])):
        s = report["pairs"][spec]["summary"]
        assert list(s["contenders"]) == names and all(c["rounds"] == 2 for c in s["contenders"].values())
        assert s["equal_trained_tokens"]["equal"], s["equal_trained_tokens"]
        assert s["losses"]["agree"], s["losses"]
        for c in s["contenders"].values():
            assert c["timed_steps"] >= 1 and c["mfu_vs_measured_matmul"] > 0 and len(c["ratio_per_round"]) == 2


@pytest.mark.slow
def test_mixtral_memory_dry_run_matches_the_estimate(tmp_path, monkeypatch):
    import measure_mixtral_memory

    out = tmp_path / "mixtral.json"
    monkeypatch.setattr(sys, "argv", ["measure_mixtral_memory.py", "--shape", "tiny-mixtral", "--length", "64",
                                      "--json", str(out)])  # fmt: skip
    measure_mixtral_memory.main()
    res = json.loads(out.read_text())
    assert res["command"].startswith("mistral-align estimate model=mixtral-8x7b-v0.1 quant=nf4")
    assert res["weights_within_goal"] and res["ratios"]["tensors_after_load / weights_as_loaded"] == 1.0
    assert res["qlora_step"]["loss"] > 0
