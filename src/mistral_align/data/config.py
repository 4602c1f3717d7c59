"""Typed data settings, shared by the Hydra configs (configs/data/*.yaml) and the loaders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class SourceConfig:
    # A local .jsonl / .json / .parquet file, or a Hub dataset id (e.g. HuggingFaceH4/ultrachat_200k).
    path: str = "???"
    split: str = "train"
    # Relative share of this source in a mixture; a fraction (<=1) or an absolute row count (>1).
    weight: float = 1.0
    # Hub dataset config name, if any.
    name: Optional[str] = None
    # Row shape: "auto" detects messages / prompt-chosen-rejected / ultrachat / ultrafeedback.
    format: str = "auto"


@dataclass
class DataConfig:
    train: list[SourceConfig] = field(default_factory=list)
    eval: list[SourceConfig] = field(default_factory=list)
    # Used when `eval` is empty: hold this fraction of the training rows out for evaluation.
    eval_fraction: float = 0.0
    max_length: int = 2048
    # SFT: "all" assistant messages (weight 1) are trained, or only the "last" one.
    train_on: str = "all"
    # "error": the first bad row stops the run before the model loads; "skip": drop bad rows and report them.
    on_bad_rows: str = "error"
    # Rows over max_length: "error", "skip", or "truncate" (SFT only: cut the end, keep BOS).
    on_long_rows: str = "skip"
    # Strip leading/trailing whitespace from every message. Off: mistral-common does no normalisation.
    clean_whitespace: bool = False
    num_proc: int = 1
    seed: int = 0
