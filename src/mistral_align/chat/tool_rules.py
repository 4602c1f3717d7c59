"""What each tokenizer version can encode of tools, tool calls, tool results and thinking.

chat/schema.py checks what holds for every version (shapes, names, JSON arguments, each call
answered once). Here: what mistral-common 1.13's finetuning validator, request normaliser or
instruct tokenizer refuses for one version, each as one sentence a person can act on:

    version             tools  text + calls   thinking  call id                 results per call turn
    v1                  no     -              no        -                       -
    v2                  yes    no             no        any (not encoded)       one, after the last user message
    v3, v3-tekken       yes    no             no        9 letters or digits     any
    v7, v7-tekken, v11  yes    yes            no        9 letters or digits     any
    v13                 yes    yes            yes       non-empty, not "null"   any

(v11 reads thinking chunks but its instruct tokenizer cannot encode them.) mistral-common also
lets a last tool call carry the id "null" on v3-v11, which then is not encoded; rows here always
carry their own ids, so that form is refused like any other id that is not 9 letters or digits.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from mistral_align.chat.messages import ConversationError, Message, Tool

TOOL_VERSIONS = frozenset({"v2", "v3", "v7", "v3-tekken", "v7-tekken", "v11", "v13"})
TEXT_WITH_CALLS_VERSIONS = frozenset({"v7", "v7-tekken", "v11", "v13"})
THINKING_VERSIONS = frozenset({"v13"})
NINE_CHARACTER_ID_VERSIONS = frozenset({"v3", "v3-tekken", "v7", "v7-tekken", "v11"})
NINE_CHARACTER_ID = re.compile(r"[a-zA-Z0-9]{9}")
ONE_RESULT_AFTER_LAST_USER_VERSIONS = frozenset({"v2"})

Label = Callable[[int], str]  # where message i is in the row, e.g. "messages[3]"


def id_rule(version: str) -> Callable[[str], bool]:
    """Whether a call id is one `version` accepts."""
    if version in NINE_CHARACTER_ID_VERSIONS:
        return lambda call_id: NINE_CHARACTER_ID.fullmatch(call_id) is not None
    if version == "v13":
        return lambda call_id: bool(call_id) and call_id != "null"
    return bool


ID_RULE_TEXT = {"v13": "it must be non-empty and not 'null'", "v2": "it must be non-empty"}


def _no_tools_on_v1(messages: Sequence[Message], tools: Sequence[Tool], label: Label) -> None:
    if tools:
        where = "tools"
    else:
        used = [i for i, m in enumerate(messages) if m.tool_calls or m.role == "tool"]
        if not used:
            return
        where = label(used[0])
    raise ConversationError(f"{where}: tool calling is not supported by tokenizer v1 "
                            "(tools, tool calls and tool results need v2 or later)")


def _check_message(m: Message, at: str, version: str) -> None:
    if isinstance(m.content, tuple) and version not in THINKING_VERSIONS:
        raise ConversationError(f"{at}: thinking chunks are not supported by tokenizer {version} (they need v13)")
    if m.tool_calls and m.content and version not in TEXT_WITH_CALLS_VERSIONS:
        raise ConversationError(f"{at}: text and tool calls in one assistant message are not supported by tokenizer "
                                f"{version} (v7 and later allow both); leave the text out or use a later version")
    valid = id_rule(version)
    for k, call in enumerate(m.tool_calls):
        if not valid(call.id):
            rule = ID_RULE_TEXT.get(version, "it must be exactly 9 letters or digits")
            raise ConversationError(f"{at}.tool_calls[{k}]: id {call.id!r} is not a valid tool call id for tokenizer "
                                    f"{version}: {rule} (tool_call_ids: regenerate replaces a row's ids)")


def _one_result_per_turn(messages: Sequence[Message], label: Label, version: str) -> None:
    """v2 encodes the calls and results after the last user message, and only one result per call turn."""
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    caller, results = -1, 0
    for i, m in enumerate(messages[last_user + 1:], start=last_user + 1):
        if m.role == "tool":
            results += 1
            if results > 1:
                raise ConversationError(
                    f"{label(caller)}: more than one tool result for one assistant message after the last user message "
                    f"is not supported by tokenizer {version} (parallel calls need v3 or later)")
        else:
            caller, results = i, 0


def check_messages(messages: Sequence[Message], tools: Sequence[Tool], version: str, label: Label) -> None:
    """Refuse what `version` cannot encode in one conversation the schema has already checked."""
    if version == "v1":
        _no_tools_on_v1(messages, tools, label)
    for i, m in enumerate(messages):
        _check_message(m, label(i), version)
    if version in ONE_RESULT_AFTER_LAST_USER_VERSIONS:
        _one_result_per_turn(messages, label, version)
