"""What our preference trainers (train/dpo_trainer.py, kto_trainer.py, reference_free.py) share on
top of TRL's: our exact ids checked and cut as TRL would, the packed forward of padding-free
batches, and the frozen "ref" adapter that DPO and KTO keep inside the policy's PeftModel.
Every hook is listed in train/hooks.py."""

from __future__ import annotations

from mistral_align.train.dpo_padding_free import PackedForward, PaddingFreePreferenceCollator
from mistral_align.train.sharded_saves import gathered_state_dict, sharded_checkpoints_only


def require_columns(dataset, columns: tuple[str, ...], dataset_name: str, loader: str) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"the {dataset_name} data has no {missing} columns: tokenise it with "
                         f"mistral_align.data.load.{loader} (never through a chat template)")


def drop_long_prompts(trainer, dataset, max_length: int | None, dataset_name: str):
    """Rows whose prompt alone fills `max_length`, dropped (and counted in `trainer.dropped_long_prompts`)
    as TRL does: the trainer truncates keep_start (BOS and the whole prompt, through [/INST], are kept
    and only the replies' tails are cut), which would leave such a row nothing to learn from."""
    if max_length is None:
        return dataset
    before = len(dataset)
    dataset = dataset.filter(lambda row: len(row["prompt_ids"]) < max_length,
                             desc=f"Dropping over-long prompts ({dataset_name})")
    trainer.dropped_long_prompts = getattr(trainer, "dropped_long_prompts", 0) + before - len(dataset)
    return dataset


def padding_free_collator(model, padded_collator, pad_token_id: int, shared_prompt: bool) -> PaddingFreePreferenceCollator:
    """TRL's own padded collator, wrapped to add the packed rows."""
    # FlashAttention's varlen kernel takes one row of everything; kernels that build the block-diagonal
    # mask densely (sdpa, eager) get rows as long as the batch's longest sequence instead.
    attn = getattr(model.config, "_attn_implementation", None) or ""
    if shared_prompt and attn not in ("sdpa", "eager"):
        raise ValueError(f"dpo.shared_prompt needs model.attn_implementation sdpa or eager, not {attn}: "
                         "its attention mask lets a rejected reply see the prompt but not the chosen reply")
    rows = "one" if "flash" in attn and not shared_prompt else "longest"
    return PaddingFreePreferenceCollator(padded_collator, rows=rows, pad_token_id=pad_token_id, shared_prompt=shared_prompt)


def packed_forward_for(kwargs: dict, collator) -> PackedForward:
    """Puts the padding-free `collator` into the trainer's keyword arguments and hooks the policy (and
    a given ref_model) before TRL's constructor runs, which may already score every row with the
    reference (precompute_ref_log_probs) through this collator. A PEFT model is its own reference
    (the "ref" adapter TRL adds to it)."""
    model, ref_model = kwargs["model"], kwargs.get("ref_model")
    precompute = getattr(kwargs["args"], "precompute_ref_log_probs", False)
    if not hasattr(model, "peft_config") and ref_model is None and precompute:
        raise ValueError("padding-free training with precompute_ref_log_probs needs a PEFT adapter or a ref_model "
                         "(TRL would build the reference model inside its constructor, without our packing hooks)")
    kwargs["data_collator"] = collator
    packed = PackedForward()
    for module in (model, ref_model):
        if module is not None:
            packed.attach(module)
    return packed


class FrozenReferenceAdapter:
    """DPO and KTO on a PEFT model: TRL keeps the reference as a frozen copy of the starting adapter,
    a second adapter named "ref" inside the same PeftModel. Mixed in after TrainerHooks."""

    def _attach_reference_packing(self, given_ref_model) -> None:
        """A reference model TRL built itself (no PEFT, no ref_model given) gets the packing hooks too."""
        if self._packed_forward is not None and self.ref_model is not None and given_ref_model is None:
            self._packed_forward.attach(self.accelerator.unwrap_model(self.ref_model))

    def _sync_reference_to_policy(self):
        """Make the frozen "ref" adapter an exact copy (values and dtype) of the trainable one.

        TRL copies the starting adapter into "ref" before it casts the trainable copy to bf16 for
        QLoRA (and before `keep_float32` restores it): re-copy, so that policy and reference are the
        same function at step 0 (every reward exactly 0; DPO's sigmoid loss exactly ln 2).
        """
        model = self.accelerator.unwrap_model(self.model)
        if "ref" not in getattr(model, "peft_config", {}):
            return
        params = dict(model.named_parameters())
        for name, param in params.items():
            if ".default." in name:
                params[name.replace(".default.", ".ref.")].data = param.data.detach().clone()

    def save_model(self, output_dir=None, _internal_call=False):
        # Checkpoints and the final save hold only the trained adapter (transformers' save would write
        # "ref" too).
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
