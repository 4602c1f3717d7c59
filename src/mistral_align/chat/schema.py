"""The conversation schema: what a valid SFT conversation and a valid preference pair look like.

Every check raises `ConversationError` with a reason a person can act on; the validator and the
training loaders put `FILE:LINE:` in front of it.
"""

from __future__ import annotations

from typing import Any

from mistral_align.chat.messages import (  # re-exported: the schema is where callers find them
    ConversationError,
    Message,
    Preference,
    check_text,
)

ROLES = ("system", "user", "assistant")


def _make_message(role: str, raw: dict, where: str, clean: bool, content_key: str = "content") -> Message:
    """The checks every message shares, whatever the row's spelling of it (`content` or ShareGPT's `value`)."""
    if content_key not in raw:
        raise ConversationError(f"{where}: missing field '{content_key}'")
    content = raw[content_key]
    if not isinstance(content, str):
        raise ConversationError(f"{where}: '{content_key}' must be a string, got {type(content).__name__}")
    check_text(content, f"{where}.{content_key}")
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


def _check_turn_object(raw: Any, where: str, role_key: str, content_key: str) -> None:
    """A turn is an object of its role, its content and an optional weight (messages: role/content;
    ShareGPT: from/value), with its role present."""
    if not isinstance(raw, dict):
        raise ConversationError(f"{where}: expected an object with '{role_key}' and '{content_key}', got {type(raw).__name__}")
    unknown = set(raw) - {role_key, content_key, "weight"}
    if unknown:
        raise ConversationError(f"{where}: unknown field(s) {sorted(unknown)}")
    if role_key not in raw:
        raise ConversationError(f"{where}: missing field '{role_key}'")


def _parse_message(raw: Any, where: str, clean: bool) -> Message:
    _check_turn_object(raw, where, "role", "content")
    role = raw["role"]
    if role not in ROLES:
        raise ConversationError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    return _make_message(role, raw, where, clean)


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


def _check_sft(messages: list[Message], where: str) -> None:
    _check_turn_order(messages, where, last="assistant")
    if not any(m.role == "assistant" and m.weight for m in messages):
        raise ConversationError(f"{where}: every assistant message has weight 0, so nothing would be trained")


def parse_sft_messages(raw: Any, where: str = "messages", clean: bool = False) -> list[Message]:
    """Parse and check one SFT conversation (the value of a row's `messages`)."""
    messages = parse_messages(raw, where, clean)
    _check_sft(messages, where)
    return messages


def _completion(raw: Any, prompt: list[Message], field: str, clean: bool) -> Message:
    if isinstance(raw, str):
        check_text(raw, field)
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


# -- row shapes ---------------------------------------------------------------------------------
#
# The top-level keys a row may have. Every key either carries training text or is a known id,
# and anything else is refused by name: a key we do not read (a typo, a `system` from another
# tool's format) would otherwise be dropped without a word.
#
#   SFT:  {"messages": [...]}                        the canonical shape
#         {"conversations": [{"from", "value"}]}     ShareGPT (human/user, gpt/assistant, system)
#         {"prompt": str, "completion": str}         one user turn, one assistant reply
#   DPO:  {"prompt", "chosen", "rejected"}
#   any:  "system": str   becomes the system message (refused if the conversation has one too;
#                         an empty one means no system prompt, as in many exported datasets)
#         "id"            a row id, not training text
#   Hub:  a row with "prompt_id" is HuggingFaceH4's ultrachat_200k (SFT: its "prompt" repeats the
#         first user turn) or ultrafeedback_binarized (DPO: "messages" repeats the chosen
#         conversation; scores) shape, and those columns are read as they are (data/read.py).

ID_KEYS = frozenset({"id"})
SFT_SHAPES = {
    "messages": frozenset({"messages"}),
    "conversations": frozenset({"conversations"}),
    "completion": frozenset({"prompt", "completion"}),
}
SFT_SHAPES_TEXT = "'messages', 'conversations' (ShareGPT) or 'prompt' and 'completion'"
DPO_KEYS = frozenset({"prompt", "chosen", "rejected"})
HUB_KEYS = {
    "sft": frozenset({"prompt", "prompt_id"}),  # ultrachat_200k, beside "messages"
    "dpo": frozenset({"prompt_id", "messages", "score_chosen", "score_rejected"}),  # ultrafeedback_binarized
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _refuse_unknown_keys(row: dict, allowed: frozenset, shape: str) -> None:
    unknown = set(row) - allowed - ID_KEYS - {"system"}
    if unknown:
        raise ConversationError(f"unknown field(s) {sorted(unknown)} ({shape}, optionally with 'system'); "
                                "to drop such columns, list them in the source's ignore_fields")


def _system(row: dict, clean: bool) -> Message | None:
    """The row's top-level `system` string as a system message; None when absent or empty."""
    if "system" not in row:
        return None
    text = row["system"]
    if not isinstance(text, str):
        raise ConversationError(f"'system' must be a string, got {type(text).__name__}")
    check_text(text, "system")
    text = text.strip() if clean else text
    return Message("system", text) if text.strip() else None


def _with_system(system: Message | None, messages: list[Message], where: str) -> list[Message]:
    if system is None:
        return messages
    if messages and messages[0].role == "system":
        raise ConversationError(f"two system prompts: the row's 'system' field and {where}[0]; keep one")
    return [system, *messages]


def _sharegpt_turn(raw: Any, where: str, clean: bool) -> Message:
    _check_turn_object(raw, where, "from", "value")
    role = SHAREGPT_ROLES.get(raw["from"]) if isinstance(raw["from"], str) else None
    if role is None:
        raise ConversationError(f"{where}: unknown role (from) {raw['from']!r} (expected one of {', '.join(SHAREGPT_ROLES)})")
    return _make_message(role, raw, where, clean, content_key="value")


def _sharegpt_messages(raw: Any, clean: bool) -> list[Message]:
    if not isinstance(raw, list):
        raise ConversationError(f"conversations: expected a list of turns, got {type(raw).__name__}")
    return [_sharegpt_turn(t, f"conversations[{i}]", clean) for i, t in enumerate(raw)]


def _prompt_completion_messages(row: dict, clean: bool) -> list[Message]:
    """One user turn and one assistant reply; conversations go in 'messages'."""
    for key in ("prompt", "completion"):
        if not isinstance(row[key], str):
            raise ConversationError(f"'{key}' must be a string, got {type(row[key]).__name__} "
                                    "(a 'prompt'/'completion' row is one user turn and one reply; use 'messages' for more)")
        check_text(row[key], key)
    prompt = _make_message("user", {"content": row["prompt"]}, "prompt", clean)
    if not prompt.content.strip():
        raise ConversationError("prompt: empty")
    return [prompt, _make_message("assistant", {"content": row["completion"]}, "completion", clean)]


def _sft_shape(row: dict) -> str:
    """Which SFT shape a row has (a key of SFT_SHAPES), refusing rows with none or with two."""
    found = [name for name in SFT_SHAPES if name in row]
    if len(found) > 1:
        raise ConversationError(f"both {' and '.join(repr(f) for f in found)}: a row has one shape ({SFT_SHAPES_TEXT})")
    if found:
        return found[0]
    if "prompt" in row:
        raise ConversationError("missing field 'completion' (an SFT 'prompt' row needs its 'completion')")
    others = sorted(set(row) - ID_KEYS - {"system"})
    got = f"; found {others}" if others else ""
    raise ConversationError(f"missing field 'messages' (an SFT row holds {SFT_SHAPES_TEXT}{got})")


def parse_sft_row(row: Any, clean: bool = False) -> list[Message]:
    """Parse and check one SFT row in any shape above; the messages the encoder trains on."""
    if not isinstance(row, dict):
        raise ConversationError(f"expected a JSON object with 'messages', got {type(row).__name__}")
    shape = _sft_shape(row)
    hub = shape == "messages" and "prompt_id" in row
    allowed = SFT_SHAPES[shape] | (HUB_KEYS["sft"] if hub else frozenset())
    _refuse_unknown_keys(row, allowed, f"an SFT row holds {SFT_SHAPES_TEXT}")
    if shape == "completion":
        messages, where = _prompt_completion_messages(row, clean), "prompt"
    elif shape == "conversations":
        messages, where = _sharegpt_messages(row["conversations"], clean), "conversations"
    else:
        messages, where = parse_messages(row["messages"], "messages", clean), "messages"
    # Checked before the row's system prompt goes first, so errors keep the row's own indices.
    _check_sft(messages, where)
    return _with_system(_system(row, clean), messages, where)


def parse_preference(row: Any, clean: bool = False) -> Preference:
    """Parse and check one DPO row: {prompt, chosen, rejected}, strings or message lists, and an
    optional top-level system prompt."""
    if not isinstance(row, dict):
        raise ConversationError(f"expected a JSON object, got {type(row).__name__}")
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            raise ConversationError(f"missing field '{key}'")
        if not isinstance(row[key], (str, list)):
            raise ConversationError(f"'{key}' must be a string or a list of messages, got {type(row[key]).__name__}")
    hub = "prompt_id" in row
    _refuse_unknown_keys(row, DPO_KEYS | (HUB_KEYS["dpo"] if hub else frozenset()),
                         "a DPO row holds 'prompt', 'chosen' and 'rejected'")
    raw_prompt = row["prompt"]
    if isinstance(raw_prompt, str):
        check_text(raw_prompt, "prompt")
        if not raw_prompt.strip():
            raise ConversationError("prompt: empty")
        prompt = [Message("user", raw_prompt.strip() if clean else raw_prompt)]
    else:
        prompt = parse_messages(raw_prompt, "prompt", clean)
    _check_turn_order(prompt, "prompt", last="user")
    # Replies that repeat the prompt (ultrafeedback) repeat it as written, without the row's system.
    chosen = _completion(row["chosen"], prompt, "chosen", clean)
    rejected = _completion(row["rejected"], prompt, "rejected", clean)
    # Trailing spaces are dropped by the encoder (v2 and later), so they cannot make two replies differ.
    if chosen.content.rstrip(" ") == rejected.content.rstrip(" "):
        raise ConversationError("chosen and rejected are the same reply")
    prompt = _with_system(_system(row, clean), prompt, "prompt")
    return Preference(tuple(prompt), chosen, rejected)
