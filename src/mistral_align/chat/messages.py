"""The parsed form of a conversation: small frozen types that every other part of chat/ shares.

chat/schema.py makes them from rows (and is the place to read what a valid row is);
chat/tool_rules.py checks them against a tokenizer version, chat/tool_ids.py rewrites call ids,
chat/encoder.py encodes them. This module imports none of those.
"""

from __future__ import annotations

from dataclasses import dataclass


class ConversationError(ValueError):
    """A row that cannot be trained on, with the reason."""


@dataclass(frozen=True)
class Tool:
    """One function the model may call, from the row's `tools` list."""

    name: str
    description: str = ""
    parameters: str = "{}"  # its JSON Schema as JSON text, key order as written (the order is encoded)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    # One JSON object as text, normalised as mistral-common normalises it before encoding:
    # json.dumps(json.loads(arguments), ensure_ascii=False), whether the row gave a string or an object.
    arguments: str


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Thinking:
    thinking: str


Chunk = Text | Thinking


@dataclass(frozen=True)
class Message:
    role: str  # system, user, assistant, or tool (a tool result)
    # A string, or, for a reply that holds thinking, its chunks: Thinking first, then Text. Text
    # chunks are normalised as mistral-common's request normaliser does (empty ones dropped,
    # neighbours joined by a blank line), so a reply of text chunks only is a string.
    content: str | tuple[Chunk, ...]
    weight: int = 1  # assistant messages only: 0 keeps the message as context but trains nothing
    tool_calls: tuple[ToolCall, ...] = ()  # assistant messages only
    tool_call_id: str | None = None  # tool results: the call answered
    name: str | None = None  # tool results: the function called (taken from the call when the row has none)


@dataclass(frozen=True)
class Conversation:
    """One SFT row: its messages and the tools they may call."""

    messages: tuple[Message, ...]
    tools: tuple[Tool, ...] = ()


@dataclass(frozen=True)
class Preference:
    prompt: tuple[Message, ...]  # ends with a user message, or with the results of the last tool calls
    chosen: Message  # one assistant reply (text, tool calls, or both where the version allows)
    rejected: Message
    tools: tuple[Tool, ...] = ()


@dataclass(frozen=True)
class Unpaired:
    """One KTO row: a prompt, one reply, and whether that reply is desirable."""

    prompt: tuple[Message, ...]  # as Preference.prompt
    completion: Message  # one assistant reply
    label: bool  # True: desirable; False: undesirable
    tools: tuple[Tool, ...] = ()


def check_text(text: str, where: str) -> str:
    """JSON can spell a lone UTF-16 surrogate ("\\ud800") that is no Unicode character; no tokenizer
    can encode it (sentencepiece fails deep in C++), so such a row is bad like any other."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start].encode("unicode_escape").decode("ascii")
        raise ConversationError(
            f"{where}: not valid Unicode: a lone surrogate {bad} at character {e.start} "
            "(a JSON \\uD800-\\uDBFF escape must be followed by its \\uDC00-\\uDFFF pair)"
        ) from None
    return text
