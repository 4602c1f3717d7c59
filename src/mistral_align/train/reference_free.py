"""SimPO and ORPO: TRL's CPOTrainer (loss_type "simpo") and ORPOTrainer, from trl.experimental, on
our exact preference ids, with TRL's fused LM head.

Both trainers keep TRL's loss and metrics (`cpo_loss` / `odds_ratio_loss`, `get_batch_loss_metrics`,
the stored-metrics log) and TRL's behaviour as documented: no reference model; log-probabilities
averaged over each reply's tokens; SimPO's target margin `simpo_gamma` and CPO's NLL term weighted
by `cpo_alpha`; ORPO's loss = NLL of the chosen sequence - lambda x mean log sigmoid(log odds ratio).
Two things are ours:

- the data: `tokenize_row` passes our rows (`prompt_ids`, `chosen_ids`, `rejected_ids` from
  `MistralEncoder.encode_dpo`) through untouched, and the batches are made by TRL's DPO collator
  ([B chosen; B rejected] rows with a completion mask), or its padding-free wrapper
  (train/dpo_padding_free.py);
- `concatenated_forward`: TRL's computes every position's logits over the whole vocabulary (a
  (2B, L, V) tensor: gigabytes at 7B scale with a 32k or 131k vocabulary) and then log-softmaxes
  them. Ours asks the model for per-token log-probabilities through TRL's fused LM head (as TRL's
  own DPO and KTO trainers do), and returns the same five values: the chosen and rejected average
  log-probabilities, the NLL term (the mean over the scored tokens, as TRL's CrossEntropyLoss), and,
  for the `logits/*` metrics, the mean logit of each reply token (TRL's averages every position
  of the padded batch, prompt and padding included, so those two metrics differ by definition).

ORPO's NLL covers the chosen reply only, as every other stage here trains only assistant replies;
`dpo.orpo_prompt_loss=true` makes it cover the prompt too, as TRL's and the ORPO authors' code do.
tests/test_objectives.py checks both losses against TRL's own trainers on the same tokens.
"""

from __future__ import annotations

import warnings

import torch
from trl.import_utils import TRLExperimentalWarning
from trl.trainer.utils import add_fused_lm_head

from mistral_align.train.dpo_trainer import DPO_COLUMNS, preference_collator
from mistral_align.train.hooks import TrainerHooks
from mistral_align.train.pretokenized import drop_long_prompts, packed_forward_for, padding_free_collator, require_columns

with warnings.catch_warnings():
    # Importing trl.experimental warns that its API may change; trl is pinned < 1.17 and
    # tests/test_trainer_mechanics.py checks the methods used here are still there.
    warnings.simplefilter("ignore", TRLExperimentalWarning)
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

__all__ = ["CPOConfig", "ORPOConfig", "PretokenizedORPOTrainer", "PretokenizedSimPOTrainer"]


class ReferenceFreeHooks:
    """What SimPO's and ORPO's TRL trainers need to train on our rows (module docstring). Mixed in
    after TrainerHooks, before the TRL trainer."""

    # Which tokens the NLL term scores: the chosen reply's (completion_mask), or the whole chosen
    # sequence, prompt included (attention_mask).
    nll_mask_key = "completion_mask"

    def __init__(self, *args, padding_free: bool = False, shared_prompt: bool = False, **kwargs):
        a, pad = kwargs["args"], kwargs["processing_class"].pad_token_id
        a.remove_unused_columns = False  # the collator reads our id columns
        for key in ("train_dataset", "eval_dataset"):
            if kwargs.get(key) is not None:
                require_columns(kwargs[key], DPO_COLUMNS, key.split("_")[0] + " preference", "load_dpo_dataset")
                kwargs[key] = drop_long_prompts(self, kwargs[key], a.max_length, key.split("_")[0])
        collator = preference_collator(pad, a)
        self._packed_forward = None
        if padding_free or shared_prompt:
            packed = padding_free_collator(kwargs["model"], collator, pad, shared_prompt)
            self._packed_forward = packed_forward_for(kwargs, packed)
        else:
            kwargs["data_collator"] = collator
        super().__init__(*args, **kwargs)
        # ORPO's prediction_step warns that it expects TRL's own collator; our concatenated_forward
        # reads our collator's batch, so the warning does not apply.
        self.use_dpo_data_collator = True
        model = self.accelerator.unwrap_model(self.model)
        add_fused_lm_head(model.get_base_model() if hasattr(model, "get_base_model") else model,
                          outputs=("log_probs", "mean_logits"))

    def tokenize_row(self, feature, model=None) -> dict:
        return {}  # our ids are the tokens; TRL's constructor maps this over the data

    def concatenated_forward(self, model, batch):
        completion = batch["completion_mask"]
        nll_mask = batch[self.nll_mask_key]
        # Label every token either term scores; the fused head scores the labelled positions only.
        labels = batch["input_ids"].masked_fill((completion.bool() | nll_mask.bool()) == 0, -100)
        model_kwargs = {k: v for k, v in batch.items() if k != "completion_mask"}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = completion.size(1) - 1  # the shifted positions (prompt-learning PEFT prepends others)
        log_probs, mean_logits = outputs.log_probs[:, -seq_len:], outputs.mean_logits[:, -seq_len:]
        reply, scored = completion[:, 1:], nll_mask[:, 1:]
        average = (log_probs * reply).sum(-1) / reply.sum(-1)
        n = batch["input_ids"].size(0) // 2  # [chosen; rejected]
        if self.uses_nll():
            nll = -(log_probs[:n] * scored[:n]).sum() / scored[:n].sum()
        else:
            nll = torch.tensor(0.0, device=log_probs.device)
        chosen_logits, rejected_logits = mean_logits[:n][reply[:n].bool()], mean_logits[n:][reply[n:].bool()]
        result = (average[:n], average[n:], chosen_logits, rejected_logits, nll)
        return (*result, outputs.aux_loss) if self.aux_loss_enabled else result

    def uses_nll(self) -> bool:
        return True


class PretokenizedSimPOTrainer(TrainerHooks, ReferenceFreeHooks, CPOTrainer):
    """SimPO (CPOConfig(loss_type="simpo")) on our preference rows; `cpo_alpha` > 0 adds CPO's NLL term."""

    def uses_nll(self) -> bool:
        return self.cpo_alpha != 0  # TRL's CPO skips the NLL when its weight is 0


class PretokenizedORPOTrainer(TrainerHooks, ReferenceFreeHooks, ORPOTrainer):
    """ORPO on our preference rows; `prompt_loss` makes its NLL term cover the prompt too (TRL's)."""

    def __init__(self, *args, prompt_loss: bool = False, **kwargs):
        self.nll_mask_key = "attention_mask" if prompt_loss else "completion_mask"
        super().__init__(*args, **kwargs)
