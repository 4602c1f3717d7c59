"""TRL's DPOTrainer, fed with preference ids from our exact encoder instead of a chat template.

TRL 1.16 always re-tokenises preference data through `processing_class` (a chat template for
conversations). For Mistral that is exactly what must not happen, so `_prepare_dataset` is
replaced: rows arrive with `prompt_ids`, `chosen_ids`, `rejected_ids` made by
`MistralEncoder.encode_dpo`, and go to TRL's collator untouched.

`padding_free=True` runs each batch's chosen and rejected sequences as one packed row instead of
a padded batch (train/dpo_padding_free.py); `shared_prompt=True` also computes each pair's prompt
once. Both are given to TRL through its public `data_collator` argument. The loss and metrics are
TRL's, unchanged. Every hook, public or private, is listed in train/hooks.py.
"""

from __future__ import annotations

from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from mistral_align.train.dpo_padding_free import PackedForward, PaddingFreePreferenceCollator
from mistral_align.train.hooks import TrainerHooks
from mistral_align.train.sharded_saves import gathered_state_dict, sharded_checkpoints_only

DPO_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def packed_collator(model, processing_class, args, shared_prompt: bool) -> PaddingFreePreferenceCollator:
    """TRL's own padded preference collator, wrapped to add the packed row."""
    # FlashAttention's varlen kernel takes one row of everything; kernels that build the block-diagonal
    # mask densely (sdpa, eager) get rows as long as the batch's longest sequence instead.
    attn = getattr(model.config, "_attn_implementation", None) or ""
    if shared_prompt and attn not in ("sdpa", "eager"):
        raise ValueError(f"dpo.shared_prompt needs model.attn_implementation sdpa or eager, not {attn}: "
                         "its attention mask lets a rejected reply see the prompt but not the chosen reply")
    pad = processing_class.pad_token_id
    padded = DataCollatorForPreference(pad_token_id=pad, max_length=args.max_length, truncation_mode=args.truncation_mode,
                                       pad_to_multiple_of=args.pad_to_multiple_of)
    rows = "one" if "flash" in attn and not shared_prompt else "longest"
    return PaddingFreePreferenceCollator(padded, rows=rows, pad_token_id=pad, shared_prompt=shared_prompt)


class PretokenizedDPOTrainer(TrainerHooks, DPOTrainer):
    """DPO on `prompt_ids` / `chosen_ids` / `rejected_ids` rows, with the hooks of train/hooks.py;
    `padding_free` packs chosen and rejected rows and `shared_prompt` also computes each pair's
    prompt once (train/dpo_padding_free.py)."""

    def __init__(self, *args, padding_free: bool = False, shared_prompt: bool = False, **kwargs):
        self._packed_forward = None
        if padding_free or shared_prompt:
            model, ref_model = kwargs["model"], kwargs.get("ref_model")
            if not hasattr(model, "peft_config") and ref_model is None and kwargs["args"].precompute_ref_log_probs:
                raise ValueError("padding-free DPO with precompute_ref_log_probs needs a PEFT adapter or a ref_model "
                                 "(TRL would build the reference model inside its constructor, without our packing hooks)")
            kwargs["data_collator"] = packed_collator(model, kwargs["processing_class"], kwargs["args"], shared_prompt)
            # Hooked before TRL's constructor, which may already score every pair with the reference
            # (precompute_ref_log_probs) through this collator. A PEFT model is its own reference
            # (the "ref" adapter TRL adds to it).
            self._packed_forward = PackedForward()
            for module in (model, ref_model):
                if module is not None:
                    self._packed_forward.attach(module)
        super().__init__(*args, **kwargs)
        if self._packed_forward is not None and self.ref_model is not None and kwargs.get("ref_model") is None:
            self._packed_forward.attach(self.accelerator.unwrap_model(self.ref_model))
        self._sync_reference_to_policy()

    def _sync_reference_to_policy(self):
        """Make the frozen "ref" adapter an exact copy (values and dtype) of the trainable one.

        TRL copies the starting adapter into "ref" before it casts the trainable copy to bf16 for
        QLoRA (and before `keep_float32` restores it): re-copy, so that policy and reference are the
        same function at step 0 (every reward exactly 0, sigmoid loss exactly ln 2).
        """
        model = self.accelerator.unwrap_model(self.model)
        if "ref" not in getattr(model, "peft_config", {}):
            return
        params = dict(model.named_parameters())
        for name, param in params.items():
            if ".default." in name:
                params[name.replace(".default.", ".ref.")].data = param.data.detach().clone()

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        missing = [c for c in DPO_COLUMNS if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"the {dataset_name} preference data has no {missing} columns: tokenise it with "
                "mistral_align.data.load.load_dpo_dataset (never through a chat template)"
            )
        if args.max_length is not None:
            # TRL truncates with keep_start: BOS and the whole prompt, through [/INST], are kept and only
            # the completions' tails are cut. A prompt that alone fills max_length would leave nothing to
            # learn from, so such rows are dropped here, as TRL does, and counted.
            before = len(dataset)
            dataset = dataset.filter(
                lambda row: len(row["prompt_ids"]) < args.max_length, desc=f"Dropping over-long prompts ({dataset_name})"
            )
            self.dropped_long_prompts = getattr(self, "dropped_long_prompts", 0) + before - len(dataset)
        return dataset

    def save_model(self, output_dir=None, _internal_call=False):
        # The frozen reference is a second adapter named "ref" inside the same PeftModel; checkpoints and
        # the final save hold only the trained adapter (transformers' save would write "ref" too).
        unwrapped = self.accelerator.unwrap_model(self.model)
        if "ref" not in (getattr(unwrapped, "peft_config", None) or {}) or sharded_checkpoints_only(self):
            # (FSDP with sharded checkpoints: save_fsdp_model writes the active adapter's shards.)
            return super().save_model(output_dir, _internal_call)
        # Under FSDP / ZeRO-3 the weights are gathered first, on every rank: a collective that no rank
        # may skip, so no rank returns before it.
        state_dict = gathered_state_dict(self)
        if self.args.should_save:
            unwrapped.save_pretrained(output_dir or self.args.output_dir, state_dict=state_dict,
                                      selected_adapters=["default"], safe_serialization=True)
