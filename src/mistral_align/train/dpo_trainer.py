"""TRL's DPOTrainer, fed with preference ids from our exact encoder instead of a chat template.

TRL 1.16 always re-tokenises preference data through `processing_class` (a chat template for
conversations). For Mistral that is exactly what must not happen, so `_prepare_dataset` is
replaced: rows arrive with `prompt_ids`, `chosen_ids`, `rejected_ids` made by
`MistralEncoder.encode_dpo`, and go to TRL's collator untouched.

`padding_free=True` runs each batch's chosen and rejected sequences as one packed row instead of
a padded batch (train/dpo_padding_free.py); `shared_prompt=True` also computes each pair's prompt
once. The loss and metrics are TRL's, unchanged.
"""

from __future__ import annotations

from trl import DPOTrainer

from mistral_align.train.distributed import (WrapsForTrainingAfterEvaluating, gathered_state_dict,
                                              sharded_checkpoints_only)
from mistral_align.train.faults import AtomicCheckpoints
from mistral_align.train.nonfinite import GuardsNonFinite
from mistral_align.train.precision import KeepsTrainableFloat32
from mistral_align.train.trl_patches import ScoresLabelledPositionsOnly

DPO_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


class PretokenizedDPOTrainer(WrapsForTrainingAfterEvaluating, AtomicCheckpoints, GuardsNonFinite,
                             ScoresLabelledPositionsOnly, KeepsTrainableFloat32, DPOTrainer):
    """DPO on `prompt_ids` / `chosen_ids` / `rejected_ids` rows; `keep_float32` as in train/precision.py;
    checkpoints complete or invisible (train/faults.py); a NaN/Inf step stops or is skipped
    (train/nonfinite.py); `padding_free` packs chosen and rejected rows and `shared_prompt` also
    computes each pair's prompt once (train/dpo_padding_free.py);
    DDP wraps the model even after an evaluation (train/distributed.py)."""

    def __init__(self, *args, padding_free: bool = False, shared_prompt: bool = False, **kwargs):
        # Set before TRL's __init__, which may precompute reference log-probs (through the collator).
        self._pack_pairs = padding_free or shared_prompt
        self._shared_prompt = shared_prompt
        self._packed_forward = None
        super().__init__(*args, **kwargs)
        if self._pack_pairs:
            self._enable_padding_free()
        self._sync_reference_to_policy()

    def _enable_padding_free(self):
        """Wrap the collator and hook the model(s) once; see train/dpo_padding_free.py."""
        from mistral_align.train.dpo_padding_free import PackedForward, PaddingFreePreferenceCollator

        if not isinstance(self.data_collator, PaddingFreePreferenceCollator):
            # FlashAttention's varlen kernel takes one row of everything; kernels that build the block-diagonal
            # mask densely (sdpa, eager) get rows as long as the batch's longest sequence instead.
            attn = getattr(self.accelerator.unwrap_model(self.model).config, "_attn_implementation", None) or ""
            if self._shared_prompt and attn not in ("sdpa", "eager"):
                raise ValueError(f"dpo.shared_prompt needs model.attn_implementation sdpa or eager, not {attn}: "
                                 "its attention mask lets a rejected reply see the prompt but not the chosen reply")
            rows = "one" if "flash" in attn and not self._shared_prompt else "longest"
            pad = getattr(self.data_collator, "pad_token_id", 0)
            self.data_collator = PaddingFreePreferenceCollator(self.data_collator, rows=rows, pad_token_id=pad,
                                                               shared_prompt=self._shared_prompt)
        if self._packed_forward is None:
            self._packed_forward = PackedForward()
            self._packed_forward.attach(self.accelerator.unwrap_model(self.model))
            if self.ref_model is not None:
                self._packed_forward.attach(self.accelerator.unwrap_model(self.ref_model))

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if self._pack_pairs:
            self._enable_padding_free()
        return super()._precompute_ref_logps(dataset, name, batch_size)

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
                "mistral_align.data.load_dpo_dataset (never through a chat template)"
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
