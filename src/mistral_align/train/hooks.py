"""Everything our trainers change about TRL's SFTTrainer, DPOTrainer, KTOTrainer and the
experimental CPOTrainer (SimPO) and ORPOTrainer, in one place.

Our step is TRL's step plus what is listed here. Each entry names the hook, whether it is public
(documented for subclasses or callbacks) or PRIVATE, what we add and why, and the canary: the test
that fails the day TRL or transformers changes what we rely on. `TrainerHooks` (below) holds the
methods every trainer shares; callbacks live in their own modules; the preference trainers' in
train/dpo_trainer.py, kto_trainer.py, reference_free.py and what they share in pretokenized.py.

__init__(keep_float32=...)                    public
    adds    the trainable weights' exact float32 values, put back after TRL's constructor
    why     TRL casts a quantised model's adapter to bf16: wrong where 4-bit layers compute in
            float32 (train/precision.py)
    canary  test_trainer_mechanics::test_keep_float32_restores_the_exact_adapter_in_both_stages
get_train_dataloader                          public
    adds    each training batch carries its rows' keys (`_row_keys`)
    why     a NaN step names its rows as FILE:LINE (train/nonfinite.py)
    canary  test_nonfinite::test_sft_nan_stops_naming_the_step_its_rows_and_the_last_checkpoint
training_step                                 public
    adds    the keys popped; the non-finite guard (stop, or skip the update: the step then reports
            minus what its earlier micro-batches reported); the reported loss summed on the device
    why     one NaN step must not poison the weights; a resumed stage reports the loss of one that
            ran through (the sum goes into each checkpoint's marker)
    canary  test_nonfinite::test_sft_nan_skip_leaves_the_weights_counts_the_step_and_trains_on
log                                           public
    adds    the logged loss leaves skipped steps out; `nonfinite_skipped`
    why     the trainer divides by every step since its last log
    canary  test_nonfinite::test_sft_nan_skip_leaves_the_weights_counts_the_step_and_trains_on
train, evaluate, predict                      public, around TRL's PRIVATE trl.trainer.utils._use_triton
    adds    while they run, `_use_triton` answers True on the CPU
    why     TRL's fused LM head then scores labelled positions only (train/lm_head.py); TRL has no
            public switch for it
    canary  test_trainer_mechanics::test_trl_still_consults_the_function_we_replace
create_model_card                             public
    adds    nothing is written
    why     TRL wrote its card into every checkpoint folder; ours is written by push (hub/card.py)
    canary  test_trainer_mechanics::test_checkpoints_are_renamed_into_place_complete_and_hold_no_model_card
AtomicCheckpoints.on_save                     callback (train/checkpointing.py)
    adds    the marker, the rename into place, the rotation
    why     checkpoints are complete or invisible
    canary  test_trainer_mechanics::test_the_trainer_internals_our_hooks_rely_on_are_still_there and
            ::test_checkpoints_are_renamed_into_place_complete_and_hold_no_model_card
StopOnSignal.on_step_end                      callback (train/signals.py)
    adds    a signal saves a checkpoint at the next step boundary, then training stops
    why     clean stops on SIGTERM / SIGUSR1 / Ctrl-C
    canary  test_faults::test_sft_killed_then_resumed_equals_uninterrupted_and_sigterm_stops_cleanly
MetricsJsonl.on_log                           callback (train/metrics.py)
    adds    metrics.jsonl, with no row duplicated or lost over a resume
    canary  test_faults::test_sft_killed_then_resumed_equals_uninterrupted_and_sigterm_stops_cleanly
FirstEvaluation.on_evaluate, eval_on_start    callback and public argument (train/metrics.py, train/args.py)
    adds    the held-out metrics before training, measured by the trainer as its first act
    why     an evaluation before train() left the model prepared for evaluation only, and under DDP
            training then never wrapped it: each rank trained alone
    canary  test_trainer_mechanics::test_the_trainer_internals_our_hooks_rely_on_are_still_there;
            test_accelerate_sft (two ranks train one model, the before loss is reported)
DPO _prepare_dataset                          PRIVATE (train/dpo_trainer.py)
    adds    our ids pass untouched; prompts that alone fill max_length are dropped and counted
    why     TRL 1.16 always re-tokenises preference data through the tokenizer's chat template,
            with no public way to hand it ids
    canary  test_trainer_mechanics::test_the_trainer_internals_our_hooks_rely_on_are_still_there
DPO data_collator=                            public constructor argument (train/dpo_trainer.py)
    adds    the padding-free / shared-prompt collator (train/dpo_padding_free.py)
    why     pairs packed instead of padded: the same loss, less padding
    canary  test_dpo_padding_free
DPO, KTO save_model                           public (train/pretokenized.py FrozenReferenceAdapter)
    adds    only the trained adapter is saved, not the frozen "ref" copy
    why     the reference is a second adapter inside the same PeftModel
    canary  test_dpo_trainer; test_objectives::test_kto_resumed_equals_uninterrupted
KTO _prepare_dataset                          PRIVATE (train/kto_trainer.py)
    adds    our ids pass untouched; what TRL's adds after tokenising, done the same way: prompts that
            alone fill max_length dropped, each row's KL completion (the previous row's reply in its
            batch), the desirable / undesirable balance warning
    why     TRL 1.16 always re-tokenises KTO data through the tokenizer's chat template
    canary  test_objectives::test_each_objective_equals_trls_own_trainer_on_the_same_tokens[kto]
KTO data_collator=                            public constructor argument (train/kto_trainer.py)
    adds    the padding-free collator: the rows and the KL rows each packed (train/dpo_padding_free.py)
    canary  test_objectives::test_padding_free_equals_padded
SimPO, ORPO tokenize_row                      public method (train/reference_free.py)
    adds    our ids pass untouched (the constructor maps it over the data)
    why     the experimental trainers tokenise text with the tokenizer's chat template
    canary  test_objectives::test_each_objective_equals_trls_own_trainer_on_the_same_tokens
SimPO, ORPO concatenated_forward              public method (train/reference_free.py)
    adds    the same five values from TRL's fused LM head (trl.trainer.utils.add_fused_lm_head,
            public), not from (2B, L, vocab) logits; the batch from TRL's DPO collator, or packed
    why     memory (the full logits of a 7B batch are gigabytes) and padding-free batches
    canary  test_objectives::test_each_objective_equals_trls_own_trainer_on_the_same_tokens and
            ::test_padding_free_equals_padded
SimPO, ORPO data_collator=, use_dpo_data_collator   public constructor argument and attribute
    adds    TRL's DPO collator (or the padding-free one); the attribute set True only silences
            ORPO's warning that prediction_step expects its own collator
    canary  test_objectives::test_each_objective_equals_trls_own_trainer_on_the_same_tokens

Trainer state we read but never write: `state`, `args`, `accelerator`, `callback_handler`, and
`data_collator` (swapped only while the training loader is built); SimPO and ORPO: `args.
remove_unused_columns` set False before TRL's constructor (the collator reads our id columns). trl is pinned < 1.17 and
transformers < 5.24 in pyproject.toml; the source canaries run in `make test-fast`, the
behavioural ones in `make test`.
"""

from __future__ import annotations

from mistral_align.train.checkpointing import AtomicCheckpoints
from mistral_align.train.lm_head import lm_head_scores_labelled_positions_only
from mistral_align.train.nonfinite import ROW_KEYS, NonFinitePolicy, RowKeysCollator
from mistral_align.train.precision import restore_trainable, trainable_snapshot


class TrainerHooks:
    """Mixed in before TRL's trainer class: `class MistralSFTTrainer(TrainerHooks, SFTTrainer)`."""

    def __init__(self, *args, keep_float32: bool = False, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        snapshot = trainable_snapshot(model) if keep_float32 and model is not None else {}
        super().__init__(*args, **kwargs)
        if snapshot:
            restore_trainable(self.accelerator.unwrap_model(self.model), snapshot)
        self.nonfinite = NonFinitePolicy()  # run_stage replaces it with the stage's own
        self.add_callback(AtomicCheckpoints(self))

    def get_train_dataloader(self):
        # Only the training loader carries row keys: evaluation and reference-log-prob passes hand
        # their batches to the model without going through training_step.
        inner = self.data_collator
        self.data_collator = RowKeysCollator(inner)
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = inner

    def training_step(self, model, inputs, num_items_in_batch=None):
        keys = inputs.pop(ROW_KEYS, [])
        loss = super().training_step(model, inputs, num_items_in_batch)
        return self.nonfinite.after_micro_batch(self, model, keys, loss)

    def log(self, logs: dict, *args, **kwargs):
        self.nonfinite.adjust_log(self.state.global_step, logs)
        return super().log(logs, *args, **kwargs)

    def train(self, *args, **kwargs):
        with lm_head_scores_labelled_positions_only():
            return super().train(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        with lm_head_scores_labelled_positions_only():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with lm_head_scores_labelled_positions_only():
            return super().predict(*args, **kwargs)

    def create_model_card(self, *args, **kwargs):
        return None
