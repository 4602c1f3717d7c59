"""The conversation schema: what a valid SFT conversation and a valid preference pair look like.

Every check raises `ConversationError` with a reason a person can act on; the validator and the
training loaders put `FILE:LINE:` in front of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")


class ConversationError(ValueError):
    """A row that cannot be trained on, with the reason."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    weight: int = 1  # assistant messages only: 0 keeps the message as context but trains nothing


@dataclass(frozen=True)
class Preference:
    prompt: tuple[Message, ...]  # ends with a user message
    chosen: Message  # one assistant reply
    rejected: Message


def _parse_message(raw: Any, where: str, clean: bool) -> Message:
    if not isinstance(raw, dict):
        raise ConversationError(f"{where}: expected an object with 'role' and 'content', got {type(raw).__name__}")
    unknown = set(raw) - {"role", "content", "weight"}
    if unknown:
        raise ConversationError(f"{where}: unknown field(s) {sorted(unknown)}")
    role = raw.get("role")
    if "role" not in raw:
        raise ConversationError(f"{where}: missing field 'role'")
    if role not in ROLES:
        raise ConversationError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if "content" not in raw:
        raise ConversationError(f"{where}: missing field 'content'")
    content = raw["content"]
    if not isinstance(content, str):
        raise ConversationError(f"{where}: 'content' must be a string, got {type(content).__name__}")
    if clean:
        content = content.strip()
    weight = raw.get("weight", 1)
    if "weight" in raw:
        if role != "assistant":
            raise ConversationError(f"{where}: 'weight' is only allowed on assistant messages")
        if isinstance(weight, bool) or weight not in (0, 1):
            raise ConversationError(f"{where}: 'weight' must be 0 or 1, got {weight!r}")
    if not content.strip() and role != "user":
        raise ConversationError(f"{where}: empty {role} content")
    return Message(role=role, content=content, weight=int(weight))


def _check_turn_order(messages: list[Message], where: str, last: str) -> None:
    """System (optional, first only), then user/assistant strictly alternating, ending with `last`."""
    if not messages:
        raise ConversationError(f"{where}: no messages")
    body = messages[1:] if messages[0].role == "system" else messages
    for i, m in enumerate(messages[1:], start=1):
        if m.role == "system":
            raise ConversationError(f"{where}[{i}]: a system message is only allowed as the first message")
    if not body:
        raise ConversationError(f"{where}: only a system message, no conversation")
    offset = len(messages) - len(body)
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.role != expected:
            raise ConversationError(
                f"{where}[{i + offset}]: wrong role order: expected {expected}, got {m.role} "
                "(roles must alternate user/assistant, starting with user)"
            )
    if body[-1].role != last:
        if last == "assistant":
            raise ConversationError(f"{where}: ends with a user turn; the last message must be an assistant reply")
        raise ConversationError(f"{where}: must end with a user message")
    if not any(m.role == "user" and m.content.strip() for m in body):
        raise ConversationError(f"{where}: every user message is empty")


def parse_messages(raw: Any, where: str = "messages", clean: bool = False) -> list[Message]:
    if not isinstance(raw, list):
        raise ConversationError(f"{where}: expected a list of messages, got {type(raw).__name__}")
    return [_parse_message(m, f"{where}[{i}]", clean) for i, m in enumerate(raw)]


def parse_sft_messages(raw: Any, where: str = "messages", clean: bool = False) -> list[Message]:
    """Parse and check one SFT conversation (the value of a row's `messages`)."""
    messages = parse_messages(raw, where, clean)
    _check_turn_order(messages, where, last="assistant")
    if not any(m.role == "assistant" and m.weight for m in messages):
        raise ConversationError(f"{where}: every assistant message has weight 0, so nothing would be trained")
    return messages


def _completion(raw: Any, prompt: list[Message], field: str, clean: bool) -> Message:
    if isinstance(raw, str):
        if not (raw.strip() if clean else raw).strip():
            raise ConversationError(f"{field}: empty")
        return Message("assistant", raw.strip() if clean else raw)
    messages = parse_messages(raw, field, clean)
    if not messages:
        raise ConversationError(f"{field}: no messages")
    # The ultrafeedback_binarized shape repeats the prompt before the reply.
    if len(messages) > 1:
        if messages[:-1] != prompt:
            raise ConversationError(f"{field}: the conversation does not start with the prompt")
    reply = messages[-1]
    if reply.role != "assistant":
        raise ConversationError(f"{field}: must end with an assistant reply, got {reply.role}")
    if reply.weight != 1:
        raise ConversationError(f"{field}: 'weight' 0 on a preference reply")
    return reply


def parse_preference(row: Any, clean: bool = False) -> Preference:
    """Parse and check one DPO row: {prompt, chosen, rejected}, strings or message lists."""
    if not isinstance(row, dict):
        raise ConversationError(f"expected a JSON object, got {type(row).__name__}")
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            raise ConversationError(f"missing field '{key}'")
        if not isinstance(row[key], (str, list)):
            raise ConversationError(f"'{key}' must be a string or a list of messages, got {type(row[key]).__name__}")
    raw_prompt = row["prompt"]
    if isinstance(raw_prompt, str):
        if not raw_prompt.strip():
            raise ConversationError("prompt: empty")
        prompt = [Message("user", raw_prompt.strip() if clean else raw_prompt)]
    else:
        prompt = parse_messages(raw_prompt, "prompt", clean)
    _check_turn_order(prompt, "prompt", last="user")
    chosen = _completion(row["chosen"], prompt, "chosen", clean)
    rejected = _completion(row["rejected"], prompt, "rejected", clean)
    # Trailing spaces are dropped by the encoder (v2 and later), so they cannot make two replies differ.
    if chosen.content.rstrip(" ") == rejected.content.rstrip(" "):
        raise ConversationError("chosen and rejected are the same reply")
    return Preference(tuple(prompt), chosen, rejected)
