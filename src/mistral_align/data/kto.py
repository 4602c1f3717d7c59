"""KTO's data: preference pairs split into rows, the rows put in a fixed random order, and the
balance of desirable and undesirable replies against the loss weights.

KTO learns from single replies marked desirable (`label` true) or undesirable (false). A preference
pair given to a KTO stage is both: its chosen reply a desirable row, its rejected reply an
undesirable row, with the same prompt (TRL's `unpair_preference_dataset` does the same).

The order matters to TRL's KTOTrainer: it reads batches in order (`train_sampling_strategy`
"sequential") because its KL term scores each row's prompt with the previous row's reply, which
must belong to another prompt. A file in order (all desirable rows first, or a pair's two halves
side by side) would give one-label batches, or a KL term measured on a matching reply; so the rows
are shuffled once, by `<stage>.data.seed`, the same on every rank and every launch.
"""

from __future__ import annotations

import datasets


def split_pairs(ds: datasets.Dataset, seed: int) -> datasets.Dataset:
    """Rows with a `rejected_ids` reply (pairs) become two rows, desirable then undesirable; every row
    keeps its other columns (its FILE:LINE among them); then all rows are shuffled once with `seed`."""

    def split(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in batch if k != "rejected_ids"}
        for i, rejected in enumerate(batch["rejected_ids"]):
            halves = [None] if not rejected else [None, rejected]
            for half in halves:
                for k in out:
                    out[k].append(batch[k][i])
                if half is not None:
                    out["completion_ids"][-1], out["label"][-1] = half, False
        return out

    rows = ds.map(split, batched=True, remove_columns=ds.column_names, desc="Splitting pairs into KTO rows")
    return rows.shuffle(seed=seed).flatten_indices() if len(rows) > 1 else rows


def counts(ds: datasets.Dataset | None) -> tuple[int, int]:
    """(desirable, undesirable) rows of split KTO data."""
    if ds is None or len(ds) == 0:
        return 0, 0
    labels = ds.with_format("arrow")["label"].to_pylist()
    return sum(labels), len(labels) - sum(labels)


# TRL's KTOTrainer warns unless desirable_weight x desirable rows / (undesirable_weight x undesirable
# rows) lies in [1, 1.33] (the KTO paper's Eq. 8), and then recommends weight ranges; the same rule here.
BALANCE_RANGE = (1.0, 1.33)


def balance_advice(desirable: int, undesirable: int, desirable_weight: float = 1.0,
                   undesirable_weight: float = 1.0) -> str | None:
    """None when the weighted balance is in TRL's recommended range; else what to set, in one sentence."""
    if desirable == 0 or undesirable == 0:
        missing = "desirable (label true)" if desirable == 0 else "undesirable (label false)"
        return f"no {missing} rows: KTO learns from both kinds"
    ratio = desirable * desirable_weight / (undesirable * undesirable_weight)
    low, high = BALANCE_RANGE
    if low <= ratio <= high:
        return None
    d_low, d_high = (undesirable * undesirable_weight / desirable * b for b in (low, high))
    u_low, u_high = (desirable * desirable_weight / undesirable / b for b in (high, low))
    return (f"{desirable} desirable vs {undesirable} undesirable rows at weights {desirable_weight:g} / "
            f"{undesirable_weight:g} is a weighted ratio of {ratio:.2f}, outside TRL's recommended "
            f"[{low:g}, {high:.2f}]: set dpo.desirable_weight in [{d_low:.2f}, {d_high:.2f}] or "
            f"dpo.undesirable_weight in [{u_low:.2f}, {u_high:.2f}] (not both)")
