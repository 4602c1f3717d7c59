"""Steps whose loss or gradients are not finite (NaN / Inf): `train.on_nonfinite: stop | skip`.

Left alone, one NaN step poisons the weights for good: the trainer clips and applies NaN gradients,
and transformers' `logging_nan_inf_filter` even hides the NaN loss from the logs. `NonFinitePolicy`
(called from both trainers' `training_step`, train/hooks.py) checks every optimizer step after its
last backward pass and before clipping and the optimizer step:

- stop (default): raise `NonFiniteError` naming the step, the rows of the batch and the newest
  complete checkpoint; the update is never applied. The recipe prints `error: ...` and exits 2.
- skip: drop the update (every gradient set to None, so the optimizer leaves each weight and its
  own state untouched, AdamW's momentum included; zeroed gradients would still move the weights
  through momentum), count it (`nonfinite_skipped` in metrics.jsonl and summary.json), go on. The
  step still counts as a step: the learning-rate schedule moves on.

All ranks decide together (a two-integer all-reduce each step, as `StopOnSignal` does), so a NaN on
one rank stops or skips the step on every rank. With gradient accumulation the decision covers the
whole step (all its micro-batches). Under DeepSpeed the optimizer steps inside the backward pass,
before this check can run (and ZeRO keeps no `.grad` to look at, only the loss is checked): stop
still stops with nothing of the step saved, but skip cannot take the update back there.

Which rows: TRL rebuilds the dataset (SFT packing concatenates rows and drops other columns), so no
index column survives to the batch. Instead the training collator is wrapped (`RowKeysCollator`,
training data loader only) to add each row's content key (a hash of its ids) to the batch under
`_row_keys`; `training_step` pops it before anything reaches the model. On a bad step the keys are
matched against the stage's data, whose rows keep their "FILE:LINE" (data/load.py `train_rows`).
A packed SFT row is split by its `seq_lengths` first; with packing_strategy=wrapped or bfd_split a
sequence may be part of a row, and is reported as not traced to a row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from mistral_align.errors import NonFiniteError
from mistral_align.rundir.checkpoints import newest_complete

log = logging.getLogger("mistral_align")

ROW_KEYS = "_row_keys"
MAX_NAMED_ROWS = 10


# -- which rows a batch holds ------------------------------------------------------------------------


def _key(*seqs: Sequence[int]) -> int:
    # hash() of a tuple of ints is the same in every process (only str/bytes hashing is salted),
    # so collator workers, ranks and the lookup below agree.
    return hash(tuple(tuple(int(t) for t in s) for s in seqs))


# The id columns that make a row's key: a preference pair's, a KTO row's, an SFT row's.
KEY_COLUMNS = (("prompt_ids", "chosen_ids", "rejected_ids"), ("prompt_ids", "completion_ids"), ("input_ids",))


def key_columns(columns) -> tuple[str, ...]:
    """Which of KEY_COLUMNS a dataset's (or an example's) columns hold."""
    return next(names for names in KEY_COLUMNS if all(n in columns for n in names))


def example_keys(example: dict[str, Any]) -> list[int]:
    """Content keys of the rows in one dataset example: a DPO pair, a KTO row, an SFT row, or an SFT
    packed row (split into its conversations by `seq_lengths`)."""
    names = key_columns(example)
    if names != ("input_ids",):
        return [_key(*(example[n] for n in names))]
    ids = list(example["input_ids"])
    lengths = example.get("seq_lengths")
    if lengths is None:
        return [_key(ids)]
    keys, start = [], 0
    for n in lengths:
        keys.append(_key(ids[start : start + int(n)]))
        start += int(n)
    return keys


class RowKeysCollator:
    """The trainer's collator, plus the batch's row keys under `_row_keys` (a list of ints that the
    data loader passes through untouched and our `training_step` removes (train/hooks.py))."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        keys = [k for example in examples for k in example_keys(example)]
        batch = self.inner(examples)
        batch[ROW_KEYS] = keys
        return batch


class RowNames:
    """Row keys -> "FILE:LINE", from the stage's training data. The lookup is built on first use only
    (a bad step), so a healthy run never pays for it."""

    def __init__(self, kind: str, dataset, origins: list[str] | None, max_length: int | None = None):
        self.kind, self.dataset, self.origins, self.max_length = kind, dataset, origins, max_length
        self._lookup: dict[int, list[str]] | None = None

    def _row_key(self, row: dict[str, Any]) -> int:
        names = key_columns(row)
        if names != ("input_ids",):
            return _key(*(row[n] for n in names))
        ids = row["input_ids"]
        return _key(ids[: self.max_length] if self.max_length else ids)  # TRL cuts rows at max_length

    def lookup(self) -> dict[int, list[str]]:
        if self._lookup is None:
            names = key_columns(self.dataset.column_names)
            table = self.dataset.with_format("arrow")[:]  # whole columns at once, not row by row
            columns = [table[n].to_pylist() for n in names]
            self._lookup = {}
            for origin, *ids in zip(self.origins or [], *columns):
                self._lookup.setdefault(self._row_key(dict(zip(names, ids))), []).append(origin)
        return self._lookup

    def __call__(self, keys: Sequence[int]) -> list[str]:
        names, untraced = [], 0
        for key in keys:
            found = self.lookup().get(key)
            if found is None:
                untraced += 1
            names += [n for n in found or [] if n not in names]
        if untraced:
            names.append(f"{untraced} sequence(s) not traced to a row")
        return names


def format_rows(names: list[str]) -> str:
    if not names:
        return "unknown"
    shown = ", ".join(names[:MAX_NAMED_ROWS])
    return shown + (f" and {len(names) - MAX_NAMED_ROWS} more" if len(names) > MAX_NAMED_ROWS else "")


# -- the check, once per optimizer step --------------------------------------------------------------


def _all_ranks(values: list[int], device) -> list[int]:
    """Element-wise max over the ranks (the values themselves with one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return values
    t = torch.tensor(values, dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _gather(keys: list[int]) -> list[int]:
    """Every rank's keys, in rank order, on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return keys
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, keys)
    return [k for part in out for k in part]


def grads_finite(model: torch.nn.Module) -> bool:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


@dataclass
class NonFinitePolicy:
    """What a trainer does on a non-finite step, and the step losses it reports; run_stage sets it
    from `<stage>.train.on_nonfinite` (train/hooks.py calls it from training_step and log)."""

    mode: str = "stop"
    key: str = "train.on_nonfinite"  # the setting, as the user spells it (`sft.train.on_nonfinite`)
    row_names: Any = None  # RowNames, or None: rows reported as unknown
    checkpoint_dir: Path | None = None  # where the last good checkpoint is looked for when stopping
    skipped: int = 0  # steps skipped so far in this stage, over resumes (kept in checkpoint markers)
    # The sum of the losses reported to the trainer in this launch (a skipped step adds 0), on the
    # device: read once per checkpoint (train/checkpointing.py), never per step.
    loss_sum: torch.Tensor | None = None
    resumed_loss_sum: float = 0.0  # the same sum over the stage's earlier launches
    # The loss logged for a window of steps leaves the skipped ones out (see `adjust_log`).
    skipped_since_log: int = 0
    last_log_step: int | None = None
    _window: list = field(default_factory=list)  # (row keys, loss, finite) of each micro-batch of this step

    def after_micro_batch(self, trainer, model, keys: list[int], loss: torch.Tensor) -> torch.Tensor:
        """The loss to report for a micro-batch the trainer has just run backward on."""
        if self.last_log_step is None:  # the step this launch starts from (after a resume, too)
            self.last_log_step = trainer.state.global_step
        finite = torch.isfinite(loss).all()
        self._window.append((keys, loss, finite))
        # The running loss the trainer logs never sees a NaN: a bad micro-batch adds 0 (transformers'
        # own logging_nan_inf_filter would add a made-up average instead).
        reported = torch.where(finite, loss, torch.zeros_like(loss))
        # The loop marks the last micro-batch of a step: its backward has completed (and, with DDP,
        # averaged) the step's gradients, and nothing has clipped or applied them yet.
        if trainer.accelerator.sync_gradients:
            window, self._window = self._window, []
            if self._check_step(trainer, model, window):
                # A skipped step adds nothing to the trainer's running loss: this last micro-batch
                # reports minus what the step's earlier ones reported, so their sum is 0.
                reported = -sum((torch.where(ok, earlier, torch.zeros_like(earlier)) for _, earlier, ok in window[:-1]),
                                torch.zeros_like(loss))
        self.loss_sum = reported.detach() if self.loss_sum is None else self.loss_sum + reported.detach()
        return reported

    def _check_step(self, trainer, model, window: list) -> bool:
        """Whether the step was skipped; raises NonFiniteError to stop."""
        bad_loss = [not bool(finite) for _, _, finite in window]
        flags = _all_ranks([int(any(bad_loss)), int(not grads_finite(model))], trainer.args.device)
        if not any(flags):
            return False
        # A non-finite loss names the micro-batches that had it (on any rank); non-finite gradients
        # with finite losses name every row of the step.
        mine = [k for (keys, _, _), bad in zip(window, bad_loss) if bad or not flags[0] for k in keys]
        keys = _gather(mine)
        names = format_rows(self.row_names(keys) if self.row_names is not None else [])
        what = "loss" if flags[0] else "gradient norm"
        step = trainer.state.global_step + 1  # the step being taken, as metrics.jsonl numbers it
        if self.mode == "skip":
            for p in model.parameters():
                p.grad = None
            self.skipped += 1
            self.skipped_since_log += 1
            if trainer.is_world_process_zero():
                log.warning("non-finite %s at step %d (rows: %s): update skipped (%d so far; %s=skip)",
                            what, step, names, self.skipped, self.key)
            return True
        ckpt = newest_complete(self.checkpoint_dir) if self.checkpoint_dir is not None else None
        raise NonFiniteError(
            f"{self.key.split('.')[0].upper()}: non-finite {what} at step {step} (rows: {names}); last good "
            f"checkpoint: {ckpt or 'none'}; lower the learning rate, check those rows, or set {self.key}=skip "
            "to drop such steps"
        )

    def adjust_log(self, global_step: int, logs: dict) -> None:
        """A training log row: its loss over the window's kept steps, and the skipped count so far."""
        if "loss" not in logs or self.last_log_step is None:
            return
        # The trainer divides by every step since its last log; skipped steps added 0.
        steps = global_step - self.last_log_step
        kept = steps - self.skipped_since_log
        if self.skipped_since_log:
            logs["loss"] = logs["loss"] * steps / kept if kept > 0 else float("nan")
        self.last_log_step, self.skipped_since_log = global_step, 0
        logs["nonfinite_skipped"] = self.skipped
