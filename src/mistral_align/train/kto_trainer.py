"""TRL's KTOTrainer, fed with KTO rows from our exact encoder instead of a chat template.

As DPO's (train/dpo_trainer.py), TRL 1.16's KTOTrainer re-tokenises its data through
`processing_class`, so `_prepare_dataset` is replaced: rows arrive with `prompt_ids`,
`completion_ids` and `label` made by `MistralEncoder.encode_unpaired` (preference pairs already
split by the loader, data/kto.py), and keep them. What TRL's own `_prepare_dataset` adds after
tokenising is done here the same way: rows whose prompt alone fills max_length are dropped, each
row's KL completion is the previous row's reply within its batch (TRL's rotation by one, which is
why KTO reads batches in order), and the desirable / undesirable balance is checked against the
weights (TRL's warning, with data/kto.py's advice).

The reference is a frozen copy of the starting adapter (FrozenReferenceAdapter); `padding_free`
packs the rows and the KL rows of each batch (train/dpo_padding_free.py). The loss and metrics are
TRL's. Every hook is listed in train/hooks.py.
"""

from __future__ import annotations

import logging

from trl import KTOTrainer
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

from mistral_align.data.kto import balance_advice, counts
from mistral_align.train.hooks import TrainerHooks
from mistral_align.train.pretokenized import (
    FrozenReferenceAdapter,
    drop_long_prompts,
    packed_forward_for,
    padding_free_collator,
    require_columns,
)

log = logging.getLogger("mistral_align")

KTO_COLUMNS = ("prompt_ids", "completion_ids", "label")


def with_kl_completions(dataset, batch_size: int):
    """Each row's KL completion: the reply of the row before it in its batch of `batch_size` (the
    first row takes the last one's), exactly as TRL's KTOTrainer builds them after tokenising."""

    def rotate(batch):
        batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
        return batch

    return dataset.map(rotate, batched=True, batch_size=batch_size, desc="Pairing each row with a KL completion")


class PretokenizedKTOTrainer(TrainerHooks, FrozenReferenceAdapter, KTOTrainer):
    """KTO on `prompt_ids` / `completion_ids` / `label` rows, with the hooks of train/hooks.py;
    `padding_free` packs each batch's rows and its KL rows (train/dpo_padding_free.py)."""

    def __init__(self, *args, padding_free: bool = False, **kwargs):
        self._packed_forward = None
        if padding_free:
            a, pad = kwargs["args"], kwargs["processing_class"].pad_token_id
            padded = DataCollatorForUnpairedPreference(pad_token_id=pad, max_length=a.max_length,
                                                       pad_to_multiple_of=a.pad_to_multiple_of)
            self._packed_forward = packed_forward_for(kwargs, padding_free_collator(kwargs["model"], padded, pad, False))
        super().__init__(*args, **kwargs)
        self._attach_reference_packing(kwargs.get("ref_model"))
        self._sync_reference_to_policy()

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        require_columns(dataset, KTO_COLUMNS, f"{dataset_name} KTO", "load_kto_dataset")
        dataset = drop_long_prompts(self, dataset, args.max_length, dataset_name)
        if self.calculate_KL:
            dataset = with_kl_completions(dataset, args.per_device_train_batch_size)
        if dataset_name == "train":
            advice = balance_advice(*counts(dataset), self.desirable_weight, self.undesirable_weight)
            if advice:
                log.warning("KTO data: %s", advice)
        return dataset
