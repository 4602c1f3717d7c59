"""How full the packed training rows will be, computed with the very function training uses."""

from __future__ import annotations

from typing import Sequence


def packing_efficiency(lengths: Sequence[int], max_length: int) -> float:
    """Real tokens / (packed rows * max_length) for sequences of these lengths.

    Runs TRL's `pack_dataset(..., strategy="bfd")` (what SFT training calls, with its default
    map batch size) on a dataset of dummy sequences of these lengths, so the figure is the one
    training gets, not an estimate. Sequences longer than `max_length` count as `max_length`
    tokens, because bfd truncates them. Returns 0.0 for no sequences.
    """
    import datasets
    import numpy as np
    import pyarrow as pa
    from trl.data_utils import pack_dataset

    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    lengths = [int(n) for n in lengths if n > 0]
    if not lengths:
        return 0.0
    # Only lengths matter to bfd: a list column over null values has the right lengths and no
    # value buffer, so a corpus of billions of tokens costs only its offsets here.
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    column = pa.LargeListArray.from_arrays(pa.array(offsets), pa.nulls(int(offsets[-1]), pa.int32()))
    ds = datasets.Dataset(pa.table({"input_ids": column}))
    with _quiet_progress():
        packed = pack_dataset(ds, seq_length=max_length, strategy="bfd")
    real = sum(min(n, max_length) for n in lengths)
    return real / (len(packed) * max_length)


class _quiet_progress:
    # Packing a column of lengths takes milliseconds; a progress bar for it is noise.
    def __enter__(self):
        from datasets.utils import logging as dlog

        self.was_enabled = dlog.is_progress_bar_enabled()
        dlog.disable_progress_bar()

    def __exit__(self, *exc):
        from datasets.utils import logging as dlog

        if self.was_enabled:
            dlog.enable_progress_bar()
