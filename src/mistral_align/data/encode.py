"""The one place where a row is judged: the training loaders and `mistral-align validate` /
`preview` all call `check_row` (directly or through `encode_batch` in `Dataset.map`), so what
the CLI calls valid is exactly what training accepts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mistral_align.chat.encoder import IGNORE_INDEX, MistralEncoder
from mistral_align.chat.schema import ConversationError, Thinking, parse_preference, parse_sft_row, parse_unpaired


# Output columns of encode_batch besides the ids. KTO: a KTO row's prompt, reply and label; a pair
# given to KTO keeps its rejected reply in `rejected_ids` until the loader splits it into two rows
# (data/kto.py), after the eval split, so a pair's two halves are never on both sides of it.
ID_COLUMNS = {"sft": ("input_ids", "labels"), "dpo": ("prompt_ids", "chosen_ids", "rejected_ids"),
              "kto": ("prompt_ids", "completion_ids", "label", "rejected_ids")}
# What a bad row gets in each id column (nothing: an empty list; KTO's label: false).
_NO_ID = {"label": False}
# ... and the RowResult fields it writes beside them, one column each.
STAT_COLUMNS = ("error", "over_length", "truncated", "tokens", "trained", "length",
                "dropped_tool_calls", "dropped_tool_results", "tool_row", "thinking_row", "desirable", "undesirable")

# Report categories, matched against the reason in order (the schema's messages are stable text).
_CATEGORIES = (
    ("invalid JSON", ("invalid JSON", "invalid UTF-8")),
    ("invalid Unicode", ("not valid Unicode",)),
    ("mixed shapes", ("a row has one shape",)),
    ("not an object", ("expected a JSON object",)),
    ("over length", ("tokens, over max_length",)),
    # Tool rows (chat/schema.py, chat/tool_rules.py); before the generic kinds, whose words they may contain.
    ("bad tool call id", ("is not a valid tool call id", "is used by two calls")),
    ("bad tool arguments", ("arguments must be a JSON object",)),
    ("unknown tool", ("not among the row's tools",)),
    ("unanswered tool call", ("have no tool result",)),
    ("unmatched tool result", ("answers no call", "a second time", "where no call is waiting", "but call")),
    ("bad tool definition", ("not a valid JSON Schema", "is listed twice", "not a valid function name",
                             "'type' must be 'function'", "'strict' must be", "must be an object (a JSON Schema)")),
    ("not supported by the tokenizer", ("not supported by tokenizer",)),
    ("bad content chunk", ("thinking chunk after text", "expected a chunk")),
    ("missing field", ("missing field",)),
    ("wrong type", ("must be a string", "expected a list", "expected an object", "must be 0 or 1",
                    "must be true (a desirable reply)")),
    ("unknown role", ("unknown role",)),
    ("column of another format", ("is not read here",)),
    ("unknown field", ("unknown field", "needs the 'messages' shape")),
    ("ends with a user turn", ("ends with a user turn",)),
    ("wrong role order", ("wrong role order", "only allowed as the first", "must end with", "only a system",
                          "two system prompts", "not followed by an assistant reply", "ends with tool results")),
    ("empty content", ("empty", "no messages")),
    ("chosen equals rejected", ("the same reply",)),
    ("nothing to train", ("weight 0", "nothing would be trained", "no trained tokens")),
)


def categorize(reason: str) -> str:
    for name, needles in _CATEGORIES:
        if any(n in reason for n in needles):
            return name
    return "other"


@dataclass
class RowResult:
    ids: dict[str, list[int]] | None  # the ID_COLUMNS of the kind; None for a bad row
    error: str | None  # why the row is bad (or over length); None when it is fine
    over_length: bool = False
    truncated: bool = False
    tokens: int = 0  # every id of the row (DPO: prompt + chosen + rejected)
    trained: int = 0  # ids the loss sees (DPO: chosen + rejected)
    length: int = 0  # what max_length is compared with (DPO: prompt + the longer reply)
    # Tool calls and results the version's encoding leaves out (v2: those before the last user message).
    dropped_tool_calls: int = 0
    dropped_tool_results: int = 0
    tool_row: bool = False  # the row has tools, tool calls or tool results
    thinking_row: bool = False  # ... a reply with thinking (v13)
    desirable: int = 0  # KTO: the desirable replies the row gives (a pair: 1, and 1 undesirable)
    undesirable: int = 0


def encoded_features(kind: str):
    """The column types of encode_batch's output, stated for KTO, whose `rejected_ids` is empty in a
    source of KTO rows only (Arrow would type it as a list of nulls and refuse to mix it with pairs);
    None (inferred) for the other kinds."""
    if kind != "kto":
        return None
    from datasets import Features, Sequence, Value  # lazy: the CLI imports this module for categorize()

    ids = {c: Value("bool") if c == "label" else Sequence(Value("int64")) for c in ID_COLUMNS[kind]}
    flags = ("over_length", "truncated", "tool_row", "thinking_row")
    stats = {c: Value("string") if c == "error" else Value("bool") if c in flags else Value("int64") for c in STAT_COLUMNS}
    return Features({"line": Value("int64"), **ids, **stats})


def _kinds(messages, tools) -> dict[str, bool]:
    """Whether a parsed row holds tools and thinking (RowResult.tool_row, .thinking_row)."""
    return {"tool_row": bool(tools) or any(m.tool_calls or m.role == "tool" for m in messages),
            "thinking_row": any(isinstance(m.content, tuple) and any(isinstance(c, Thinking) for c in m.content)
                                for m in messages)}


def check_row(
    kind: str,
    text: str | None,
    encoder: MistralEncoder,
    *,
    max_length: int | None = None,
    train_on: str = "all",
    clean: bool = False,
    on_long_rows: str = "skip",
    read_error: str | None = None,
    tool_call_ids: str = "keep",
    train_thinking: bool = True,
) -> RowResult:
    """Parse, check and encode one row given as JSON text.

    `tool_call_ids="regenerate"` replaces the row's tool call ids by ids of the version's form
    (chat/tool_ids.py); "keep" checks them as written. `train_thinking=False` masks the thinking of
    SFT replies (DPO replies are compared whole).

    Over-length rows come back with `error` set and `over_length=True` unless `on_long_rows` is
    "truncate" (SFT only), in which case the end is cut (BOS kept). Truncation is refused for DPO,
    because cutting a pair can remove the reply or its EOS; the loader rejects that setting.
    """
    if read_error is not None or text is None:
        return RowResult(None, read_error or "row could not be read")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return RowResult(None, f"invalid JSON ({e.msg} at column {e.colno})")
    try:
        if kind == "sft":
            return _check_sft(row, encoder, max_length, train_on, clean, on_long_rows, tool_call_ids, train_thinking)
        if kind == "kto":
            return _check_kto(row, encoder, max_length, clean, tool_call_ids)
        return _check_dpo(row, encoder, max_length, clean, tool_call_ids)
    except ConversationError as e:
        return RowResult(None, str(e))


def _check_sft(row: Any, encoder, max_length, train_on, clean, on_long_rows, tool_call_ids, train_thinking) -> RowResult:
    conversation = parse_sft_row(row, clean, version=encoder.version, tool_call_ids=tool_call_ids)
    enc = encoder.encode_sft(conversation.messages, train_on, tools=conversation.tools, train_thinking=train_thinking)
    ids, labels = enc.input_ids, enc.labels
    facts = {"dropped_tool_calls": enc.dropped_tool_calls, "dropped_tool_results": enc.dropped_tool_results,
             **_kinds(conversation.messages, conversation.tools)}
    trained = sum(1 for x in labels if x != IGNORE_INDEX)
    if trained == 0:  # train_on="last" with a weight-0 last reply, for instance
        raise ConversationError("no trained tokens (every assistant reply that would be trained has weight 0)")
    result = RowResult({"input_ids": ids, "labels": labels}, None, tokens=len(ids), trained=trained, length=len(ids),
                       **facts)
    if max_length is not None and len(ids) > max_length:
        if on_long_rows != "truncate":
            result.error = f"{len(ids)} tokens, over max_length {max_length}"
            result.over_length = True
            return result
        # Cutting the end keeps BOS (always at position 0) and the whole beginning of the
        # conversation; the lost end may be a reply's EOS, which is the price of truncation.
        ids, labels = ids[:max_length], labels[:max_length]
        trained = sum(1 for x in labels if x != IGNORE_INDEX)
        if trained == 0:
            result.error = f"{result.length} tokens, over max_length {max_length}, and no trained tokens left after truncation"
            result.over_length = True
            return result
        result = RowResult(
            {"input_ids": ids, "labels": labels}, None, truncated=True, tokens=len(ids), trained=trained, length=len(ids),
            **facts,
        )
    return result


def _check_dpo(row: Any, encoder, max_length, clean, tool_call_ids) -> RowResult:
    if not isinstance(row, dict):
        raise ConversationError(f"expected a JSON object with 'prompt', 'chosen' and 'rejected', got {type(row).__name__}")
    pair = parse_preference(row, clean, version=encoder.version, tool_call_ids=tool_call_ids)
    enc = encoder.encode_dpo(pair)
    p, c, r = enc.prompt_ids, enc.chosen_ids, enc.rejected_ids
    length = len(p) + max(len(c), len(r))  # TRL feeds prompt+chosen and prompt+rejected
    result = RowResult(
        {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r},
        None,
        tokens=len(p) + len(c) + len(r),
        trained=len(c) + len(r),
        length=length,
        dropped_tool_calls=enc.dropped_tool_calls,
        dropped_tool_results=enc.dropped_tool_results,
        **_kinds((*pair.prompt, pair.chosen, pair.rejected), pair.tools),
    )
    if max_length is not None and length > max_length:
        result.error = f"{length} tokens, over max_length {max_length} (prompt {len(p)} + longest reply {max(len(c), len(r))})"
        result.over_length = True
    return result


def _check_kto(row: Any, encoder, max_length, clean, tool_call_ids) -> RowResult:
    """A KTO row, or a preference pair given to KTO: its chosen reply desirable, its rejected one not."""
    if isinstance(row, dict) and ("chosen" in row or "rejected" in row):
        result = _check_dpo(row, encoder, max_length, clean, tool_call_ids)
        if result.ids is not None:
            p, c, r = (result.ids[k] for k in ID_COLUMNS["dpo"])
            result.ids = {"prompt_ids": p, "completion_ids": c, "label": True, "rejected_ids": r}
            result.desirable = result.undesirable = 1
        return result
    if not isinstance(row, dict):
        raise ConversationError(f"expected a JSON object with 'prompt', 'completion' and 'label', got {type(row).__name__}")
    unpaired = parse_unpaired(row, clean, version=encoder.version, tool_call_ids=tool_call_ids)
    enc = encoder.encode_unpaired(unpaired)
    p, c = enc.prompt_ids, enc.completion_ids
    result = RowResult(
        {"prompt_ids": p, "completion_ids": c, "label": enc.label, "rejected_ids": []}, None,
        tokens=len(p) + len(c), trained=len(c), length=len(p) + len(c),
        dropped_tool_calls=enc.dropped_tool_calls, dropped_tool_results=enc.dropped_tool_results,
        desirable=int(enc.label), undesirable=int(not enc.label),
        **_kinds((*unpaired.prompt, unpaired.completion), unpaired.tools),
    )  # fmt: skip
    if max_length is not None and result.length > max_length:
        result.error = f"{result.length} tokens, over max_length {max_length} (prompt {len(p)} + reply {len(c)})"
        result.over_length = True
    return result


def encode_batch(
    batch: dict[str, list],
    *,
    kind: str,
    encoder: MistralEncoder,
    max_length: int | None,
    train_on: str,
    clean: bool,
    on_long_rows: str,
    tool_call_ids: str = "keep",
    train_thinking: bool = True,
) -> dict[str, list]:
    """`Dataset.map(batched=True)` function: the row's ids, or empty ids and the error.

    Bad rows stay in the output (with `error` set) so the loader can name every one of them.
    """
    out: dict[str, list] = {c: [] for c in ID_COLUMNS[kind]}
    for c in STAT_COLUMNS:
        out[c] = []
    for text, read_error in zip(batch["row"], batch["read_error"]):
        r = check_row(
            kind,
            text,
            encoder,
            max_length=max_length,
            train_on=train_on,
            clean=clean,
            on_long_rows=on_long_rows,
            read_error=read_error,
            tool_call_ids=tool_call_ids,
            train_thinking=train_thinking,
        )
        for c in ID_COLUMNS[kind]:
            out[c].append(r.ids[c] if r.ids is not None and r.error is None else _NO_ID.get(c, []))
        for c in STAT_COLUMNS:
            out[c].append(getattr(r, c))
    return out

