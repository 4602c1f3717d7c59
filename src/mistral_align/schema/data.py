"""A stage's data node (`sft.data`, `dpo.data`): its sources and how rows are read, checked and cut.

`DataConfig` is a DPO stage's `dpo.data`; `SFTDataConfig` (with `train_on`) is `sft.data`. The
presets in configs/data/*.yaml fill them. `check_data_config` holds every range and choice rule, so
the recipes check them before anything loads and the loaders (and `mistral-align validate`) apply
the very same rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from mistral_align.errors import ConfigError
from mistral_align.names import TOOL_CALL_IDS
from mistral_align.schema.rules import choice, get

ON_BAD_ROWS = ("error", "skip")
ON_LONG_ROWS = ("error", "skip", "truncate")
TRAIN_ON = ("all", "last")
# What a data node holds: chat conversations (sft), preference pairs (dpo), or KTO's single replies
# marked desirable or not (kto). A preference stage with dpo.objective=kto also takes pairs (each
# split into a desirable and an undesirable row).
KINDS = ("sft", "dpo", "kto")
TAKES = {"sft": ("sft",), "dpo": ("dpo",), "kto": ("kto", "dpo")}
HOLDS = {"sft": "chat conversations (SFT)", "dpo": "preference pairs (DPO)",
         "kto": "single replies marked desirable or not (KTO)"}
WANTS = {"sft": "chat conversations", "dpo": "preference pairs",
         "kto": "single replies marked desirable or not, or preference pairs (split in two)"}
STAGE_OF = {"sft": "SFT stage", "dpo": "DPO stage", "kto": "preference stage with dpo.objective=kto"}
HINT = {"sft": "pick e.g. data@sft.data=ultrachat or example",
        "dpo": "pick e.g. data@dpo.data=ultrafeedback or example_dpo; KTO rows need dpo.objective=kto",
        "kto": "pick e.g. data@dpo.data=ultrafeedback"}


@dataclass
class SourceConfig:
    # A local .jsonl / .json / .parquet file, or a Hub dataset id (e.g. HuggingFaceH4/ultrachat_200k).
    path: str = "???"
    split: str = "train"  # the Hub dataset's split (datasets' split name); unused for a local file
    # Relative share of this source in a mixture; a fraction (<=1) or an absolute row count (>1).
    weight: float = 1.0
    # Hub dataset config name, if any.
    name: Optional[str] = None
    # Row shape: "auto" detects messages / prompt-chosen-rejected / ultrachat / ultrafeedback.
    format: str = "auto"
    # Top-level keys to drop from every row of this source before it is checked: the extra columns of
    # a dataset (scores, ids, metadata), which are otherwise refused by name.
    ignore_fields: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    # What the sources hold, where a data preset knows it (sft | dpo | kto); a stage refuses the other kinds
    # before anything loads. Left null for your own files: their rows are checked when read.
    kind: Optional[str] = None
    train: list[SourceConfig] = field(default_factory=list)
    eval: list[SourceConfig] = field(default_factory=list)
    # Used when `eval` is empty: hold this fraction of the training rows out for evaluation.
    eval_fraction: float = 0.0
    # The most tokens a row may have, > 0 (SFT: the whole conversation; pairs: the prompt + the longer reply;
    # KTO: the prompt + the reply); longer rows go as on_long_rows says. Also the trainer's sequence
    # length unless the stage's train.max_length is set.
    max_length: int = 2048
    # "error": the first bad row stops the run before the model loads; "skip": drop bad rows and report them.
    on_bad_rows: str = "error"
    # Rows over max_length: "error", "skip", or "truncate" (SFT only: cut the end, keep BOS).
    on_long_rows: str = "skip"
    # Strip leading/trailing whitespace from every message. Off: mistral-common does no normalisation.
    clean_whitespace: bool = False
    # Tool call ids: "keep" them as written (an id the tokenizer version refuses is a bad row), or
    # "regenerate" every row's ids in the version's form (the same for the same row every time).
    tool_call_ids: str = "keep"
    # Processes that check and encode a source's rows (datasets' map num_proc), >= 1; 1, or a source with fewer
    # rows than this, encodes in this process. The ids are the same either way.
    num_proc: int = 1
    # Seeds the rows a source weight picks, the eval_fraction hold-out and the one shuffle of KTO's rows.
    seed: int = 0


@dataclass
class SFTDataConfig(DataConfig):
    # "all" assistant messages (weight 1) are trained, or only the "last" one.
    train_on: str = "all"
    # v13 reasoning: train the thinking block ([THINK]...[/THINK]) of each trained reply, or mask it
    # (false: the model learns the answer after given thinking, not the thinking).
    train_thinking: bool = True


def check_data_config(cfg: Any, kind: str, key: str = "data", need_train: bool = True) -> None:
    """Raise ConfigError (naming `<key>.<field>`) for a data node that cannot work for `kind` data."""
    declared = get(cfg, "kind")
    if declared is not None and declared not in KINDS:
        raise ConfigError(f"{key}.kind: {declared!r} is not one of {', '.join(KINDS)}")
    if declared is not None and declared not in TAKES[kind]:
        raise ConfigError(f"{key}: this data preset holds {HOLDS[declared]}, but the {STAGE_OF[kind]} trains on "
                          f"{WANTS[kind]} ({HINT[kind]})")
    if cfg.on_bad_rows not in ON_BAD_ROWS:
        raise ConfigError(f"{key}.on_bad_rows: {cfg.on_bad_rows!r} is not one of {', '.join(ON_BAD_ROWS)}")
    if cfg.on_long_rows not in ON_LONG_ROWS:
        raise ConfigError(f"{key}.on_long_rows: {cfg.on_long_rows!r} is not one of {', '.join(ON_LONG_ROWS)}")
    if kind in ("dpo", "kto") and cfg.on_long_rows == "truncate":
        raise ConfigError(
            f"{key}.on_long_rows: 'truncate' is for SFT only: cutting a preference pair can drop a reply or its "
            f"EOS. Use 'skip' (count and drop them) or 'error', or raise {key}.max_length."
        )
    choice(get(cfg, "tool_call_ids", "keep"), f"{key}.tool_call_ids", TOOL_CALL_IDS)
    if not isinstance(get(cfg, "train_thinking", True), bool):
        raise ConfigError(f"{key}.train_thinking: must be true or false, got {get(cfg, 'train_thinking')!r}")
    train_on = get(cfg, "train_on", "all")
    if train_on not in TRAIN_ON:
        raise ConfigError(f"{key}.train_on: {train_on!r} is not one of {', '.join(TRAIN_ON)}")
    if need_train and not cfg.train:
        raise ConfigError(f"{key}.train: lists no sources")
    if not 0 <= cfg.eval_fraction < 1:
        raise ConfigError(f"{key}.eval_fraction: must be in [0, 1), got {cfg.eval_fraction}")
    if cfg.max_length <= 0:
        raise ConfigError(f"{key}.max_length: must be > 0, got {cfg.max_length}")
    if cfg.num_proc < 1:
        raise ConfigError(f"{key}.num_proc: must be >= 1, got {cfg.num_proc}")
    for part in ("train", "eval"):
        for i, s in enumerate(get(cfg, part) or []):
            if s.weight < 0:
                raise ConfigError(f"{key}.{part}[{i}].weight: must be >= 0, got {s.weight} ({s.path})")
