"""`tool_call_ids: regenerate`: give a row's tool calls ids that the tokenizer version accepts.

Real data carries ids such as "call_abc123def456" (OpenAI's form), which v3 to v11 refuse: their
ids are exactly 9 letters or digits, and the model learns to write them. Regenerating replaces
every call id by such an id, and every result's tool_call_id by the new id of the call it
answers. The new ids come from a SHA-256 digest of the whole parsed row and each call's position
in it, so the same row always gets the same ids (in every process and on every rank, unlike
Python's hash), and two calls of a row never share one. The 9-character form is valid for every
version that has tools (v2 and v13 accept any non-empty id).
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import replace
from typing import TypeVar

from mistral_align.chat.messages import Conversation, Message, Preference
from mistral_align.chat.tool_rules import TOOL_VERSIONS, id_rule
from mistral_align.names import TOOL_CALL_IDS  # noqa: F401  (re-exported: the schema checks rows against it)

ALPHABET = string.ascii_letters + string.digits
ID_LENGTH = 9

Row = TypeVar("Row", Conversation, Preference)


class _Ids:
    """New ids for one row, in the order its calls are met."""

    def __init__(self, row: Conversation | Preference):
        # repr of the frozen dataclasses is plain, ordered text of everything the row holds.
        self.seed = hashlib.sha256(repr(row).encode("utf-8")).digest()
        self.used: set[str] = set()
        self.count = 0

    def next(self) -> str:
        while True:
            digest = hashlib.sha256(self.seed + self.count.to_bytes(8, "big")).digest()
            self.count += 1
            number = int.from_bytes(digest, "big")
            new = "".join(ALPHABET[(number // len(ALPHABET) ** k) % len(ALPHABET)] for k in range(ID_LENGTH))
            if new not in self.used:  # a clash of 62**9 ids is unlikely, but must not pair the wrong result
                self.used.add(new)
                return new


def _renamed(messages: tuple[Message, ...], ids: _Ids) -> tuple[Message, ...]:
    """Messages with new call ids; each result takes the new id of the call it answers, which is
    a call of the last calling message before it (ids may repeat between turns of a row)."""
    out = []
    latest: dict[str, str] = {}
    for m in messages:
        if m.tool_calls:
            latest = {c.id: ids.next() for c in m.tool_calls}
            m = replace(m, tool_calls=tuple(replace(c, id=latest[c.id]) for c in m.tool_calls))
        elif m.role == "tool":
            m = replace(m, tool_call_id=latest[m.tool_call_id])
        out.append(m)
    return tuple(out)


def regenerate_tool_call_ids(row: Row, version: str) -> Row:
    """`row` with every tool call id replaced by one of `version`'s form (see above)."""
    if version not in TOOL_VERSIONS:
        raise ValueError(f"tokenizer {version!r} has no tool calls; expected one of {', '.join(sorted(TOOL_VERSIONS))}")
    ids = _Ids(row)
    if isinstance(row, Conversation):
        out = replace(row, messages=_renamed(row.messages, ids))
    else:
        prompt = _renamed(row.prompt, ids)
        # Each reply follows the prompt alone, so both start from the ids after the prompt's: the
        # k-th call of either reply gets the same id, and ids are no difference the pair teaches.
        after_prompt = (ids.count, set(ids.used))
        chosen = _renamed((row.chosen,), ids)[0]
        ids.count, ids.used = after_prompt
        rejected = _renamed((row.rejected,), ids)[0]
        out = replace(row, prompt=prompt, chosen=chosen, rejected=rejected)
    assert all(id_rule(version)(c.id) for m in _messages(out) for c in m.tool_calls)
    return out


def _messages(row: Conversation | Preference) -> tuple[Message, ...]:
    if isinstance(row, Conversation):
        return row.messages
    return (*row.prompt, row.chosen, row.rejected)
