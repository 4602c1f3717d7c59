"""KTO, SimPO and ORPO (dpo.objective) on our exact ids: each one's loss equals TRL's own trainer
for it fed the same tokens; padding-free batches equal padded ones (loss, metrics, gradients;
float32 and NF4); a stopped and resumed KTO stage equals one that ran through; and the canaries of
the TRL internals these trainers rely on (train/hooks.py)."""

from __future__ import annotations

import inspect
import json
import random
import signal
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from runfixtures import adapter_max_diff, random_pairs, save_tiny_mistral
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback
from trl import KTOConfig, KTOTrainer

from mistral_align.chat import get_encoder
from mistral_align.chat.hf_tokenizer import load_hf_tokenizer, save_hf_tokenizer
from mistral_align.model.bnb_cpu import disable_cpu_inference_repacking
from mistral_align.train.kto_trainer import PretokenizedKTOTrainer
from mistral_align.train.reference_free import (
    CPOConfig,
    ORPOConfig,
    PretokenizedORPOTrainer,
    PretokenizedSimPOTrainer,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2 x 64 Mistral, the v3 tokenizer, 8 pairs of very different lengths, and the same pairs
    as 16 KTO rows in a fixed random order."""
    tmp = tmp_path_factory.mktemp("objectives")
    enc = get_encoder("v3")
    save_tiny_mistral(tmp / "base", enc.vocab_size, max_position_embeddings=256)
    save_hf_tokenizer("v3", tmp / "tok")
    rng = random.Random(0)
    pairs = random_pairs(enc, rng, 8, prompt=(3, 8, 30), chosen=(1, 5, 40), rejected=(2, 9, 20))
    kto = [{"prompt_ids": p["prompt_ids"], "completion_ids": p[key], "label": key == "chosen_ids"}
           for p in pairs for key in ("chosen_ids", "rejected_ids")]  # fmt: skip
    random.Random(1).shuffle(kto)
    return tmp, Dataset.from_list(pairs), Dataset.from_list(kto)


def policy(tmp: Path, quantized: bool = False):
    """The tiny base with a LoRA adapter far from zero (the same one every call)."""
    kw = {}
    if quantized:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32, **kw)
    if quantized:
        disable_cpu_inference_repacking(model)
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))


def config(objective: str, tmp: Path, **overrides):
    args = dict(output_dir=str(tmp / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=3,
                learning_rate=2e-3, report_to=[], max_length=256, save_strategy="no", logging_steps=1, use_cpu=True,
                gradient_checkpointing=False, bf16=False, seed=0, disable_tqdm=True)  # fmt: skip
    args.update(overrides)
    if objective == "kto":
        return KTOConfig(beta=0.1, **args)
    if objective == "simpo":
        return CPOConfig(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.5, **args)
    return ORPOConfig(beta=0.1, **args)


OURS = {"kto": PretokenizedKTOTrainer, "simpo": PretokenizedSimPOTrainer, "orpo": PretokenizedORPOTrainer}


def ours(tiny, objective, quantized=False, padding_free=False, shared_prompt=False, **overrides):
    tmp, pairs, kto = tiny
    options = {"padding_free": padding_free}
    if objective != "kto":
        options["shared_prompt"] = shared_prompt
    if objective == "orpo":
        options["prompt_loss"] = overrides.pop("prompt_loss", False)
    return OURS[objective](model=policy(tmp, quantized), args=config(objective, tmp, **overrides),
                           train_dataset=kto if objective == "kto" else pairs, processing_class=load_hf_tokenizer(tmp / "tok"),
                           keep_float32=quantized, **options)  # fmt: skip


# -- TRL's own trainers on the same tokens -------------------------------------------------------------


def trl_tokens(objective: str, pairs: Dataset, kto: Dataset, batch_size: int) -> Dataset:
    """Our ids in the columns TRL's own data preparation gives its trainer: KTO's prompt_ids,
    completion_ids, label and KL_completion_ids (the previous row's reply within each batch, the first
    row taking the last's: kto_trainer._prepare_dataset); CPO's and ORPO's tokenize_row columns."""
    if objective == "kto":
        rows = kto.to_list()
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            for i, row in enumerate(chunk):
                row["KL_completion_ids"] = chunk[i - 1]["completion_ids"]
        return Dataset.from_list(rows)
    out = []
    for p, c, r in zip(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"]):
        row = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
        for name, reply in (("chosen", c), ("rejected", r)):
            row.update({f"{name}_input_ids": p + reply, f"{name}_attention_mask": [1] * (len(p) + len(reply)),
                        f"{name}_labels": [-100] * len(p) + reply})  # fmt: skip
        out.append(row)
    return Dataset.from_list(out)


def trls(tiny, objective, **overrides):
    """TRL's own trainer for the objective, built on placeholder text (its constructor tokenises
    text), then given our tokens as its training data, in the columns its preparation would give."""
    tmp, pairs, kto = tiny
    args = config(objective, tmp, **overrides)
    n = len(kto if objective == "kto" else pairs)
    if objective == "kto":
        text = Dataset.from_dict({"prompt": ["a"] * n, "completion": [" b"] * n, "label": kto["label"]})
        trainer = KTOTrainer(model=policy(tmp), args=args, train_dataset=text, processing_class=load_hf_tokenizer(tmp / "tok"))
    else:
        text = Dataset.from_dict({"prompt": ["a"] * n, "chosen": ["b"] * n, "rejected": ["c"] * n})
        cls = CPOTrainer if objective == "simpo" else ORPOTrainer
        trainer = cls(model=policy(tmp), args=args, train_dataset=text, processing_class=load_hf_tokenizer(tmp / "tok"))
    trainer.train_dataset = trl_tokens(objective, pairs, kto, args.per_device_train_batch_size)
    return trainer


def step_logs(trainer) -> list[dict]:
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["kto", "simpo", "orpo"])
def test_each_objective_equals_trls_own_trainer_on_the_same_tokens(tiny, objective):
    extra = {"prompt_loss": True} if objective == "orpo" else {}  # TRL's ORPO: the NLL covers the prompt
    mine, theirs = step_logs(ours(tiny, objective, **extra)), step_logs(trls(tiny, objective))
    assert len(mine) == len(theirs) == 3
    # The logits/* metrics of SimPO and ORPO are defined apart (reference_free.py); the rest is TRL's.
    # (A KTO batch of one kind of reply logs that kind's metrics only.)
    skip = ("learning_rate", "epoch", "grad_norm", "nonfinite_skipped")
    for step, (a, b) in enumerate(zip(mine, theirs), start=1):
        keys = [k for k in b if k not in skip and not (objective != "kto" and k.startswith("logits/"))]
        assert "loss" in keys and any(k.startswith("rewards/") for k in keys), keys
        assert set(keys) <= set(a), (step, set(keys) - set(a))
        for key in keys:
            assert a[key] == pytest.approx(b[key], abs=1e-5, rel=1e-5), (step, key, a[key], b[key])
    assert theirs[0]["loss"] != theirs[-1]["loss"]  # it trained: the steps differ
    print(f"\n{objective}: steps 1-3 loss ours {[round(h['loss'], 6) for h in mine]} TRL {[round(h['loss'], 6) for h in theirs]}")


@pytest.mark.slow
def test_orpo_nll_covers_the_chosen_reply_only_by_default(tiny):
    """The default ORPO loss: TRL's own forward and odds-ratio loss, with the NLL over the chosen reply's
    tokens instead of the whole chosen sequence."""
    tmp, pairs, _ = tiny
    theirs = trls(tiny, "orpo")
    mine = ours(tiny, "orpo")
    batch = theirs.data_collator([theirs.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        logits = theirs.model(batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"]).logits
        sums = theirs.get_batch_logps(logits, batch["chosen_labels"], average_log_prob=False)
        chosen, rejected, _, _, prompt_nll = theirs.concatenated_forward(theirs.model, batch)
        odds, *_ = theirs.odds_ratio_loss(chosen, rejected)
        reply_tokens = (batch["chosen_labels"][:, 1:] != -100).sum()
        expected = -sums.sum() / reply_tokens - odds.mean()
        got = mine.compute_loss(mine.model, mine.data_collator([pairs[i] for i in range(4)]))
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)
    assert abs(got.item() - (prompt_nll - odds.mean()).item()) > 1e-2  # the prompt's NLL really is left out


# -- padding-free ------------------------------------------------------------------------------------


def loss_metrics_grads(trainer):
    data = trainer.train_dataset
    inputs = trainer._prepare_inputs(trainer.data_collator([data[i] for i in range(len(data))]))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    stored = trainer._metrics["train"] if hasattr(trainer, "_metrics") else trainer._stored_metrics["train"]
    return loss.item(), {k: v[-1] for k, v in stored.items()}, grads


def move_policy_from_reference(trainer) -> None:
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in sorted(trainer.model.named_parameters()):
            if ".default." in name:
                param.add_(0.2 * torch.randn(param.shape, generator=gen, dtype=param.dtype).to(param.device))


# NF4 for KTO and ORPO: SimPO's trainer shares ORPO's forward and packing (train/reference_free.py).
CASES = [("kto", False), ("kto", True), ("simpo", False), ("orpo", False), ("orpo", True),
         ("orpo-prompt-loss-shared-prompt", False)]


@pytest.mark.slow
@pytest.mark.parametrize("objective, quantized", CASES, ids=[f"{o}-{'nf4' if q else 'float32'}" for o, q in CASES])
def test_padding_free_equals_padded(tiny, objective, quantized):
    name, shared = objective.split("-")[0], objective.endswith("shared-prompt")
    extra = {"prompt_loss": True} if "prompt-loss" in objective else {}
    # KTO: its KL completions rotate within batches of 8 rows; its rows and KL rows are packed apart.
    size = {"per_device_train_batch_size": 8} if name == "kto" else {}
    padded = ours(tiny, name, quantized, padding_free=False, **size, **dict(extra))
    packed = ours(tiny, name, quantized, padding_free=True, shared_prompt=shared, **size, **dict(extra))
    seen = []
    handle = packed.model.base_model.model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["input_ids"].shape), with_kwargs=True)
    if name == "kto":  # the policy really differs from the reference
        move_policy_from_reference(padded), move_policy_from_reference(packed)
    loss_a, metrics_a, grads_a = loss_metrics_grads(padded)
    loss_b, metrics_b, grads_b = loss_metrics_grads(packed)
    handle.remove()
    assert loss_b == pytest.approx(loss_a, abs=1e-5)
    assert metrics_a.keys() == metrics_b.keys() and metrics_a
    for key in metrics_a:
        assert metrics_b[key] == pytest.approx(metrics_a[key], abs=1e-5, rel=1e-5), key
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], atol=1e-5, rtol=1e-4), n
    rows = len(padded.train_dataset) * (1 if name == "kto" else 2)  # the padded batch's sequences per forward
    assert seen and all(shape[0] < rows for shape in seen), seen  # every forward ran packed
    if name == "kto":
        assert metrics_a["kl"] > 0 and len(seen) == 4  # KL and rows, policy and reference: four packed forwards


# -- resume --------------------------------------------------------------------------------------------


class StopAt(TrainerCallback):
    """Sends this process SIGTERM at the end of step `at`: the stage's StopOnSignal (run after this
    callback) then saves a checkpoint there and stops, at exactly that step every time."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            signal.raise_signal(signal.SIGTERM)


def run_dpo_recipe(run_dir: Path, *overrides: str, stop_at: int | None = None, monkeypatch=None) -> int:
    """recipes/dpo.py in this process on experiment=test_tiny; its exit code. `stop_at`: SIGTERM at the
    end of that step (StopAt)."""
    import importlib.util

    from hydra import compose, initialize_config_dir

    from mistral_align.train.dpo import DPOStage

    spec = importlib.util.spec_from_file_location("dpo_recipe", ROOT / "recipes" / "dpo.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)  # registers the typed schema, as launching it does
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("dpo", overrides=["experiment=test_tiny", f"run.dir={run_dir}", *overrides])
    with monkeypatch.context() as m:
        if stop_at is not None:
            build = DPOStage.build_trainer

            def build_and_stop(self, *args, **kwargs):
                trainer = build(self, *args, **kwargs)
                trainer.add_callback(StopAt(stop_at))  # before run_stage adds its StopOnSignal
                return trainer

            m.setattr(DPOStage, "build_trainer", build_and_stop)
        try:
            recipe.main(cfg)
        except SystemExit as e:
            return e.code
    return 0


@pytest.mark.slow
def test_kto_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    """KTO reads its rows in order and keeps its reference as a second adapter: a stage stopped at step 2
    and run again continues at step 3 on the rows it would have read, to the same adapter."""
    steps = ("dpo.objective=kto", "dpo.padding_free=true", "dpo.train.max_steps=4", "dpo.train.save_steps=1",
             "dpo.train.gradient_checkpointing=false", "dpo.eval.loss_before=false")  # fmt: skip
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert run_dpo_recipe(ref, *steps, monkeypatch=monkeypatch) == 0
    assert run_dpo_recipe(cut, *steps, stop_at=2, monkeypatch=monkeypatch) == 3  # stopped cleanly
    assert not (cut / "summary.json").exists() and (cut / "checkpoints" / "checkpoint-2").is_dir()
    assert run_dpo_recipe(cut, *steps, monkeypatch=monkeypatch) == 0
    diff = adapter_max_diff(ref / "adapter", cut / "adapter")
    loss_ref, loss_cut = (json.loads((d / "summary.json").read_text())["dpo"]["train_loss"] for d in (ref, cut))
    print(f"\nKTO resumed: max |adapter diff| = {diff:.3g}, train loss {loss_ref!r} vs {loss_cut!r}")
    assert diff <= 1e-5 and abs(loss_ref - loss_cut) <= 1e-5
    manifest = json.loads((cut / "manifest.json").read_text())
    assert manifest["trainer"]["objective"] == "kto" and manifest["reference"] == "base model"
    assert (cut / "adapter" / "adapter_config.json").is_file()
    assert "ref" not in json.dumps(json.loads((cut / "adapter" / "adapter_config.json").read_text()))


# -- two processes -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ranks
def test_simpo_two_processes_train_the_one_process_adapter(tmp_path, monkeypatch):
    """A reference-free objective, padding-free, under `accelerate launch` with two CPU processes (gloo
    DDP), 1 pair each: the adapter one process trains with 2 pairs a step (SimPO's loss is a mean
    over pairs, so the averaged gradients are the same)."""
    import os
    import subprocess
    import sys

    steps = ("dpo.objective=simpo", "dpo.padding_free=true", "dpo.train.max_steps=3", "dpo.eval.loss_before=false",
             "dpo.train.gradient_checkpointing=false")  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_dpo_recipe(one, *steps, "dpo.train.per_device_batch_size=2", monkeypatch=monkeypatch) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    env.pop("MISTRAL_ALIGN_RUN_DIR", None)
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(ROOT / "configs/accelerate/cpu_ddp.yaml"), str(ROOT / "recipes/dpo.py"), "experiment=test_tiny",
           f"run.dir={two}", *steps, "dpo.train.per_device_batch_size=1"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["trainer"]["objective"] == "simpo"
    assert manifest["trainer"]["global_batch_rows"] == 2 and manifest["trainer"]["padding_free"]
    diff = adapter_max_diff(one / "adapter", two / "adapter")
    print(f"\nSimPO DDP: 2 processes vs 1, same global batch: max |adapter diff| = {diff:.3g}")
    assert diff <= 1e-5
    assert json.loads((two / "summary.json").read_text())["dpo"]["steps"] == 3


# -- canaries ------------------------------------------------------------------------------------------


def test_the_trl_internals_the_objectives_rely_on_are_still_there():
    """Canaries for train/hooks.py's KTO, SimPO and ORPO rows."""
    from trl.trainer.utils import add_fused_lm_head

    # KTO (private): TRL still prepares, that is tokenises, every data set in its constructor through
    # _prepare_dataset(dataset, processing_class, args, dataset_name), which ours replaces; and it builds
    # the KL completions there, by rotating the replies within each batch, which ours repeats.
    assert list(inspect.signature(KTOTrainer._prepare_dataset).parameters) == [
        "self", "dataset", "processing_class", "args", "dataset_name"]  # fmt: skip
    assert "self._prepare_dataset(" in inspect.getsource(KTOTrainer.__init__)
    prep = inspect.getsource(KTOTrainer._prepare_dataset)
    assert '[examples["completion_ids"][-1]] + examples["completion_ids"][:-1]' in prep
    assert "batch_size=args.per_device_train_batch_size" in prep
    # SimPO, ORPO: the constructor maps tokenize_row over the data; the loss takes concatenated_forward's
    # five values; the fused head is a public function that takes the outputs we ask for.
    for trainer in (CPOTrainer, ORPOTrainer):
        assert "self.tokenize_row" in inspect.getsource(trainer.__init__)
        assert "self.concatenated_forward(model, batch)" in inspect.getsource(trainer.get_batch_loss_metrics)
        assert "self.use_dpo_data_collator" in inspect.getsource(trainer.__init__)
    assert "outputs" in inspect.signature(add_fused_lm_head).parameters
    # TRL writes its model card into each checkpoint through the public create_model_card (ours: nothing).
    for trainer in (KTOTrainer, CPOTrainer, ORPOTrainer):
        assert "self.create_model_card(" in inspect.getsource(trainer._save_checkpoint)
