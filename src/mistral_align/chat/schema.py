"""The conversation schema: what a valid SFT conversation and a valid preference pair look like.

Every check raises `ConversationError` with a reason a person can act on; the validator and the
training loaders put `FILE:LINE:` in front of it.

Plain chat is system/user/assistant text. A row with `tools` may also hold tool calls, their
results and (v13) thinking, in the OpenAI shape ("tool rows" below). What is checked here holds
for every tokenizer version; what only some versions can encode (v1 has no tools, thinking needs
v13, the form of a call id, ...) is checked against the version by chat/tool_rules.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any, Callable

from mistral_align.chat.messages import (  # re-exported: the schema is where callers find them
    Chunk,
    Conversation,
    ConversationError,
    Message,
    Preference,
    Text,
    Thinking,
    Tool,
    ToolCall,
    Unpaired,
    check_text,
)
from mistral_align.chat.tool_ids import TOOL_CALL_IDS, regenerate_tool_call_ids
from mistral_align.chat.tool_rules import check_messages

ROLES = ("system", "user", "assistant")
TOOL_ROLES = (*ROLES, "tool")  # the roles of a row that has `tools`


def _weight(raw: dict, role: str, where: str) -> int:
    weight = raw.get("weight", 1)
    if "weight" in raw:
        if role != "assistant":
            raise ConversationError(f"{where}: 'weight' is only allowed on assistant messages")
        if isinstance(weight, bool) or weight not in (0, 1):
            raise ConversationError(f"{where}: 'weight' must be 0 or 1, got {weight!r}")
    return int(weight)


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
    weight = _weight(raw, role, where)
    if not content.strip() and role != "user":
        raise ConversationError(f"{where}: empty {role} content")
    return Message(role=role, content=content, weight=weight)


# -- tool rows ----------------------------------------------------------------------------------
#
#   "tools": [{"type": "function", "function": {"name", "description"?, "parameters"?, "strict"?}}]
#   assistant: {"role": "assistant", "content"?: str | [chunks] | null, "weight"?,
#               "tool_calls"?: [{"id", "type"?: "function", "function": {"name", "arguments"}}]}
#              (content may be left out, null or "" when the message has tool calls; "arguments"
#              is a JSON object or a string holding one)
#   chunks:    {"type": "text", "text"} and {"type": "thinking", "thinking"}, thinking first
#   result:    {"role": "tool", "tool_call_id", "name"?, "content": str}
#
# Every call of an assistant message is answered by exactly one result right after it (any order),
# before the next user or assistant message; only the last message of an SFT row, or a DPO reply,
# may call tools without results (those calls are what is trained). `strict` is accepted and, as
# in mistral-common, not encoded.

# mistral-common's rule for the name of a function, in tools, calls and results alike.
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# The fields an assistant message or a tool result has besides role, content and weight (the
# weight of a result is refused as on system and user messages).
MESSAGE_FIELDS = {"assistant": frozenset({"tool_calls"}), "tool": frozenset({"tool_call_id", "name"})}


def _fields(raw: Any, where: str, allowed: frozenset, what: str) -> dict:
    if not isinstance(raw, dict):
        raise ConversationError(f"{where}: expected an object ({what}), got {type(raw).__name__}")
    unknown = set(raw) - allowed
    if unknown:
        raise ConversationError(f"{where}: unknown field(s) {sorted(unknown)}")
    return raw


def _required(raw: dict, key: str, where: str) -> Any:
    if key not in raw:
        raise ConversationError(f"{where}: missing field '{key}'")
    return raw[key]


def _string(raw: dict, key: str, where: str) -> str:
    value = _required(raw, key, where)
    if not isinstance(value, str):
        raise ConversationError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return check_text(value, f"{where}.{key}")


def _id(raw: dict, key: str, where: str) -> str:
    value = _string(raw, key, where)
    if not value:
        raise ConversationError(f"{where}: '{key}' is an empty string; a call and its result are paired by this id")
    return value


def _function_name(raw: dict, key: str, where: str) -> str:
    name = _string(raw, key, where)
    if not FUNCTION_NAME.fullmatch(name):
        raise ConversationError(f"{where}: {key} {name!r} is not a valid function name: use 1 to 64 letters, "
                                "digits, '_' or '-'")
    return name


def _json_text(value: Any, where: str) -> str:
    """A JSON value as the text mistral-common writes for it (non-ASCII kept as written)."""
    return check_text(json.dumps(value, ensure_ascii=False), where)


def _json_type(value: Any) -> str:
    kinds = ((bool, "true/false"), (dict, "an object"), (list, "an array"), (str, "a string"), ((int, float), "a number"))
    return next((name for t, name in kinds if isinstance(value, t)), "null")


def _check_json_schema(schema: dict, where: str) -> None:
    # Imported here for start-up time (~0.1 s); only rows with tools need it. mistral-common checks
    # every tool's parameters with this same Draft 7 validator.
    import jsonschema

    try:
        jsonschema.Draft7Validator.check_schema(schema)
    except jsonschema.exceptions.SchemaError as e:
        raise ConversationError(f"{where}: not a valid JSON Schema ({e.message})") from None


def _parse_tool(raw: Any, where: str) -> Tool:
    _fields(raw, where, frozenset({"type", "function"}), 'a tool: {"type": "function", "function": {...}}')
    if raw.get("type", "function") != "function":
        raise ConversationError(f"{where}: 'type' must be 'function', got {raw['type']!r}")
    at = f"{where}.function"
    fn = _fields(_required(raw, "function", where), at, frozenset({"name", "description", "parameters", "strict"}),
                 "a function: name, description, parameters")
    name = _function_name(fn, "name", at)
    description = "" if fn.get("description") is None else _string(fn, "description", at)
    parameters = {} if fn.get("parameters") is None else fn["parameters"]
    if not isinstance(parameters, dict):
        raise ConversationError(f"{at}: 'parameters' must be an object (a JSON Schema), got {type(parameters).__name__}")
    _check_json_schema(parameters, f"{at}.parameters")
    if not isinstance(fn.get("strict", False), bool):
        raise ConversationError(f"{at}: 'strict' must be true or false, got {fn['strict']!r}")
    return Tool(name, description, _json_text(parameters, f"{at}.parameters"))


def parse_tools(raw: Any, where: str = "tools") -> tuple[Tool, ...]:
    """The row's `tools` list (absent or null: none)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConversationError(f"{where}: expected a list of tools, got {type(raw).__name__}")
    tools = tuple(_parse_tool(t, f"{where}[{i}]") for i, t in enumerate(raw))
    for i, t in enumerate(tools):
        if any(t.name == other.name for other in tools[:i]):
            raise ConversationError(f"{where}[{i}]: tool {t.name!r} is listed twice; define each function once")
    return tools


def _arguments(fn: dict, where: str) -> str:
    value = _required(fn, "arguments", where)
    at = f"{where}.arguments"
    if isinstance(value, str):
        check_text(value, at)
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConversationError(f"{at}: arguments must be a JSON object, and this string is not JSON "
                                    f"({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict):
        raise ConversationError(f"{at}: arguments must be a JSON object (or a string holding one), "
                                f"got {_json_type(value)}; a call without arguments has {{}}")
    return _json_text(value, at)


def _parse_tool_call(raw: Any, where: str) -> ToolCall:
    _fields(raw, where, frozenset({"id", "type", "function"}),
            'a tool call: {"id", "type": "function", "function": {"name", "arguments"}}')
    call_id = _id(raw, "id", where)
    if raw.get("type", "function") != "function":
        raise ConversationError(f"{where}: 'type' must be 'function', got {raw['type']!r}")
    at = f"{where}.function"
    fn = _fields(_required(raw, "function", where), at, frozenset({"name", "arguments"}), "name and arguments")
    return ToolCall(call_id, _function_name(fn, "name", at), _arguments(fn, at))


def _parse_tool_calls(raw: Any, where: str) -> tuple[ToolCall, ...]:
    if raw is None:  # OpenAI exports write "tool_calls": null on plain replies
        return ()
    if not isinstance(raw, list):
        raise ConversationError(f"{where}: expected a list of tool calls, got {type(raw).__name__}")
    calls = tuple(_parse_tool_call(c, f"{where}[{k}]") for k, c in enumerate(raw))
    for k, c in enumerate(calls):
        if any(c.id == other.id for other in calls[:k]):
            raise ConversationError(f"{where}[{k}]: id {c.id!r} is used by two calls of this message; "
                                    "each call needs its own id, which its result names")
    return calls


def _chunks(raw: list, where: str, clean: bool) -> str | tuple[Chunk, ...]:
    """Assistant content given as chunks, in the normal form of `Message.content`."""
    chunks: list[Chunk] = []
    for j, chunk in enumerate(raw):
        at = f"{where}[{j}]"
        kind = chunk.get("type") if isinstance(chunk, dict) else None
        if kind not in ("text", "thinking"):
            raise ConversationError(f'{at}: expected a chunk {{"type": "text", "text": ...}} or '
                                    f'{{"type": "thinking", "thinking": ...}}, got {json.dumps(chunk)[:80]}')
        _fields(chunk, at, frozenset({"type", kind}), kind)
        value = _string(chunk, kind, at)
        value = value.strip() if clean else value
        if kind == "thinking":
            if not value.strip():
                raise ConversationError(f"{at}: empty thinking")
            if any(isinstance(c, Text) for c in chunks):
                raise ConversationError(f"{at}: a thinking chunk after text; a reply's thinking comes before its text")
            chunks.append(Thinking(value))
        elif value and chunks and isinstance(chunks[-1], Text):
            chunks[-1] = Text(f"{chunks[-1].text}\n\n{value}")
        elif value:
            chunks.append(Text(value))
    if any(isinstance(c, Thinking) for c in chunks):
        return tuple(chunks)
    return chunks[0].text if chunks else ""


def _parse_assistant(raw: dict, where: str, clean: bool) -> Message:
    calls = _parse_tool_calls(raw.get("tool_calls"), f"{where}.tool_calls")
    weight = _weight(raw, "assistant", where)
    if raw.get("content") is None and calls:
        return Message("assistant", "", weight, calls)
    content = _required(raw, "content", where)
    if isinstance(content, list):
        content = _chunks(content, f"{where}.content", clean)
    elif isinstance(content, str):
        check_text(content, f"{where}.content")
        content = content.strip() if clean else content
    else:
        raise ConversationError(f"{where}: 'content' must be a string, got {type(content).__name__} "
                                "(or a list of text and thinking chunks)")
    if isinstance(content, str) and not content.strip() and not (calls and content == ""):
        beside = " (only whitespace) beside 'tool_calls'; leave 'content' out, null or empty" if calls else ""
        raise ConversationError(f"{where}: empty assistant content{beside}")
    return Message("assistant", content, weight, calls)


def _parse_tool_result(raw: dict, where: str, clean: bool) -> Message:
    content = _string(raw, "content", where)
    _weight(raw, "tool", where)  # refused: a result is never trained
    call_id = _id(raw, "tool_call_id", where)
    name = None if raw.get("name") is None else _function_name(raw, "name", where)
    return Message("tool", content.strip() if clean else content, tool_call_id=call_id, name=name)


# -- messages and their order -------------------------------------------------------------------


def _check_turn_object(raw: Any, where: str, role_key: str, content_key: str, extra: frozenset = frozenset()) -> None:
    """A turn is an object of its role, its content and an optional weight (messages: role/content;
    ShareGPT: from/value), with its role present; assistant messages and tool results have `extra`
    fields besides (MESSAGE_FIELDS)."""
    if not isinstance(raw, dict):
        raise ConversationError(f"{where}: expected an object with '{role_key}' and '{content_key}', got {type(raw).__name__}")
    unknown = set(raw) - {role_key, content_key, "weight"} - extra
    if unknown:
        raise ConversationError(f"{where}: unknown field(s) {sorted(unknown)}")
    if role_key not in raw:
        raise ConversationError(f"{where}: missing field '{role_key}'")


def _parse_message(raw: Any, where: str, clean: bool, with_tools: bool = False) -> Message:
    role = raw.get("role") if isinstance(raw, dict) else None
    extra = MESSAGE_FIELDS.get(role, frozenset()) if isinstance(role, str) else frozenset()
    _check_turn_object(raw, where, "role", "content", extra)
    roles = TOOL_ROLES if with_tools else ROLES
    if role not in roles:
        hint = "; a 'tool' message answers a tool call, and needs the row's 'tools'" if role == "tool" else ""
        raise ConversationError(f"{where}: unknown role {role!r} (expected one of {', '.join(roles)}){hint}")
    if role == "assistant":
        return _parse_assistant(raw, where, clean)
    if role == "tool":
        return _parse_tool_result(raw, where, clean)
    return _make_message(role, raw, where, clean)


def _unanswered(caller: str, pending: dict, before: str) -> ConversationError:
    ids = ", ".join(repr(i) for i in pending)
    return ConversationError(f"{caller}: tool call(s) {ids} have no tool result; each call needs a 'tool' "
                             f"message with its tool_call_id right after the calling message, before {before}")


def _check_result(m: Message, at: str, prev: str | None, caller: str, pending: dict, answered: set) -> None:
    """A tool result answers one call, not yet answered, of the assistant message just before."""
    if prev not in ("assistant", "tool") or not (pending or answered):
        raise ConversationError(f"{at}: a tool result (for {m.tool_call_id!r}) where no call is waiting; a result "
                                "follows the assistant message whose call it answers")
    if m.tool_call_id in answered:
        raise ConversationError(f"{at}: answers call {m.tool_call_id!r} a second time")
    if m.tool_call_id not in pending:
        calls = ", ".join(repr(i) for i in (*answered, *pending))
        raise ConversationError(f"{at}: tool_call_id {m.tool_call_id!r} answers no call of {caller} "
                                f"(its calls: {calls})")
    del pending[m.tool_call_id]
    answered.add(m.tool_call_id)


def _check_turn_order(messages: list[Message], where: str, last: str, name: Callable[[int], str] | None = None) -> None:
    """System (optional, first only), then user/assistant strictly alternating, ending with `last`.

    In a row with tools an assistant turn may be several messages: an assistant message that
    calls tools, one result per call, and so on, until an assistant message without calls. A
    prompt (`last="user"`) may also end with the results of its last calls. `name(i)` says where
    message i is in the row (`where[i]` unless the list was put together from two fields)."""
    at = name or (lambda i: f"{where}[{i}]")
    if not messages:
        raise ConversationError(f"{where}: no messages")
    body = messages[1:] if messages[0].role == "system" else messages
    for i, m in enumerate(messages[1:], start=1):
        if m.role == "system":
            raise ConversationError(f"{at(i)}: a system message is only allowed as the first message")
    if not body:
        raise ConversationError(f"{where}: only a system message, no conversation")
    offset = len(messages) - len(body)
    prev: str | None = None
    pending: dict[str, ToolCall] = {}  # calls of the last calling message still without a result
    answered: set[str] = set()
    caller = -1
    for i, m in enumerate(body, start=offset):
        if m.role == "tool":
            _check_result(m, at(i), prev, at(caller), pending, answered)
        else:
            if pending:
                raise _unanswered(at(caller), pending, f"the next {m.role} message")
            expected = "user" if prev in (None, "assistant") else "assistant"
            if m.role != expected:
                if prev == "tool":
                    raise ConversationError(f"{at(i)}: the tool results before this user message are not followed "
                                            "by an assistant reply; the assistant answers with them before the user speaks")
                raise ConversationError(
                    f"{at(i)}: wrong role order: expected {expected}, got {m.role} "
                    "(roles must alternate user/assistant, starting with user)"
                )
        if m.role != "tool":  # a new message: only its own calls may be answered next
            pending, answered, caller = {c.id: c for c in m.tool_calls}, set(), i
        prev = m.role
    if last == "assistant" and body[-1].role == "tool":
        raise ConversationError(f"{where}: ends with tool results; the last message must be an assistant reply")
    if last == "user" and pending:
        raise _unanswered(at(caller), pending, "the reply")
    if body[-1].role != last and not (last == "user" and body[-1].role == "tool"):
        if last == "assistant":
            raise ConversationError(f"{where}: ends with a user turn; the last message must be an assistant reply")
        raise ConversationError(f"{where}: must end with a user message")
    if not any(m.role == "user" and m.content.strip() for m in body):
        raise ConversationError(f"{where}: every user message is empty")


def _check_calls_known(m: Message, tools: tuple[Tool, ...], at: str) -> None:
    names = [t.name for t in tools]
    for k, call in enumerate(m.tool_calls):
        if call.name not in names:
            listed = f"its tools: {', '.join(repr(n) for n in names)}" if names else "the row has no 'tools'"
            raise ConversationError(f"{at}.tool_calls[{k}]: calls {call.name!r}, which is not among the row's tools "
                                    f"({listed})")


def _link_tools(messages: list[Message], tools: tuple[Tool, ...], where: str,
                name: Callable[[int], str] | None = None) -> list[Message]:
    """Check that every call names one of `tools`, and give each result the name of the function it
    answers (v2 writes it into the result). Runs after _check_turn_order, so every result has its call."""
    at = name or (lambda i: f"{where}[{i}]")
    calls: dict[str, ToolCall] = {}
    out = []
    for i, m in enumerate(messages):
        if m.tool_calls:
            _check_calls_known(m, tools, at(i))
            calls = {c.id: c for c in m.tool_calls}
        elif m.role == "tool":
            called = calls[m.tool_call_id].name
            if m.name is None:
                m = replace(m, name=called)
            elif m.name != called:
                raise ConversationError(f"{at(i)}: 'name' is {m.name!r}, but call {m.tool_call_id!r} "
                                        f"called {called!r}")
        out.append(m)
    return out


def parse_messages(raw: Any, where: str = "messages", clean: bool = False, with_tools: bool = False) -> list[Message]:
    """Parse each message of a list (not their order); tool results only `with_tools`."""
    if not isinstance(raw, list):
        raise ConversationError(f"{where}: expected a list of messages, got {type(raw).__name__}")
    return [_parse_message(m, f"{where}[{i}]", clean, with_tools) for i, m in enumerate(raw)]


def _check_sft(messages: list[Message], where: str) -> None:
    _check_turn_order(messages, where, last="assistant")
    if not any(m.role == "assistant" and m.weight for m in messages):
        raise ConversationError(f"{where}: every assistant message has weight 0, so nothing would be trained")


def parse_sft_messages(raw: Any, where: str = "messages", clean: bool = False,
                       tools: tuple[Tool, ...] = ()) -> list[Message]:
    """Parse and check one SFT conversation (the value of a row's `messages`) that may call `tools`."""
    messages = parse_messages(raw, where, clean, with_tools=bool(tools))
    _check_sft(messages, where)
    return _link_tools(messages, tools, where)


def _completion(raw: Any, prompt: list[Message], field: str, clean: bool, with_tools: bool) -> Message:
    if isinstance(raw, str):
        check_text(raw, field)
        if not (raw.strip() if clean else raw).strip():
            raise ConversationError(f"{field}: empty")
        return Message("assistant", raw.strip() if clean else raw)
    messages = parse_messages(raw, field, clean, with_tools)
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


def _reply_key(m: Message) -> tuple:
    # Trailing spaces are dropped by the encoder (v2 and later), so they cannot make two replies differ.
    return (m.content.rstrip(" ") if isinstance(m.content, str) else m.content, m.tool_calls)


# -- row shapes ---------------------------------------------------------------------------------
#
# The top-level keys a row may have. Every key either carries training text or is a known id,
# and anything else is refused by name: a key we do not read (a typo, a `system` from another
# tool's format) would otherwise be dropped without a word.
#
#   SFT:  {"messages": [...]}                        the canonical shape
#         {"conversations": [{"from", "value"}]}     ShareGPT (human/user, gpt/assistant, system)
#         {"prompt": str, "completion": str}         one user turn, one assistant reply
#         {"prompt": [messages], "completion": [messages]}
#                                                    TRL's conversational prompt-completion: the
#                                                    prompt's replies are context (weight 0), the
#                                                    completion's are trained; may carry "tools"
#         {"instruction", "input"?, "output"}        Alpaca: one user turn (the instruction, then
#                                                    the input on the next line when there is one),
#                                                    one reply (LLaMA-Factory's reading)
#   DPO:  {"prompt", "chosen", "rejected"}
#         {"chosen": [messages], "rejected": [messages]}
#                                                    TRL's implicit prompt: both conversations start
#                                                    with the same messages (the prompt) and differ
#                                                    in the last one (the reply)
#   tools: "tools" beside "messages" or a conversational "prompt"/"completion" (SFT) or in a DPO
#          row: see "tool rows" above
#   any:  "system": str   becomes the system message (refused if the conversation has one too;
#                         an empty one means no system prompt, as in many exported datasets)
#         "id"            a row id, not training text
#   Hub:  a row with "prompt_id" is HuggingFaceH4's ultrachat_200k (SFT: its "prompt" repeats the
#         first user turn) or ultrafeedback_binarized (DPO: "messages" repeats the chosen
#         conversation; scores) shape, and those columns are read as they are (data/read.py).
#
# Columns other formats give a meaning (KTO's `label`, ratings, a message's `tool_calls` at the
# top level) are named for what they are and what takes them (KNOWN_COLUMNS), never offered to
# ignore_fields: dropping one would train something other than what the data says.

ID_KEYS = frozenset({"id"})
SFT_SHAPES = {
    "messages": frozenset({"messages", "tools"}),
    "conversations": frozenset({"conversations"}),
    "completion": frozenset({"prompt", "completion", "tools"}),  # tools: with message lists only
    "instruction": frozenset({"instruction", "input", "output"}),
}
SFT_SHAPES_TEXT = ("'messages', 'conversations' (ShareGPT), 'prompt' and 'completion', or 'instruction', "
                   "'input' and 'output' (Alpaca)")
DPO_KEYS = frozenset({"prompt", "chosen", "rejected", "tools"})
KTO_KEYS = frozenset({"prompt", "completion", "label", "tools"})
SHAPE_NAMES = {"messages": "'messages'", "conversations": "'conversations' (ShareGPT)",
               "completion": "'prompt'/'completion' as strings", "instruction": "'instruction'/'input'/'output' (Alpaca)"}
HUB_KEYS = {
    "sft": frozenset({"prompt", "prompt_id"}),  # ultrachat_200k, beside "messages"
    "dpo": frozenset({"prompt_id", "messages", "score_chosen", "score_rejected"}),  # ultrafeedback_binarized
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# What KTO's `label` is, said wherever it is met (a row, a source's ignore_fields, a file's shape).
KTO_LABEL = "KTO's verdict on the completion (true: desirable, false: undesirable)"
KTO_TAKEN = "KTO rows are taken by a preference stage with dpo.objective=kto"
KTO_AS_SFT = "as SFT every completion, the undesirable ones too, would be trained as a target"
_RATING = "a rating of the reply (reward-model or rated data)"
_RATING_ADVICE = {
    "sft": "no stage here trains on ratings: filter the rows by it, or make preference pairs "
           "(prompt/chosen/rejected) from them, before training",
    "dpo": "DPO reads which reply was chosen, not by how much",
    "kto": "KTO reads whether the reply is desirable ('label'), not by how much",
}


def known_column(key: str, row: dict, kind: str) -> str | None:
    """What a column we do not read means, where other formats give it one; None for any other."""
    if key == "label" and isinstance(row.get(key), bool):
        return f"{KTO_LABEL}: {KTO_TAKEN}" + (f"; {KTO_AS_SFT}" if kind == "sft" else "")
    if key in ("score", "scores", "rating", "reward", "score_chosen", "score_rejected", "chosen_rating",
               "rejected_rating", "chosen_score", "rejected_score"):
        return f"{_RATING}; {_RATING_ADVICE[kind]}"
    if key == "tool_calls":
        return "an assistant message's tool calls: they go inside that message, beside its 'content'"
    if key in ("chosen", "rejected") and kind == "sft":
        return "a reply of a preference pair (prompt/chosen/rejected): DPO data, which a DPO stage's data takes"
    if key == "completion" and kind == "dpo":
        return "a single reply, not a pair: SFT data ('prompt'/'completion'), or with a 'label' KTO's"
    if key == "history":
        return "the earlier turns of an Alpaca row (LLaMA-Factory's), which are not read: write the conversation as 'messages'"
    return None


def _refuse_unknown_keys(row: dict, allowed: frozenset, shape: str, kind: str) -> None:
    unknown = sorted(set(row) - allowed - ID_KEYS - {"system"})
    if not unknown:
        return
    meanings = {k: known_column(k, row, kind) for k in unknown}
    other = [k for k in unknown if meanings[k] is None]
    parts = [f"unknown field(s) {other} ({shape}, optionally with 'system'); to drop such columns, list them in "
             "the source's ignore_fields"] if other else []
    parts += [f"'{k}' is not read here: it is {meanings[k]}" for k in unknown if meanings[k] is not None]
    raise ConversationError("; ".join(parts))


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
    """One user turn and one assistant reply, given as strings."""
    for key, other in (("prompt", "completion"), ("completion", "prompt")):
        if not isinstance(row[key], str):
            beside = f", as '{other}' is one" if isinstance(row[other], str) else ""
            raise ConversationError(f"'{key}' must be a string, got {type(row[key]).__name__}{beside} (or both "
                                    "lists of messages: TRL's conversational prompt and completion)")
        check_text(row[key], key)
    prompt = _make_message("user", {"content": row["prompt"]}, "prompt", clean)
    if not prompt.content.strip():
        raise ConversationError("prompt: empty")
    return [prompt, _make_message("assistant", {"content": row["completion"]}, "completion", clean)]


def _is_chat_prompt_completion(row: dict) -> bool:
    return isinstance(row.get("prompt"), list) and isinstance(row.get("completion"), list)


def _chat_prompt_completion(row: dict, clean: bool, tools: tuple[Tool, ...]) -> tuple[list[Message], Callable]:
    """TRL's conversational prompt-completion: the prompt's messages are context (an assistant
    message there is never trained, as in TRL), the completion's assistant messages are trained.
    Returns the messages and where each is in the row."""
    with_tools = bool(tools)
    prompt = parse_messages(row["prompt"], "prompt", clean, with_tools)
    for i, (m, raw) in enumerate(zip(prompt, row["prompt"])):
        if m.role == "assistant":
            if raw.get("weight", 0) != 0:
                raise ConversationError(f"prompt[{i}]: 'weight' 1 in a prompt; a prompt is context, never trained: "
                                        "a reply to train goes in 'completion'")
            prompt[i] = replace(m, weight=0)
    _check_turn_order(prompt, "prompt", last="user")
    completion = parse_messages(row["completion"], "completion", clean, with_tools)
    if not completion:
        raise ConversationError("completion: no messages")
    if completion[0].role != "assistant":
        raise ConversationError(f"completion[0]: a completion starts with the assistant's reply, got {completion[0].role}")
    n = len(prompt)
    name = lambda i: f"prompt[{i}]" if i < n else f"completion[{i - n}]"  # noqa: E731
    messages = prompt + completion
    _check_turn_order(messages, "completion", last="assistant", name=name)
    if not any(m.role == "assistant" and m.weight for m in completion):
        raise ConversationError("completion: every assistant message has weight 0, so nothing would be trained")
    return _link_tools(messages, tools, "completion", name), name


def _alpaca_messages(row: dict, clean: bool) -> list[Message]:
    """Alpaca's instruction (with its input, when there is one, on the next line) as the user turn,
    its output as the reply."""
    for key in ("instruction", "output"):
        if key not in row:
            raise ConversationError(f"missing field '{key}' (an Alpaca row holds 'instruction', 'input' and 'output')")
        if not isinstance(row[key], str):
            raise ConversationError(f"'{key}' must be a string, got {type(row[key]).__name__}")
        check_text(row[key], key)
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise ConversationError(f"'input' must be a string, got {type(extra).__name__}")
    check_text(extra or "", "input")
    if not row["instruction"].strip():
        raise ConversationError("instruction: empty")
    user = f"{row['instruction']}\n{extra}" if extra and extra.strip() else row["instruction"]
    return [_make_message("user", {"content": user}, "instruction", clean),
            _make_message("assistant", {"content": row["output"]}, "output", clean)]


def _sft_shape(row: dict) -> str:
    """Which SFT shape a row has (a key of SFT_SHAPES), refusing rows with none or with two."""
    found = [name for name in SFT_SHAPES if name in row]
    if len(found) > 1:
        raise ConversationError(f"both {' and '.join(repr(f) for f in found)}: a row has one shape ({SFT_SHAPES_TEXT})")
    if found:
        return found[0]
    if "prompt" in row:
        raise ConversationError("missing field 'completion' (an SFT 'prompt' row needs its 'completion')")
    if "output" in row:
        raise ConversationError("missing field 'instruction' (an Alpaca row holds 'instruction', 'input' and 'output')")
    others = sorted(set(row) - ID_KEYS - {"system"})
    got = f"; found {others}" if others else ""
    raise ConversationError(f"missing field 'messages' (an SFT row holds {SFT_SHAPES_TEXT}{got})")


def _for_version(row, version: str | None, tool_call_ids: str):
    """The ids a row keeps or gets (tool_call_ids), before the version's own checks."""
    if tool_call_ids not in TOOL_CALL_IDS:
        raise ValueError(f"tool_call_ids must be one of {', '.join(TOOL_CALL_IDS)}, got {tool_call_ids!r}")
    if tool_call_ids == "keep" or not _has_calls(row):
        return row
    if version is None:
        raise ValueError("tool_call_ids='regenerate' needs the tokenizer version")
    return regenerate_tool_call_ids(row, version)


def _has_calls(row: Conversation | Preference) -> bool:
    messages = row.messages if isinstance(row, Conversation) else (*row.prompt, row.chosen, row.rejected)
    return any(m.tool_calls for m in messages)


def _unpaired_for_version(row: Unpaired, version: str | None, tool_call_ids: str) -> Unpaired:
    """_for_version for a KTO row: its prompt and reply are one conversation."""
    conversation = _for_version(Conversation((*row.prompt, row.completion), row.tools), version, tool_call_ids)
    return replace(row, prompt=conversation.messages[:-1], completion=conversation.messages[-1])


def parse_sft_row(row: Any, clean: bool = False, *, version: str | None = None,
                  tool_call_ids: str = "keep") -> Conversation:
    """Parse and check one SFT row in any shape above: the messages the encoder trains on, and the
    tools they may call (a 'messages' row only). With a tokenizer `version`, also what that version
    cannot encode (chat/tool_rules.py), after the call ids are kept or regenerated (chat/tool_ids.py)."""
    if not isinstance(row, dict):
        raise ConversationError(f"expected a JSON object with 'messages', got {type(row).__name__}")
    shape = _sft_shape(row)
    chat_completion = shape == "completion" and _is_chat_prompt_completion(row)
    if "tools" in row and shape != "messages" and not chat_completion:
        raise ConversationError(f"'tools' needs the 'messages' shape (OpenAI messages with tool_calls and 'tool' "
                                f"results) or 'prompt'/'completion' as message lists, not {SHAPE_NAMES[shape]}")
    hub = shape == "messages" and "prompt_id" in row
    allowed = SFT_SHAPES[shape] | (HUB_KEYS["sft"] if hub else frozenset())
    _refuse_unknown_keys(row, allowed, f"an SFT row holds {SFT_SHAPES_TEXT}", "sft")
    tools = parse_tools(row.get("tools"))
    name = None
    if chat_completion:
        (messages, name), where = _chat_prompt_completion(row, clean, tools), "prompt"
    elif shape == "completion":
        messages, where = _prompt_completion_messages(row, clean), "prompt"
    elif shape == "instruction":
        messages, where = _alpaca_messages(row, clean), "instruction"
    elif shape == "conversations":
        messages, where = _sharegpt_messages(row["conversations"], clean), "conversations"
    else:
        messages, where = parse_messages(row["messages"], "messages", clean, with_tools=bool(tools)), "messages"
    if name is None:  # checked before the row's system prompt goes first, so errors keep the row's own indices
        _check_sft(messages, where)
        messages = _link_tools(messages, tools, where)
    system = _system(row, clean)
    conversation = _for_version(Conversation(tuple(_with_system(system, messages, where)), tools), version, tool_call_ids)
    if version is not None:
        offset, at = int(system is not None), name or (lambda i: f"{where}[{i}]")
        check_messages(conversation.messages, tools, version, lambda i: "system" if i < offset else at(i - offset))
    return conversation


def parse_preference(row: Any, clean: bool = False, *, version: str | None = None,
                     tool_call_ids: str = "keep") -> Preference:
    """Parse and check one DPO row: {prompt, chosen, rejected}, strings or message lists, an
    optional top-level system prompt, and the tools the prompt and the replies may call; with a
    `version`, as parse_sft_row."""
    if not isinstance(row, dict):
        raise ConversationError(f"expected a JSON object, got {type(row).__name__}")
    if "prompt" not in row and isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list):
        row = {**row, "prompt": implicit_prompt(row["chosen"], row["rejected"])}
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            raise ConversationError(f"missing field '{key}'")
        if not isinstance(row[key], (str, list)):
            raise ConversationError(f"'{key}' must be a string or a list of messages, got {type(row[key]).__name__}")
    hub = "prompt_id" in row
    _refuse_unknown_keys(row, DPO_KEYS | (HUB_KEYS["dpo"] if hub else frozenset()),
                         "a DPO row holds 'prompt', 'chosen' and 'rejected'", "dpo")
    tools = parse_tools(row.get("tools"))
    prompt = _parse_prompt(row["prompt"], clean, tools)
    # Replies that repeat the prompt (ultrafeedback) repeat it as written, without the row's system.
    chosen = _completion(row["chosen"], prompt, "chosen", clean, bool(tools))
    rejected = _completion(row["rejected"], prompt, "rejected", clean, bool(tools))
    for field, reply in (("chosen", chosen), ("rejected", rejected)):
        _check_calls_known(reply, tools, _reply_at(row, field))
    if _reply_key(chosen) == _reply_key(rejected):
        raise ConversationError("chosen and rejected are the same reply")
    prompt = _link_tools(prompt, tools, "prompt")
    system = _system(row, clean)
    pair = _for_version(Preference(tuple(_with_system(system, prompt, "prompt")), chosen, rejected, tools),
                        version, tool_call_ids)
    if version is not None:
        _check_pair_for_version(pair, row, version, offset=int(system is not None))
    return pair


def _parse_prompt(raw: str | list, clean: bool, tools: tuple[Tool, ...]) -> list[Message]:
    """A preference or KTO row's prompt: one user message as a string, or messages ending with a
    user turn (or the results of the last tool calls)."""
    if isinstance(raw, str):
        check_text(raw, "prompt")
        if not raw.strip():
            raise ConversationError("prompt: empty")
        prompt = [Message("user", raw.strip() if clean else raw)]
    else:
        prompt = parse_messages(raw, "prompt", clean, with_tools=bool(tools))
    _check_turn_order(prompt, "prompt", last="user")
    return prompt


def parse_unpaired(row: Any, clean: bool = False, *, version: str | None = None,
                   tool_call_ids: str = "keep") -> Unpaired:
    """Parse and check one KTO row: {prompt, completion, label}, the prompt and the reply strings or
    message lists (as in a DPO row), `label` true (a desirable reply) or false (an undesirable one),
    an optional top-level system prompt and tools; with a `version`, as parse_sft_row."""
    if not isinstance(row, dict):
        raise ConversationError(f"expected a JSON object with 'prompt', 'completion' and 'label', got {type(row).__name__}")
    for key in ("prompt", "completion", "label"):
        if key not in row:
            raise ConversationError(f"missing field '{key}' (a KTO row holds 'prompt', 'completion' and 'label')")
    for key in ("prompt", "completion"):
        if not isinstance(row[key], (str, list)):
            raise ConversationError(f"'{key}' must be a string or a list of messages, got {type(row[key]).__name__}")
    if not isinstance(row["label"], bool):
        raise ConversationError(f"'label' must be true (a desirable reply) or false (an undesirable one), "
                                f"got {json.dumps(row['label'])}")
    _refuse_unknown_keys(row, KTO_KEYS, "a KTO row holds 'prompt', 'completion' and 'label'", "kto")
    tools = parse_tools(row.get("tools"))
    prompt = _parse_prompt(row["prompt"], clean, tools)
    completion = _completion(row["completion"], prompt, "completion", clean, bool(tools))
    _check_calls_known(completion, tools, _reply_at(row, "completion"))
    prompt = _link_tools(prompt, tools, "prompt")
    system = _system(row, clean)
    unpaired = _unpaired_for_version(Unpaired(tuple(_with_system(system, prompt, "prompt")), completion, row["label"],
                                              tools), version, tool_call_ids)
    if version is not None:
        n, offset, at = len(unpaired.prompt), int(system is not None), _reply_at(row, "completion")
        check_messages((*unpaired.prompt, unpaired.completion), tools, version,
                       lambda i: at if i == n else "system" if i < offset else f"prompt[{i - offset}]")
    return unpaired


def implicit_prompt(chosen: list, rejected: list) -> list:
    """TRL's implicit prompt: the messages both conversations start with, as written. They must then
    differ in exactly one message each, the reply."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise ConversationError("missing field 'prompt' (chosen and rejected do not start with the same message: "
                                "without 'prompt', the prompt is the messages both conversations start with)")
    if n == len(chosen) == len(rejected):
        raise ConversationError("chosen and rejected are the same conversation")
    for field, conversation in (("chosen", chosen), ("rejected", rejected)):
        if len(conversation) != n + 1:
            raise ConversationError(
                f"{field}: {len(conversation) - n} message(s) after the {n} both conversations start with; a pair "
                "without 'prompt' shares every message but the last, the reply")
    return chosen[:n]


def _reply_at(row: dict, field: str) -> str:
    """Where a DPO reply is in the row: the field itself, or the last message of its list."""
    return field if isinstance(row[field], str) else f"{field}[{len(row[field]) - 1}]"


def _check_pair_for_version(pair: Preference, row: dict, version: str, offset: int) -> None:
    """Each reply after the prompt is one conversation for the version's checks."""
    n = len(pair.prompt)
    for field, reply in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        at = _reply_at(row, field)
        check_messages((*pair.prompt, reply), pair.tools, version,
                       lambda i, at=at: at if i == n else "system" if i < offset else f"prompt[{i - offset}]")
