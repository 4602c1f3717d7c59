"""Reading raw rows from a source: local .jsonl / .json / .parquet files or a Hub dataset id.

Every row leaves here as a JSON string with its position, so that the checks and the encoding can
run in `datasets.Dataset.map` workers whatever the source was, and a bad row can always be named
as `FILE:LINE`. The position is the 1-based line for .jsonl files (blank lines are not rows but
still count as lines, so the number matches an editor's); for .json, .parquet and Hub datasets it
is the 1-based row number.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mistral_align.chat.schema import KTO_AS_SFT, KTO_LABEL, KTO_TAKEN
from mistral_align.errors import DataError
from mistral_align.schema.data import SourceConfig
from mistral_align.schema.rules import get

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")

# format name -> the kind of data it holds. Every row is read by its own keys (chat/schema.py,
# "row shapes"); the format names the shape for reports and lets a stage refuse the other kind of
# data before any row is checked. "messages" and "ultrachat" rows are read the same way
# (ultrachat's `prompt` / `prompt_id` columns are Hub metadata), as are "preference" and
# "ultrafeedback" (parse_preference accepts chosen/rejected conversations that repeat the prompt).
# "unpaired" rows (KTO's: prompt, completion, a true/false label) are no stage's here: both refuse
# them, saying what takes them.
FORMATS = {
    "messages": "sft",
    "ultrachat": "sft",
    "sharegpt": "sft",  # {"conversations": [{"from": "human" | "gpt" | "system", "value": ...}]}
    "prompt_completion": "sft",  # {"prompt": str, "completion": str}
    "conversational_prompt_completion": "sft",  # TRL's: {"prompt": [messages], "completion": [messages]}
    "alpaca": "sft",  # {"instruction", "input", "output"}
    "preference": "dpo",
    "implicit_prompt_preference": "dpo",  # TRL's: {"chosen": [messages], "rejected": [messages]}, no prompt
    "ultrafeedback": "dpo",
    "unpaired": "kto",  # {"prompt", "completion", "label": true | false}: KTO's thumbs-up/down replies
}
SHAPE_TEXT = {
    "messages": "'messages'",
    "ultrachat": "'messages'",
    "sharegpt": "'conversations'",
    "prompt_completion": "'prompt'/'completion'",
    "conversational_prompt_completion": "'prompt'/'completion' as message lists",
    "alpaca": "'instruction'/'input'/'output'",
    "preference": "'prompt'/'chosen'/'rejected'",
    "implicit_prompt_preference": "'chosen'/'rejected' conversations sharing their prompt",
    "ultrafeedback": "'prompt'/'chosen'/'rejected'",
    "unpaired": "'prompt'/'completion'/'label'",
}


class SourceError(DataError):
    """A source that cannot be read at all (missing file, unknown format, wrong kind of data)."""


@dataclass
class RawRows:
    label: str  # what goes before ":LINE" in messages: the path as the user wrote it
    lines: list[int]
    rows: list[str | None]  # JSON text of each row; None where the row could not be read
    read_errors: list[str | None]  # why the row could not be read (invalid JSON, bad UTF-8)
    content_hash: str  # sha256 of the file bytes, or of the Hub id + config + split
    format: str = "auto"  # detected or forced, one of FORMATS
    is_hub: bool = False
    hub_fingerprint: str | None = field(default=None, repr=False)


def is_local(path: str) -> bool:
    return path.endswith(LOCAL_SUFFIXES) or Path(path).exists()


def _read_jsonl(path: Path, data: bytes) -> tuple[list[int], list[str | None], list[str | None]]:
    lines, rows, errors = [], [], []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        lines.append(number)
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
        except UnicodeDecodeError as e:
            rows.append(None)
            errors.append(f"invalid UTF-8 ({e.reason} at byte {e.start})")
            continue
        rows.append(text)
        errors.append(None)  # JSON is parsed later, in the map workers
    return lines, rows, errors


def _strip_arrow_nulls(value: Any) -> Any:
    """Arrow gives every struct the union of all keys, with None where a row lacked one (a
    `weight` on only some messages). Drop those Nones so the row reads as it was written."""
    if isinstance(value, dict):
        return {k: _strip_arrow_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_arrow_nulls(v) for v in value]
    return value


def _rows_from_dataset(ds) -> tuple[list[int], list[str | None], list[str | None]]:
    # Shared by .parquet files and Hub datasets, so the Hub path is this plus load_dataset.
    rows = [json.dumps(_strip_arrow_nulls(r), ensure_ascii=False) for r in ds]
    return list(range(1, len(rows) + 1)), rows, [None] * len(rows)


def check_local_file(path: str | None, key: str | None = None) -> None:
    """A source's path names something: a Hub id, or a local file that is there (SourceError
    otherwise). `key`: where the config names it (`sft.data.train[0].path`), said in the message."""
    if path in (None, "", "???"):
        raise SourceError(f"{key}: a data source has no path" if key else "a data source has no path")
    if is_local(path):
        p = Path(path)
        if p.is_dir():
            raise SourceError(f"{path}: is a directory{f' ({key})' if key else ''}; name a .jsonl, .json or .parquet "
                              "file in it (several files: list each as a source)")
        if not p.is_file():
            why = [k for k in (key, None if p.is_absolute() else f"a relative path is read from {Path.cwd()}") if k]
            raise SourceError(f"{path}: no such file" + (f" ({'; '.join(why)})" if why else ""))


def check_local_files(data: Any, key: str) -> None:
    """Every source of a stage's data node (`sft.data`) is a Hub id or a file that is there, checked
    before a run starts: a missing file stops it in one line naming the source, before anything
    loads or is written."""
    for part in ("train", "eval"):
        for i, src in enumerate(get(data, part) or []):
            check_local_file(src.path, f"{key}.{part}[{i}].path")


def read_source(src: SourceConfig) -> RawRows:
    path = src.path
    check_local_file(path)
    if is_local(path):
        p = Path(path)
        data = p.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if p.suffix == ".jsonl":
            lines, rows, errors = _read_jsonl(p, data)
        elif p.suffix == ".json":
            try:
                items = json.loads(data.decode("utf-8-sig"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SourceError(f"{path}: not valid JSON ({e}); a .json file must hold one list of rows") from None
            if not isinstance(items, list):
                raise SourceError(f"{path}: a .json file must hold a list of rows, got {type(items).__name__}")
            lines = list(range(1, len(items) + 1))
            # ASCII escapes: a lone surrogate ("\ud800") cannot go into an Arrow string, but its
            # escape can, and the row check then names it like any other bad row.
            rows = [json.dumps(r) for r in items]
            errors = [None] * len(items)
        elif p.suffix == ".parquet":
            import datasets

            try:
                ds = datasets.Dataset.from_parquet(str(p), keep_in_memory=True)
            except Exception as e:  # pyarrow raises several types for a corrupt file
                raise SourceError(f"{path}: cannot read as parquet ({e})") from None
            lines, rows, errors = _rows_from_dataset(ds)
        else:
            raise SourceError(f"{path}: unsupported file type; use .jsonl, .json or .parquet")
        raw = RawRows(path, lines, rows, errors, digest)
    else:
        raw = _read_hub(src)
    if src.ignore_fields:
        drop = sorted(set(src.ignore_fields))
        _refuse_dropping_what_rows_mean(raw, drop)
        raw.rows = [_without_fields(text, drop) for text in raw.rows]
        # What is kept is part of what was read: the encoded-data cache must not serve another choice.
        raw.content_hash = hashlib.sha256(json.dumps([raw.content_hash, drop]).encode()).hexdigest()
    raw.format = detect_format(raw, src.format)
    return raw


def _json_objects(raw: RawRows):
    """(line, row) for each row that reads as a JSON object; the others fail their own checks later."""
    for line, text in zip(raw.lines, raw.rows):
        try:
            row = json.loads(text) if text is not None else None
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            yield line, row


def _refuse_dropping_what_rows_mean(raw: RawRows, drop: list[str]) -> None:
    """KTO's `label` cannot be dropped while a row says false: its completion would then be trained
    as a target. (With every label true, the rows are plain prompt/completion rows.)"""
    if "label" not in drop:
        return
    undesirable = next((line for line, row in _json_objects(raw) if row.get("label") is False), None)
    if undesirable is not None:
        raise SourceError(f"{raw.label}: ignore_fields drops 'label', which these rows hold as {KTO_LABEL} (line "
                          f"{undesirable}: false); dropped, every completion, the undesirable ones too, would be "
                          f"trained as a target. {KTO_TAKEN}; for SFT, keep only the rows whose label is true")


def _without_fields(text: str | None, drop: list[str]) -> str | None:
    """A row's JSON text without the top-level keys in `drop`; anything that is not a JSON object is
    left as it is, to fail its own check with its own message."""
    if text is None:
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError:
        return text
    if not isinstance(row, dict):
        return text
    for key in drop:
        row.pop(key, None)
    return json.dumps(row)  # ASCII escapes, as every reader here writes them


def _read_hub(src: SourceConfig) -> RawRows:
    import datasets

    try:
        ds = datasets.load_dataset(src.path, src.name, split=src.split)
    except Exception as e:  # offline, unknown id, unknown split: all user-facing
        raise SourceError(f"{src.path}: not a local file and could not be loaded from the Hub ({e})") from None
    lines, rows, errors = _rows_from_dataset(ds)
    key = json.dumps({"hub": src.path, "name": src.name, "split": src.split}, sort_keys=True)
    raw = RawRows(f"{src.path}[{src.split}]", lines, rows, errors, hashlib.sha256(key.encode()).hexdigest())
    raw.is_hub = True
    raw.hub_fingerprint = getattr(ds, "_fingerprint", None)
    return raw


def detect_format(raw: RawRows, forced: str = "auto") -> str:
    """The row shape of a source, from the keys of its first readable object row."""
    if forced != "auto":
        if forced not in FORMATS:
            raise SourceError(f"{raw.label}: unknown format {forced!r}; expected auto or one of {', '.join(FORMATS)}")
        return forced
    for text in raw.rows[:50]:
        if text is None:
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict):
            continue
        if "chosen" in row or "rejected" in row:
            if "score_chosen" in row:
                return "ultrafeedback"
            return "preference" if "prompt" in row else "implicit_prompt_preference"
        if "messages" in row:
            return "ultrachat" if "prompt_id" in row else "messages"
        if "conversations" in row:
            return "sharegpt"
        if "completion" in row and isinstance(row.get("label"), bool):
            return "unpaired"
        if "completion" in row:
            return "conversational_prompt_completion" if isinstance(row["completion"], list) else "prompt_completion"
        if "instruction" in row or "output" in row:
            return "alpaca"
    return "auto"  # nothing recognisable: every row will fail its own check with a precise reason


def check_kind(raw: RawRows, kind: str) -> None:
    """Refuse a source whose rows are another kind of data than `kind` (sft, dpo, or kto: KTO rows,
    or preference pairs that KTO splits in two)."""
    found = FORMATS.get(raw.format)
    if found == "kto" and kind != "kto":
        raise SourceError(f"{raw.label}: rows have 'prompt', 'completion' and a true/false 'label', {KTO_LABEL}: "
                          f"KTO data, not {kind.upper()} data. {KTO_TAKEN}"
                          + (f"; {KTO_AS_SFT}" if kind == "sft" else "; DPO pairs hold 'prompt', 'chosen' and 'rejected'"))
    if found and found != kind and not (kind == "kto" and found == "dpo"):
        shape = SHAPE_TEXT[raw.format]
        expected = "KTO data (prompt, completion, label) or preference pairs" if kind == "kto" else f"{kind.upper()} data"
        raise SourceError(f"{raw.label}: rows have {shape}, so this is {found.upper()} data, but {expected} was expected")
