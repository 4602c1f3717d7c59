"""Our parsed messages as mistral-common's message objects, for its per-message encoders.

mistral-common's `encode_chat_completion` normalises a request (its InstructRequestNormalizer)
and then walks the messages, calling one encoder per message. chat/encoder.py makes that walk
over our messages, so that it can decide each message's loss mask as it encodes it; here each
message gets the form that the normaliser of the version gives it:

- call arguments: JSON text as json.dumps(json.loads(arguments), ensure_ascii=False) (the schema
  stores them so already);
- assistant text chunks: empty ones dropped, neighbours joined by a blank line (the schema too);
- tool results on v1-v3 (v3-tekken too): content that parses as JSON is re-written the same way,
  and an empty one becomes "{}"; from v7 on the text is kept as written;
- tool results on v11 and v13: each run of results in the order of the calls they answer.

The encoder imports this module when it builds a tokenizer, not when it is itself imported:
mistral-common takes a noticeable part of a second to import, and the CLI imports the encoder
module for its list of versions.
"""

from __future__ import annotations

import json
from typing import Sequence

from mistral_common.protocol.instruct.chunk import TextChunk, ThinkChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ModelSettings
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall
from mistral_common.protocol.instruct.tool_calls import Tool as MistralTool
from mistral_common.protocol.instruct.tool_calls import ToolCall as MistralToolCall

from mistral_align.chat.messages import Message, Thinking, Tool

# mistral-common's own version names (TokenizerVersion values), not ours: v3-tekken is "v3".
JSON_RESULT_VERSIONS = frozenset({"v1", "v2", "v3"})
CALL_ORDER_VERSIONS = frozenset({"v11", "v13"})
NO_SETTINGS = ModelSettings.none()


def tools(available: Sequence[Tool]) -> list[MistralTool] | None:
    if not available:
        return None
    return [MistralTool(function=Function(name=t.name, description=t.description, parameters=json.loads(t.parameters)))
            for t in available]


def system(m: Message) -> SystemMessage:
    return SystemMessage(content=m.content)


def user(m: Message) -> UserMessage:
    return UserMessage(content=m.content)


def think(chunk: Thinking) -> ThinkChunk:
    return ThinkChunk(thinking=chunk.thinking)


def assistant(m: Message) -> AssistantMessage:
    if isinstance(m.content, tuple):
        content = [think(c) if isinstance(c, Thinking) else TextChunk(text=c.text) for c in m.content]
    else:
        content = m.content or None
    calls = [MistralToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in m.tool_calls]
    return AssistantMessage(content=content, tool_calls=calls or None)


def _json_normalised(content: str) -> str:
    """mistral-common's `_normalize_json_content` for tool results of v1-v3."""
    if not content:
        return "{}"
    try:
        return json.dumps(json.loads(content), ensure_ascii=False)
    except json.JSONDecodeError:
        return content


def tool_result(m: Message, version: str) -> ToolMessage:
    content = _json_normalised(m.content) if version in JSON_RESULT_VERSIONS else m.content
    return ToolMessage(content=content, tool_call_id=m.tool_call_id, name=m.name)


def in_encoding_order(messages: Sequence[Message], version: str) -> list[Message]:
    """The messages in the order mistral-common encodes them: on v11 and v13 each run of tool
    results follows the order of the calls (the schema has checked that each answers one call of
    the assistant message before the run)."""
    out = list(messages)
    if version not in CALL_ORDER_VERSIONS:
        return out
    calls: list[str] = []
    start = None
    for i in range(len(out) + 1):
        m = out[i] if i < len(out) else None
        if m is not None and m.role == "tool":
            start = i if start is None else start
            continue
        if start is not None:
            out[start:i] = sorted(out[start:i], key=lambda r: calls.index(r.tool_call_id))
            start = None
        if m is not None and m.tool_calls:
            calls = [c.id for c in m.tool_calls]
    return out

