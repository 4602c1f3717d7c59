"""The SFT stage on TRL's SFTTrainer, fed our pre-tokenised `input_ids` + `labels`.

What TRL 1.16 does with such a dataset (read in trl/trainer/sft_trainer.py):

- `input_ids` present => no tokenisation, no chat template; `labels` present => kept as they are
  (no completion/assistant mask is rebuilt). Unpacked rows are cut to max_length (our loader has
  already dealt with long rows).
- `packing=True, packing_strategy="bfd"` => rows are bin-packed into max_length sequences and the
  trainer runs *padding-free*: the collator concatenates a batch into one row, sends
  `position_ids` that restart at 0 for every conversation and no `attention_mask`. transformers'
  `create_causal_mask` (masking_utils, used by Mistral/Mixtral for sdpa, eager and flex) detects
  the restarts and builds a block-diagonal causal mask, so no token attends across a boundary;
  flash-attention gets `cu_seq_lens`. The collator also sets the label at each conversation start
  to -100, which is BOS for us (never trained anyway). tests/test_sft_packing.py proves a packed
  batch gives the same loss as the same rows unpacked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trl import SFTConfig, SFTTrainer

from mistral_align.data.load import LoadedData, load_sft_dataset
from mistral_align.data.synthetic import write_sft_splits
from mistral_align.model.load import build_model
from mistral_align.model.lora import apply_peft
from mistral_align.schema.recipe import stage_max_length
from mistral_align.train.args import training_arguments
from mistral_align.train.hooks import TrainerHooks
from mistral_align.train.report import generation_table
from mistral_align.train.stage import Stage, build_trainer


class MistralSFTTrainer(TrainerHooks, SFTTrainer):
    """TRL's SFTTrainer on our pre-tokenised rows, with the hooks of train/hooks.py."""


def make_sft_args(stage_cfg: Any, seed: int, out_dir: Path, report_to: list[str], has_eval: bool,
                  eval_on_start: bool = False):
    """trl.SFTConfig from the typed `sft` node."""
    t = stage_cfg.train
    return SFTConfig(
        max_length=stage_max_length(stage_cfg),
        packing=t.packing,
        packing_strategy=t.packing_strategy,
        # Rows are already tokenised with labels; TRL does not touch them beyond packing.
        dataset_num_proc=None,
        **training_arguments(t, seed, out_dir, report_to, has_eval, eval_on_start),
    )


def build_sft_trainer(model, tokenizer, args, train_ds, eval_ds=None, callbacks=(), keep_float32: bool = False):
    """The SFT trainer on already-tokenised rows (input_ids + labels)."""
    return build_trainer(MistralSFTTrainer, model, tokenizer, args, train_ds, eval_ds, callbacks, keep_float32)


def keeps_float32(cfg: Any) -> bool:
    """Trainable weights stay float32 where the 4-bit layers compute in float32, or where the rest of
    the model is float32 (a bf16 adapter beside float32 layers fails outside autocast, e.g. when
    generating); train/precision.py."""
    return cfg.quant.mode != "none" and "float32" in (cfg.quant.compute_dtype, cfg.model.dtype)


class SFTStage(Stage):
    """Supervised fine-tuning: a new LoRA adapter (or the whole model, peft=none) on chat data."""

    name = "sft"

    def write_synthetic_data(self, data_dir: Path):
        s = self.node.synthetic
        return write_sft_splits(data_dir, s.skills, s.n_train, s.n_eval, s.seed, noise=s.noise)

    def load_data(self) -> LoadedData:
        return load_sft_dataset(self.node.data, self.encoder)

    def build_model(self):
        c = self.cfg
        model = build_model(c.model, c.quant, vocab_size=self.encoder.vocab_size, seed=c.run.seed,
                            inline_base=self.inline_base())
        return apply_peft(model, c.peft, quantized=c.quant.mode != "none",
                          gradient_checkpointing=self.node.train.gradient_checkpointing)

    def trainer_args(self, report_to: list[str], has_eval: bool, eval_on_start: bool):
        return make_sft_args(self.node, self.cfg.run.seed, self.out_dir, report_to, has_eval, eval_on_start)

    def build_trainer(self, model, tokenizer, args, data: LoadedData, callbacks: list):
        return build_sft_trainer(model, tokenizer, args, data.train, data.eval, callbacks, keeps_float32(self.cfg))

    def held_out_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return {"loss": metrics["eval_loss"]}

    def generation_rows(self, data: LoadedData):
        return data.eval

    def report(self, summary: dict, gen_before: dict | None, gen_after: dict | None) -> str | None:
        s = summary["sft"]
        if gen_after is None:
            return None
        table = generation_table(gen_before, gen_after, s.get("before", {}).get("loss"), s.get("after", {}).get("loss"),
                                 bars=summary["eval"].get("bars"))
        return "SFT before / after (held-out prompts)\n" + table
