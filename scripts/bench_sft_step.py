"""SFT training speed against a plain TRL baseline, side by side in one process.

    .venv/bin/python scripts/bench_sft_step.py [--steps 40] [--layers 4] [--hidden 256]

Both runs train the same tiny QLoRA Mistral (NF4 layers, LoRA r=64 on every linear layer, the
same seed) on the same pre-tokenised rows (exact mistral-common ids, packed with TRL's bfd):

    baseline       trl.SFTTrainer as TRL ships it (adapter cast to bf16 for a quantised model,
                   the fused LM head scoring every position on the CPU)
    mistral-align  train.sft.build_sft_trainer: float32 adapter where the 4-bit layers compute in
                   float32, and the LM head scoring only trained positions

It prints seconds per step (median after warm-up) for each and the ratio baseline / ours. Both
gains are CPU-only: on a CUDA GPU TRL already scores only trained positions, and bf16 adapters are
what a GPU wants. scripts/bench_sft.py compares whole runs against what users would run instead.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

from mistral_align.chat import get_encoder
from mistral_align.chat.hf_tokenizer import load_hf_tokenizer, save_hf_tokenizer
from mistral_align.chat.schema import parse_sft_messages
from mistral_align.data.synthetic import SKILLS, generate_items, sft_row
from mistral_align.model.load import build_model
from mistral_align.model.lora import apply_peft
from mistral_align.schema.model import ArchitectureConfig, ModelConfig, PeftConfig, QuantConfig
from mistral_align.schema.train import TrainConfig
from mistral_align.train.args import training_arguments
from mistral_align.train.sft import build_sft_trainer


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []
        self._t = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t)


def make_model(layers: int, hidden: int, vocab: int):
    arch = ArchitectureConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=8, num_key_value_heads=4)  # fmt: skip
    model_cfg = ModelConfig(name="bench", architecture=arch, tokenizer_version="v3", dtype="float32")
    quant = QuantConfig(mode="nf4", compute_dtype="float32")
    model = build_model(model_cfg, quant, vocab_size=vocab, seed=0)
    peft = PeftConfig(r=64, alpha=128, dropout=0.0)
    return apply_peft(model, peft, quantized=True, gradient_checkpointing=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    enc = get_encoder("v3")
    # the four short text skills, the rows this benchmark has always timed (tool_call rows are ~20x longer)
    items = generate_items([k for k in SKILLS if k != "tool_call"], 4000, seed=0)
    rows = [vars(enc.encode_sft(parse_sft_messages(sft_row(i)["messages"]))) for i in items]
    data = Dataset.from_list(rows)
    tmp = Path(tempfile.mkdtemp(prefix="bench_sft_"))
    tokenizer = load_hf_tokenizer(save_hf_tokenizer("v3", tmp / "tokenizer"))
    train = TrainConfig(max_steps=args.warmup + args.steps, lr=1e-3, per_device_batch_size=args.batch, grad_accum=1,
                        logging_steps=1000, save_steps=100000, gradient_checkpointing=False)  # fmt: skip

    def sft_args(name: str) -> SFTConfig:
        kw = training_arguments(train, 0, tmp / name, ["none"], has_eval=False)
        kw.update(save_strategy="no", disable_tqdm=True)
        return SFTConfig(max_length=args.max_length, packing=True, packing_strategy="bfd", **kw)

    results = {}
    timer = StepTimer()
    trainer = SFTTrainer(model=make_model(args.layers, args.hidden, enc.vocab_size), args=sft_args("baseline"),
                         train_dataset=data, processing_class=tokenizer, callbacks=[timer])  # fmt: skip
    out = trainer.train()
    results["baseline (plain TRL)"] = (statistics.median(timer.times[args.warmup:]), out.training_loss)

    timer = StepTimer()
    trainer = build_sft_trainer(make_model(args.layers, args.hidden, enc.vocab_size), tokenizer, sft_args("ours"), data,
                                callbacks=[timer], keep_float32=True)  # fmt: skip
    out = trainer.train()
    results["mistral-align"] = (statistics.median(timer.times[args.warmup:]), out.training_loss)

    print(f"\n{args.steps} timed steps after {args.warmup} warm-up; batch {args.batch} packed rows of {args.max_length} "
          f"tokens; tiny Mistral {args.layers}x{args.hidden}, NF4 + LoRA r=64, CPU")  # fmt: skip
    for name, (sec, loss) in results.items():
        print(f"  {name:<22} {sec * 1000:8.1f} ms/step   (train loss over the run {loss:.3f})")
    base, ours = results["baseline (plain TRL)"][0], results["mistral-align"][0]
    print(f"  speed-up (baseline / mistral-align): {base / ours:.2f}x")


if __name__ == "__main__":
    main()
