"""packing_efficiency reports what TRL's bfd packing gives training."""

from __future__ import annotations

import random

import datasets
import pytest
from trl.data_utils import pack_dataset

from mistral_align.data.packing import packing_efficiency


def test_known_small_case():
    # bfd on [5, 2, 3, 1] at 4: [5->4], [3, 1], [2] -> 10 real tokens over 3 rows of 4.
    assert packing_efficiency([5, 2, 3, 1], 4) == pytest.approx(10 / 12)


def test_perfect_fit_and_empty():
    assert packing_efficiency([4, 4, 2, 2], 4) == 1.0
    assert packing_efficiency([], 8) == 0.0


def test_equals_packing_real_token_ids():
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(2500)]  # over one map batch of 1000
    ds = datasets.Dataset.from_dict({"input_ids": [[7] * n for n in lengths], "labels": [[7] * n for n in lengths]})
    packed = pack_dataset(ds, seq_length=512, strategy="bfd")
    real = sum(len(x) for x in packed["input_ids"])
    assert packing_efficiency(lengths, 512) == pytest.approx(real / (len(packed) * 512))


def test_bad_max_length():
    with pytest.raises(ValueError):
        packing_efficiency([1], 0)
