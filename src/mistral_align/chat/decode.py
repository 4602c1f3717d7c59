"""A generated reply's ids back into an assistant message: its text, thinking and tool calls.

The ids are read by mistral-common's own decoding of its formats (what its reference server does
with a model's output, `mistral_common.experimental.app.routers.detokenize_to_assistant_message`):
`_split_content_and_tool_calls` at [TOOL_CALLS], `_decode_tool_calls` for the version's call
layout (a JSON list on v2-v7, `name[CALL_ID]id[ARGS]{...}` on v11, `name[ARGS]{...}` on v13),
`_split_content_and_think_chunks` at [THINK]/[/THINK] on v13. Those functions live in
mistral-common's `experimental` package; tests/test_chat_tools_serving.py decodes every version's
encoded replies with them, so a change there fails a test rather than a chat.

Calls come back in the schema's normal form (arguments as `json.dumps(..., ensure_ascii=False)`
text). Versions whose layout has no call id (v2, v13) give the id "null"; `name_calls` gives such
calls (and any id the version would refuse) ids of the version's form, so that a tool result can
answer them.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Sequence

from mistral_align.chat.messages import ConversationError, Message, Text, Thinking, ToolCall
from mistral_align.chat.tool_rules import id_rule


def decode_reply(encoder, ids: Sequence[int]) -> Message:
    """The assistant message that `ids` (a generated reply, its EOS included or not) encode.
    Raises ConversationError when they hold a tool call that is not one (no JSON object, no [ARGS])."""
    from mistral_common.experimental.tools import _decode_tool_calls, _split_content_and_tool_calls

    raw = encoder.raw
    ids = [int(i) for i in ids]
    if ids and ids[-1] == encoder.eos_id:
        ids = ids[:-1]
    if encoder.version == "v1":  # no tool calls
        return Message("assistant", raw.decode(ids))
    content_ids, call_ids = _split_content_and_tool_calls(ids, raw.get_special_token("[TOOL_CALLS]"))
    try:
        calls = tuple(_normal(c) for c in _decode_tool_calls(call_ids, raw))
    except (ValueError, json.JSONDecodeError) as e:  # mistral-common's InvalidToolCallError is a ValueError
        raise ConversationError(f"the reply holds a tool call that is not one ({e})") from None
    return Message("assistant", _content(encoder, content_ids), tool_calls=calls)


def _normal(call) -> ToolCall:
    arguments = call.function.arguments
    value = json.loads(arguments) if isinstance(arguments, str) else arguments
    return ToolCall(call.id, call.function.name, json.dumps(value, ensure_ascii=False))


def _content(encoder, ids: list[int]) -> str | tuple:
    from mistral_common.experimental.think import _split_content_and_think_chunks

    raw = encoder.raw
    if encoder.version != "v13":
        return raw.decode(ids)
    think, end = raw.get_special_token("[THINK]"), raw.get_special_token("[/THINK]")
    try:
        parts = _split_content_and_think_chunks(ids, think, end)
    except ValueError as e:
        raise ConversationError(f"the reply's thinking is not well formed ({e})") from None
    # decode() leaves the control tokens out (mistral-common's default policy), [THINK] and [/THINK] too.
    chunks = [Thinking(raw.decode(part)) if is_think else Text(raw.decode(part)) for part, is_think in parts]
    chunks = [c for c in chunks if (c.thinking if isinstance(c, Thinking) else c.text)]
    if not any(isinstance(c, Thinking) for c in chunks):
        return "".join(c.text for c in chunks)
    return tuple(chunks)


def name_calls(message: Message, version: str, taken: set[str]) -> Message:
    """`message` with each call that has no id the version accepts (v2 and v13 layouts carry none:
    mistral-common decodes them as "null") given a new one, unused in `taken` (which grows)."""
    from mistral_align.chat.tool_ids import ALPHABET, ID_LENGTH

    valid = id_rule(version)
    calls = []
    for call in message.tool_calls:
        call_id = call.id
        if call_id == "null" or not valid(call_id) or call_id in taken:
            n = len(taken)
            while True:
                call_id = "".join(ALPHABET[(n // len(ALPHABET) ** k) % len(ALPHABET)] for k in range(ID_LENGTH))
                if call_id not in taken:
                    break
                n += 1
        taken.add(call_id)
        calls.append(replace(call, id=call_id))
    return replace(message, tool_calls=tuple(calls))


def call_json(call: ToolCall) -> dict:
    """A call in the OpenAI shape the data rows use (arguments as an object)."""
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": json.loads(call.arguments)}}
