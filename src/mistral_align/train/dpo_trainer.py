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

from mistral_align.train.hooks import TrainerHooks
from mistral_align.train.pretokenized import (
    FrozenReferenceAdapter,
    drop_long_prompts,
    packed_forward_for,
    padding_free_collator,
    require_columns,
)

DPO_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def preference_collator(pad_token_id: int, args) -> DataCollatorForPreference:
    """TRL's padded collator of pairs: [B chosen; B rejected] rows, cut keep_start at max_length."""
    return DataCollatorForPreference(pad_token_id=pad_token_id, max_length=args.max_length,
                                     truncation_mode=getattr(args, "truncation_mode", "keep_start"),
                                     pad_to_multiple_of=getattr(args, "pad_to_multiple_of", None))


class PretokenizedDPOTrainer(TrainerHooks, FrozenReferenceAdapter, DPOTrainer):
    """DPO on `prompt_ids` / `chosen_ids` / `rejected_ids` rows, with the hooks of train/hooks.py;
    `padding_free` packs chosen and rejected rows and `shared_prompt` also computes each pair's
    prompt once (train/dpo_padding_free.py)."""

    def __init__(self, *args, padding_free: bool = False, shared_prompt: bool = False, **kwargs):
        self._packed_forward = None
        if padding_free or shared_prompt:
            pad = kwargs["processing_class"].pad_token_id
            collator = padding_free_collator(kwargs["model"], preference_collator(pad, kwargs["args"]), pad, shared_prompt)
            self._packed_forward = packed_forward_for(kwargs, collator)
        super().__init__(*args, **kwargs)
        self._attach_reference_packing(kwargs.get("ref_model"))
        self._sync_reference_to_policy()

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        require_columns(dataset, DPO_COLUMNS, f"{dataset_name} preference", "load_dpo_dataset")
        return drop_long_prompts(self, dataset, args.max_length, dataset_name)
