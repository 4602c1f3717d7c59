"""Training data: read the sources, check and encode every row, mix, split, report.

Every row goes through `encode.check_row` (in `Dataset.map` workers), the same check that
`mistral-align validate` runs, so a file the CLI calls valid is one training accepts, and a bad
row is found before any model is loaded.

Mixtures: each source's `weight` picks rows from that source's *usable* rows (bad and over-length
rows removed first). A weight <= 1 is a fraction of them (1.0 = all, 0.5 = half, 0 = none); a
weight > 1 is an absolute row count (3000 = 3000 rows), repeating the whole source as often as
needed when it has fewer rows. The choice is random but reproducible: it depends only on
`cfg.seed` and the source's position in the list, and the chosen rows keep their file order.

Evaluation rows come from `cfg.eval` sources (weights apply the same way) or, when that list is
empty, `cfg.eval_fraction` of the mixed training rows is held out (seeded with `cfg.seed`): at
least one row and never all of them, so a 10-row file still trains and is evaluated (logged).

Long rows (`on_long_rows`): "skip" drops and counts them (and logs a warning), "error" raises
DataError naming them, "truncate" cuts SFT rows at the end (BOS kept). DPO refuses "truncate":
cutting a pair can remove a reply or its EOS, so a DPO config with it fails before reading.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np

from mistral_align.chat.encoder import MistralEncoder
from mistral_align.data import kto
from mistral_align.data.encode import ID_COLUMNS, categorize, encode_batch, encoded_features
from mistral_align.data.packing import packing_efficiency
from mistral_align.data.read import RawRows, SourceError, check_kind, read_source
from mistral_align.errors import DataError
from mistral_align.schema.data import DataConfig, SourceConfig, check_data_config

log = logging.getLogger(__name__)

MAX_LISTED = 20
ROW_COLUMN = "row_origin"
# Bump when the meaning of the cached columns changes in a way the code hash cannot see.
CACHE_VERSION = "1"


@dataclass
class LoadedData:
    # SFT: input_ids, labels; DPO: prompt_ids, chosen_ids, rejected_ids; KTO: prompt_ids, completion_ids, label
    train: datasets.Dataset
    eval: datasets.Dataset | None
    report: dict
    fingerprint: str  # sha256 of the sources' content (Hub: id + config + split) and the data settings
    # Every bad or over-length row as "FILE:LINE: reason", in source order (the report keeps a few).
    problems: list[str] = field(default_factory=list)
    # Where each training row came from, as "FILE:LINE" (Hub: "ID[SPLIT]:ROW"), aligned with `train`.
    # Kept beside the dataset, never in it, so nothing but the ids reaches the trainer; a step whose
    # loss is not finite names its rows with it (train/nonfinite.py).
    train_rows: list[str] | None = None


def load_sft_dataset(cfg: DataConfig, encoder: MistralEncoder) -> LoadedData:
    return load_data("sft", cfg, encoder)


def load_dpo_dataset(cfg: DataConfig, encoder: MistralEncoder) -> LoadedData:
    return load_data("dpo", cfg, encoder)


def load_kto_dataset(cfg: DataConfig, encoder: MistralEncoder) -> LoadedData:
    """KTO rows, and preference pairs split into a desirable and an undesirable row (data/kto.py)."""
    return load_data("kto", cfg, encoder)


def format_problems(problems: list[str], limit: int = MAX_LISTED) -> str:
    lines = problems[:limit]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more")
    return "\n".join(lines)


# -- one source ---------------------------------------------------------------------------------


def _col(ds: datasets.Dataset, name: str) -> list:
    # A whole column as a list in one Arrow call (honouring select()'s indices); iterating
    # `ds[name]` goes row by row and cost more than the tokenization in the benchmark.
    return ds.with_format("arrow")[name].to_pylist()


@dataclass
class _Source:
    raw: RawRows
    encoded: datasets.Dataset  # one row per input row, bad ones included (with `error`)
    problems: list[str]
    categories: Counter
    long_rows: int
    bad_rows: int


def _settings(kind: str, cfg: DataConfig, encoder: MistralEncoder) -> dict:
    """The settings that change the ids (num_proc does not), the tokenizer file's content among them."""
    return {
        "kind": kind,
        "tokenizer": encoder.version,
        "tokenizer_sha256": encoder.file_sha256,
        "max_length": cfg.max_length,
        "train_on": getattr(cfg, "train_on", "all") if kind == "sft" else None,
        "train_thinking": getattr(cfg, "train_thinking", True) if kind == "sft" else None,
        "on_long_rows": cfg.on_long_rows,
        "clean_whitespace": cfg.clean_whitespace,
        "tool_call_ids": getattr(cfg, "tool_call_ids", "keep"),
    }


def _code_hash() -> str:
    # The cache must not outlive a change to how rows are parsed or encoded.
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(CACHE_VERSION.encode())
    for rel in ("chat/messages.py", "chat/schema.py", "chat/tool_rules.py", "chat/tool_ids.py", "chat/to_mistral.py",
                "chat/encoder.py", "data/encode.py", "data/read.py"):
        h.update((root / rel).read_bytes())
    return h.hexdigest()


def _cache_file(raw: RawRows, settings: dict) -> str | None:
    """A cache path for the encoded source, or None when caching is off (datasets.disable_caching())."""
    if not datasets.is_caching_enabled():
        return None
    key = json.dumps(
        {"content": raw.content_hash, "hub": raw.hub_fingerprint, "settings": settings, "code": _code_hash()},
        sort_keys=True,
    )
    folder = Path(datasets.config.HF_DATASETS_CACHE) / "mistral_align"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"encoded-{hashlib.sha256(key.encode()).hexdigest()[:32]}.arrow")


def _encode_source(src: SourceConfig, kind: str, cfg: DataConfig, encoder: MistralEncoder, settings: dict) -> _Source:
    raw = read_source(src)
    if not raw.rows:  # said here, not later as "0 rows left" or an eval split of nothing
        raise SourceError(f"{raw.label}: has no rows")
    check_kind(raw, kind)
    table = datasets.Dataset.from_dict({"line": raw.lines, "row": raw.rows, "read_error": raw.read_errors})
    fn_kwargs = {
        "kind": kind,
        "encoder": encoder,
        "max_length": cfg.max_length,
        "train_on": getattr(cfg, "train_on", "all"),
        "clean": cfg.clean_whitespace,
        "on_long_rows": cfg.on_long_rows,
        "tool_call_ids": getattr(cfg, "tool_call_ids", "keep"),
        "train_thinking": getattr(cfg, "train_thinking", True),
    }
    if len(table) == 0:  # map() on no rows adds no columns; build the empty columns directly
        empty = {"line": [], **encode_batch({"row": [], "read_error": []}, **fn_kwargs)}
        return _Source(raw, datasets.Dataset.from_dict(empty), [], Counter(), 0, 0)
    num_proc = cfg.num_proc if cfg.num_proc and cfg.num_proc > 1 and len(table) >= cfg.num_proc else None
    encoded = table.map(
        encode_batch,
        batched=True,
        batch_size=256,
        num_proc=num_proc,
        remove_columns=["row", "read_error"],
        fn_kwargs=fn_kwargs,
        cache_file_name=_cache_file(raw, settings),
        features=encoded_features(kind),
        desc=f"Checking and tokenizing {raw.label}",
    )
    errors = _col(encoded, "error")
    lines = _col(encoded, "line")
    over = _col(encoded, "over_length")
    problems, categories = [], Counter()
    for line, err in zip(lines, errors):
        if err is not None:
            problems.append(f"{raw.label}:{line}: {err}")
            categories[categorize(err)] += 1
    long_rows = sum(1 for o, e in zip(over, errors) if o and e is not None)
    return _Source(raw, encoded, problems, categories, long_rows, len(problems) - long_rows)


def _pick(n: int, weight: float, seed: int, position: int) -> np.ndarray:
    """Row indices for one source: weight <= 1 a fraction, > 1 an absolute count (repeats allowed)."""
    rng = np.random.default_rng([seed, position])
    if weight <= 1:
        k = int(round(weight * n))
        return np.sort(rng.choice(n, size=k, replace=False)) if k < n else np.arange(n)
    k = int(round(weight))
    if n == 0:
        return np.arange(0)
    whole, rest = divmod(k, n)
    parts = [np.arange(n)] * whole + [np.sort(rng.choice(n, size=rest, replace=False))]
    return np.concatenate(parts).astype(np.int64)


def _mix(sources: list[_Source], specs: list[SourceConfig], kind: str, seed: int, offset: int):
    parts, kept = [], []
    for i, (s, spec) in enumerate(zip(sources, specs)):
        usable = [j for j, e in enumerate(_col(s.encoded, "error")) if e is None]
        pick = _pick(len(usable), spec.weight, seed, offset + i)
        # Each row's origin travels with it through the mix and the eval split (dropped at the end).
        # Added before select(): on a table without an indices mapping it is one new column, not a copy.
        labelled = s.encoded.add_column(ROW_COLUMN, [f"{s.raw.label}:{line}" for line in _col(s.encoded, "line")])
        rows = labelled.select([usable[j] for j in pick])
        kept.append(len(rows))
        parts.append(rows)
    mixed = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return mixed, kept


# Summed over the kept rows, in each split's report and at the top of the data report. KTO: the
# desirable and undesirable replies (a pair gives one of each).
_ROW_COUNTS = {"tool_rows": "tool_row", "thinking_rows": "thinking_row",
               "dropped_tool_calls": "dropped_tool_calls", "dropped_tool_results": "dropped_tool_results",
               "desirable": "desirable", "undesirable": "undesirable"}


def _stats(ds: datasets.Dataset | None) -> dict:
    if ds is None:
        return {"rows": 0, "tokens": 0, "trained_tokens": 0, "truncated_rows": 0, **dict.fromkeys(_ROW_COUNTS, 0)}
    return {
        "rows": len(ds),
        "tokens": int(sum(_col(ds, "tokens"))),
        "trained_tokens": int(sum(_col(ds, "trained"))),
        "truncated_rows": int(sum(_col(ds, "truncated"))),
        # Rows with tools or thinking; the calls and results the version's encoding leaves out
        # (v2: those before the last user message, which mistral-common encodes as nothing).
        **{name: int(sum(_col(ds, column))) for name, column in _ROW_COUNTS.items()},
    }


def _source_report(s: _Source, kept: int, spec: SourceConfig) -> dict:
    return {
        "path": spec.path,
        "split": spec.split if s.raw.is_hub else None,
        "format": s.raw.format,
        "weight": spec.weight,
        "rows_read": len(s.encoded),
        "bad_rows": s.bad_rows,
        "over_length_rows": s.long_rows,
        "rows_kept": kept,
    }


def load_data(
    kind: str, cfg: DataConfig, encoder: MistralEncoder, *, warn: bool = True, allow_empty: bool = False
) -> LoadedData:
    """Shared body of load_sft_dataset / load_dpo_dataset (see the module docstring).

    `warn=False` and `allow_empty=True` are for `mistral-align validate`, which reports instead.
    """
    check_data_config(cfg, kind)
    settings = _settings(kind, cfg, encoder)
    try:
        train_sources = [_encode_source(s, kind, cfg, encoder, settings) for s in cfg.train]
        eval_sources = [_encode_source(s, kind, cfg, encoder, settings) for s in cfg.eval]
    except SourceError as e:
        raise DataError(str(e), [str(e)]) from None
    all_sources = train_sources + eval_sources

    bad = [p for s in all_sources for p, is_long in _tagged(s) if not is_long]
    long = [p for s in all_sources for p, is_long in _tagged(s) if is_long]
    problems = [p for s in all_sources for p in s.problems]
    fatal = (bad if cfg.on_bad_rows == "error" else []) + (long if cfg.on_long_rows == "error" else [])
    if fatal:
        hints = []
        if cfg.on_bad_rows == "error" and bad:
            hints.append(f"fix them, or set {kind}.data.on_bad_rows=skip to drop them")
        if cfg.on_long_rows == "error" and long:
            hints.append(f"raise {kind}.data.max_length (now {cfg.max_length}) or set {kind}.data.on_long_rows=skip")
        raise DataError(
            f"{len(fatal)} bad row(s) in the {kind.upper()} data ({'; '.join(hints)}):\n" + format_problems(fatal),
            fatal,
        )

    train, train_kept = _mix(train_sources, cfg.train, kind, cfg.seed, 0)
    eval_ds, eval_kept = None, []
    if eval_sources:
        eval_ds, eval_kept = _mix(eval_sources, cfg.eval, kind, cfg.seed, len(train_sources))
    elif cfg.eval_fraction > 0:
        n_eval = _eval_rows(len(train), cfg.eval_fraction, kind)
        if n_eval:
            split = train.train_test_split(test_size=n_eval, seed=cfg.seed, shuffle=True)
            train, eval_ds = split["train"], split["test"]
    if len(train) == 0 and not allow_empty:
        raise DataError(
            f"no {kind.upper()} training rows left: read {sum(len(s.encoded) for s in train_sources)}, "
            f"{sum(s.bad_rows for s in train_sources)} bad, {sum(s.long_rows for s in train_sources)} over max_length "
            f"{cfg.max_length}, weights {[s.weight for s in cfg.train]}\n" + format_problems(problems)
        )

    skipped = Counter()
    for s in all_sources:
        skipped.update(s.categories)
    train_stats, eval_stats = _stats(train), _stats(eval_ds)
    report = {
        "kind": kind,
        "tokenizer": encoder.version,
        "max_length": cfg.max_length,
        "rows_read": sum(len(s.encoded) for s in all_sources),
        "rows_kept": train_stats["rows"] + eval_stats["rows"],
        "bad_rows": len(bad),
        "over_length_rows": len(long),
        "skipped_rows": len(problems),
        "skipped_by_reason": dict(sorted(skipped.items())),
        "skipped_examples": problems[:MAX_LISTED],
        "truncated_rows": train_stats["truncated_rows"] + eval_stats["truncated_rows"],
        "train": train_stats,
        "eval": eval_stats if eval_ds is not None else None,
        "tokens": train_stats["tokens"],
        "trained_tokens": train_stats["trained_tokens"],
        **{name: train_stats[name] + eval_stats[name] for name in _ROW_COUNTS},
        # What SFT training will get from TRL's bfd packing; DPO rows are not packed.
        "packing_efficiency": packing_efficiency(_col(train, "length"), cfg.max_length) if kind == "sft" else None,
        "sources": [_source_report(s, k, spec) for s, k, spec in zip(train_sources, train_kept, cfg.train)],
        "eval_sources": [_source_report(s, k, spec) for s, k, spec in zip(eval_sources, eval_kept, cfg.eval)],
    }
    if problems and warn:
        log.warning(
            "%s data: skipped %d of %d rows (%s); first: %s",
            kind.upper(),
            len(problems),
            report["rows_read"],
            ", ".join(f"{n} {r}" for r, n in sorted(skipped.items())),
            problems[0],
        )

    if kind == "kto":  # after the eval split: a pair's two halves stay on one side of it
        train = kto.split_pairs(train, cfg.seed)
        eval_ds = kto.split_pairs(eval_ds, cfg.seed) if eval_ds is not None else None
    keep = [c for c in ID_COLUMNS[kind] if c != "rejected_ids" or kind == "dpo"]
    train_rows = _col(train, ROW_COLUMN) if len(train) else []
    train = train.select_columns(keep)
    eval_ds = eval_ds.select_columns(keep) if eval_ds is not None else None
    return LoadedData(train, eval_ds, report, _fingerprint(all_sources, cfg, settings), problems, train_rows)


def _eval_rows(n: int, fraction: float, kind: str) -> int:
    """How many of `n` training rows `eval_fraction` holds out: the fraction, rounded, but at least
    one and never all of them. Small data (the README's example files have 10 rows, whose 2% rounds
    to 0) still trains and is still evaluated; the note says what was done instead of the fraction."""
    want = int(round(fraction * n))
    n_eval = min(max(want, 1), n - 1) if n >= 2 else 0
    if n_eval != want:
        held = f"holding out {n_eval} row(s) for evaluation" if n_eval else "no evaluation split"
        log.info("%s data: %s.data.eval_fraction=%g of %d training row(s) is %g rows: %s (list %s.data.eval "
                 "sources to choose them)", kind.upper(), kind, fraction, n, fraction * n, held, kind)
    return n_eval


def _tagged(s: _Source):
    over = _col(s.encoded, "over_length")
    errors = _col(s.encoded, "error")
    it = iter(s.problems)
    for o, e in zip(over, errors):
        if e is not None:
            yield next(it), bool(o)


def _fingerprint(sources: list[_Source], cfg: DataConfig, settings: dict) -> str:
    doc = {
        "settings": settings,
        "seed": cfg.seed,
        "eval_fraction": cfg.eval_fraction if not cfg.eval else None,
        "train": [_source_key(s, spec) for s, spec in zip(sources, cfg.train)],
        "eval": [_source_key(s, spec) for s, spec in zip(sources[len(cfg.train) :], cfg.eval)],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _source_key(s: _Source, spec: SourceConfig) -> dict:
    # The path itself is left out on purpose: moving a file does not change the data.
    return {"content": s.raw.content_hash, "weight": spec.weight, "format": s.raw.format}
