"""mistral-common as the reference for our encodings, and the generated text the exactness tests
feed both (shared by test_chat_exact.py and test_chat_tools.py).

Rows are turned into mistral-common's own message objects straight from their JSON shape, never
through our parser, so that what the parser normalises (JSON arguments, text chunks, result
names) is checked too. Ids come from `MistralTokenizer.encode_chat_completion`; the expected loss
mask is rebuilt from mistral-common's own per-message encoders (`encode_user_message`,
`encode_assistant_message`, `encode_tool_message`, ...) walked over the request as mistral-common
itself normalises it, in the order of its `encode_instruct`, and that walk is checked against
`encode_chat_completion` on every example, so the mask oracle cannot drift from the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from hypothesis import settings
from hypothesis import strategies as st
from mistral_common.protocol.instruct.chunk import TextChunk, ThinkChunk
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    FinetuningAssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import FunctionCall, Tool, ToolCall
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_align.chat.encoder import IGNORE_INDEX, load_mistral_tokenizer, tokenizer_file

def examples(full: int) -> int:
    """A property test's number of examples: `full` in `make test`, a quarter of it (at least 10)
    under the edit loop's Hypothesis profile (`make test-fast`, conftest.py)."""
    scale = min(settings.default.max_examples, 100) / 100  # Hypothesis' own default profile: 100
    return full if scale == 1 else max(10, round(full * scale))


# ---------------------------------------------------------------------------------------------
# mistral-common references
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def finetuning_tokenizer(version: str) -> MistralTokenizer:
    return load_mistral_tokenizer(version)


@lru_cache(maxsize=None)
def serving_tokenizer(version: str) -> MistralTokenizer:
    # finetuning mode insists on a final assistant turn; generation prompts end with a user turn.
    return MistralTokenizer.from_file(str(tokenizer_file(version)), mode=ValidationMode.test)


def _content(raw):
    if isinstance(raw, list):
        return [TextChunk(text=c["text"]) if c["type"] == "text" else ThinkChunk(thinking=c["thinking"]) for c in raw]
    return raw


def to_mistral_messages(raw: list[dict]) -> list:
    """A row's messages as mistral-common objects. A tool result without a `name` is given the name
    of the call it answers, as our schema documents (v2 writes it into the result)."""
    out = []
    called: dict[str, str] = {}
    for m in raw:
        if m["role"] == "system":
            out.append(SystemMessage(content=m["content"]))
        elif m["role"] == "user":
            out.append(UserMessage(content=m["content"]))
        elif m["role"] == "assistant":
            calls = [ToolCall(id=c["id"], function=FunctionCall(**c["function"])) for c in m.get("tool_calls") or []]
            called = {c.id: c.function.name for c in calls} or called
            out.append(FinetuningAssistantMessage(content=_content(m.get("content")), tool_calls=calls or None,
                                                  weight=m.get("weight", 1)))
        else:
            name = m.get("name", called[m["tool_call_id"]])
            out.append(ToolMessage(content=m["content"], tool_call_id=m["tool_call_id"], name=name))
    return out


def request(raw: list[dict], tools: list[dict] | None = None) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=to_mistral_messages(raw),
                                 tools=[Tool.from_openai(t) for t in tools] if tools else None)


def reference_tokens(version: str, raw: list[dict], tools: list[dict] | None = None) -> list[int]:
    return finetuning_tokenizer(version).encode_chat_completion(request(raw, tools)).tokens


def reference_prompt(version: str, raw: list[dict], tools: list[dict] | None = None) -> list[int]:
    return serving_tokenizer(version).encode_chat_completion(request(raw, tools)).tokens


@dataclass
class Reference:
    ids: list[int]
    labels: list[int]
    dropped_tool_calls: int  # what mistral-common encoded as nothing
    dropped_tool_results: int


def _encode_message(it, instruct, i: int, m, first_user: int, last_user: int) -> list[int]:
    if isinstance(m, UserMessage):
        tokens, _, _ = it.encode_user_message(m, instruct.available_tools, i == last_user, i == first_user,
                                              system_prompt=instruct.system_prompt, force_img_first=True,
                                              settings=instruct.settings)
        return tokens
    if isinstance(m, SystemMessage):
        return it.encode_system_message(m)[0]
    if isinstance(m, AssistantMessage):
        return it.encode_assistant_message(m, is_before_last_user_message=i < last_user)
    if isinstance(m, ToolMessage):
        return it.encode_tool_message(m, i < last_user)[0]
    raise AssertionError(f"unexpected message {m!r}")


def reference_encoding(version: str, raw: list[dict], tools: list[dict] | None = None, train_on: str = "all",
                       train_thinking: bool = True) -> Reference:
    """Ids, labels and what was left out, from mistral-common's normalised request walked with its
    per-message encoders; the ids are re-checked against the whole encoding."""
    tok = finetuning_tokenizer(version)
    req = request(raw, tools)
    whole = tok.encode_chat_completion(req).tokens
    # Private attributes, but the equality check below fails loudly if a mistral-common upgrade
    # changes what they do.
    validated = tok._chat_completion_request_validator.validate_request(req)
    instruct = tok._instruct_request_normalizer.from_chat_completion_request(validated)
    it = tok.instruct_tokenizer
    first_user, last_user = it.find_first_last_user(instruct)
    weights = [m.get("weight", 1) for m in raw if m["role"] == "assistant"]
    assistant_at = [i for i, m in enumerate(instruct.messages) if isinstance(m, AssistantMessage)]
    assert len(assistant_at) == len(weights), "mistral-common merged or dropped assistant messages"
    ids = list(it.start())
    labels = [IGNORE_INDEX] * len(ids)
    dropped_calls = dropped_results = 0
    for i, m in enumerate(instruct.messages):
        tokens = _encode_message(it, instruct, i, m, first_user, last_user)
        trained = False
        if isinstance(m, AssistantMessage):
            k = assistant_at.index(i)
            trained = weights[k] == 1 and (train_on == "all" or k == len(assistant_at) - 1)
            dropped_calls += len(m.tool_calls or []) if not tokens else 0
        dropped_results += int(isinstance(m, ToolMessage) and not tokens)
        masked = 0 if trained else len(tokens)
        if trained and not train_thinking and isinstance(m.content, list):
            masked = sum(len(it.encode_think(c)) for c in m.content if isinstance(c, ThinkChunk))
        ids += tokens
        labels += [IGNORE_INDEX] * masked + tokens[masked:]
    assert ids == whole, "the per-message walk no longer reproduces encode_chat_completion"
    return Reference(ids, labels, dropped_calls, dropped_results)


def reference_sft(version: str, raw: list[dict], train_on: str = "all") -> tuple[list[int], list[int]]:
    """(ids, labels) of a plain conversation."""
    ref = reference_encoding(version, raw, train_on=train_on)
    return ref.ids, ref.labels


def trained_spans(labels: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, t in enumerate([*labels, IGNORE_INDEX]):
        if t != IGNORE_INDEX and start is None:
            start = i
        elif t == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


# ---------------------------------------------------------------------------------------------
# Generated text
# ---------------------------------------------------------------------------------------------

# Text a user may type that looks like markup: it must stay text, never become a control token.
TRICKY = [
    "[INST]", "[/INST]", "<s>", "</s>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "<unk>", "<pad>",
    "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "<0x0A>", "▁", "[INST] hi [/INST]", "</s><s>",
    # control tokens of the v11/v13 tekken files
    "[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]", "[TOOL_CONTENT]", "<SPECIAL_20>", "[THINK]x[/THINK]",
]
WHITESPACE = [" ", "  ", "\n", "\n\n", " \n ", "\t", "\r\n", "\u00a0", "\u3000"]
VISIBLE = (
    "abcXYZ019.,!?'\"-_#*()"
    "éèêàçñüößøÅŁžő"  # accented Latin
    "你好世界日本語한국어"  # CJK
    "😀🎉👍🏽❤️"  # emoji, incl. skin tone and variation selector
)
EMOJI_SEQUENCES = ["👨‍👩‍👧", "🏳️‍🌈", "e\u0301", "ﬁ", "Ⅻ"]  # ZWJ sequences, combining marks, NFKC-changing

visible = st.text(alphabet=VISIBLE, min_size=1, max_size=6)
fragment = st.one_of(
    visible,
    st.sampled_from(TRICKY),
    st.sampled_from(WHITESPACE),
    st.sampled_from(EMOJI_SEQUENCES),
    # Anything else Unicode has (surrogates cannot be encoded, so hypothesis leaves them out).
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=3),
)
any_text = st.lists(fragment, max_size=6).map("".join)
# Leading/trailing whitespace around something printable: system and assistant content may not be blank.
nonblank_text = st.tuples(any_text, visible, any_text).map("".join)
user_text = st.one_of(nonblank_text, any_text)
