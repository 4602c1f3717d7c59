"""Tool calls, tool results and thinking: every token equal to mistral-common's for each version
that has them, the mask equal to one built from mistral-common's own per-message encoders
(tests/chat_reference.py, itself checked against `encode_chat_completion`), every bad row refused
with one reason before a model loads, and `tool_call_ids: regenerate`.

Rows go in as JSON text through `check_row`, the one path that training, `validate` and
`preview` share; the reference gets them as mistral-common's own message objects, built from the
same JSON without our parser.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from chat_reference import (
    TRICKY,
    any_text,
    examples,
    finetuning_tokenizer,
    nonblank_text,
    reference_encoding,
    reference_prompt,
    reference_tokens,
    request,
    trained_spans,
    user_text,
    visible,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mistral_common.exceptions import MistralCommonException

from mistral_align.chat.encoder import IGNORE_INDEX, SYSTEM_BLOCK_VERSIONS, TOKENIZER_VERSIONS, get_encoder
from mistral_align.chat.schema import Conversation, Text, Thinking, parse_preference, parse_sft_row
from mistral_align.chat.tool_ids import regenerate_tool_call_ids
from mistral_align.chat.tool_rules import (
    NINE_CHARACTER_ID_VERSIONS,
    TEXT_WITH_CALLS_VERSIONS,
    THINKING_VERSIONS,
    TOOL_VERSIONS,
    id_rule,
)
from mistral_align.data.encode import categorize, check_row, encode_batch

VERSIONS = ("v2", "v3", "v7", "v3-tekken", "v7-tekken", "v11", "v13")
assert set(VERSIONS) == set(TOOL_VERSIONS) == set(TOKENIZER_VERSIONS) - {"v1"}  # no tool version goes untested

# Typed by a user, a tool or the model: must stay text wherever it appears.
TOOL_TRICKY = [*TRICKY, "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[/AVAILABLE_TOOLS]", '{"name": "x"}', "[TOOL_CALLS][{"]


def sft_row(messages: list[dict], tools: list[dict] | None) -> str:
    return json.dumps({"messages": messages, **({"tools": tools} if tools is not None else {})}, ensure_ascii=False)


def checked(kind: str, row: dict | str, version: str, **kwargs):
    text = row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)
    return check_row(kind, text, get_encoder(version), **kwargs)


# ---------------------------------------------------------------------------------------------
# Control tokens: how many each row must have, counted from the row (not from mistral-common)
# ---------------------------------------------------------------------------------------------


def expected_controls(version: str, messages: list[dict], tools: list[dict] | None) -> Counter:
    """Each control token once per structural use; none from typed text. v2 leaves out the calls
    and results before the last user message (and the EOS of a calling message)."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")

    def kept(i: int) -> bool:
        return version != "v2" or i > last_user
    n = Counter({"<s>": 1})
    n["[INST]"] = n["[/INST]"] = sum(m["role"] == "user" for m in messages)
    if version in SYSTEM_BLOCK_VERSIONS and messages[0]["role"] == "system":
        n["[SYSTEM_PROMPT]"] = n["[/SYSTEM_PROMPT]"] = 1
    if tools:
        n["[AVAILABLE_TOOLS]"] = n["[/AVAILABLE_TOOLS]"] = 1
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") or []
        if m["role"] == "assistant" and (kept(i) or not calls):
            n["</s>"] += 1
            if calls:
                per_call = version in ("v11", "v13")
                n["[TOOL_CALLS]"] += len(calls) if per_call else 1
                n["[ARGS]"] += len(calls) if per_call else 0
                n["[CALL_ID]"] += len(calls) if version == "v11" else 0
            if isinstance(m.get("content"), list):
                thoughts = sum(c["type"] == "thinking" for c in m["content"])
                n["[THINK]"] += thoughts
                n["[/THINK]"] += thoughts
        if m["role"] == "tool" and kept(i):
            n["[TOOL_RESULTS]"] += 1
            n["[/TOOL_RESULTS]"] += 1
            n["[TOOL_CONTENT]"] += int(version in ("v7", "v7-tekken", "v11"))
    return +n


def controls_in(version: str, ids: list[int]) -> Counter:
    raw = get_encoder(version).raw
    return Counter(raw.id_to_piece(i) for i in ids if raw.is_special(i))


# ---------------------------------------------------------------------------------------------
# Generated tool rows
# ---------------------------------------------------------------------------------------------

tricky_text = st.lists(st.one_of(visible, st.sampled_from(TOOL_TRICKY), any_text), max_size=4).map("".join)
json_scalar = st.one_of(tricky_text, st.integers(-(10**12), 10**12), st.floats(allow_nan=False, allow_infinity=False),
                        st.booleans(), st.none())
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(tricky_text, inner,
                                                                                                   max_size=3),
                          max_leaves=8)
json_object = st.dictionaries(tricky_text, json_value, max_size=4)
TOOL_NAMES = ["get_weather", "search", "lookup-user", "calc_2", "A"]
NINE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
# A small pool, so that ids come back in later turns of a row (legal; each turn pairs its own).
ID_POOL = ["abcdefgh1", "ZZZZZZZZ9", "0a1B2c3D4"]


def call_ids(version: str):
    nine = st.one_of(st.sampled_from(ID_POOL), st.text(NINE, min_size=9, max_size=9))
    if version in NINE_CHARACTER_ID_VERSIONS:
        return nine
    # v2 does not encode ids and v13 takes any non-empty one but "null".
    return st.one_of(nine, st.text(min_size=1, max_size=12).filter(lambda s: s != "null"), st.just("call_abc123XYZ"))


def json_spelling(draw, value) -> str:
    """The same JSON in one of the spellings data sets use; the encoding must not depend on which."""
    style = draw(st.sampled_from(["compact", "spaced", "ascii", "indented"]))
    return {"compact": lambda: json.dumps(value, separators=(",", ":"), ensure_ascii=False),
            "spaced": lambda: json.dumps(value, ensure_ascii=False),
            "ascii": lambda: json.dumps(value),
            "indented": lambda: json.dumps(value, indent=2, ensure_ascii=False)}[style]()


@st.composite
def tool_lists(draw) -> list[dict]:
    names = draw(st.lists(st.sampled_from(TOOL_NAMES), min_size=1, max_size=3, unique=True))
    tools = []
    for name in names:
        fn: dict = {"name": name}
        if draw(st.booleans()):
            fn["description"] = draw(tricky_text)
        if draw(st.booleans()):
            keys = draw(st.lists(tricky_text, max_size=3, unique=True))
            fn["parameters"] = {"type": "object", "required": keys[:1],
                                "properties": {k: {"type": "string", "description": draw(tricky_text)} for k in keys}}
        tools.append({"type": "function", "function": fn})
    return tools


def draw_calls(draw, version: str, names: list[str], most: int) -> list[dict]:
    ids = draw(st.lists(call_ids(version), min_size=1, max_size=most, unique=True))
    calls = []
    for call_id in ids:
        args = draw(json_object)
        spelled = args if draw(st.booleans()) else json_spelling(draw, args)
        calls.append({"id": call_id, "type": "function", "function": {"name": draw(st.sampled_from(names)),
                                                                       "arguments": spelled}})
    return calls


def draw_reply_content(draw, version: str, with_calls: bool):
    """Content of an assistant message: text, text chunks, or (v13) thinking first; absent, null or
    "" beside calls on versions that cannot have both."""
    if with_calls and (version not in TEXT_WITH_CALLS_VERSIONS or draw(st.booleans())):
        return draw(st.sampled_from([None, "", "absent"]))
    if version in THINKING_VERSIONS and draw(st.booleans()):
        chunks = [{"type": "thinking", "thinking": draw(nonblank_text)} for _ in range(draw(st.integers(1, 2)))]
        if not with_calls or draw(st.booleans()):
            chunks.append({"type": "text", "text": draw(nonblank_text)})
        return chunks
    if draw(st.integers(0, 3)) == 0:  # text as chunks: joined by a blank line, as mistral-common joins them
        return [{"type": "text", "text": draw(nonblank_text)} for _ in range(draw(st.integers(1, 3)))]
    return draw(nonblank_text)


def assistant(draw, version: str, content, calls: list[dict] | None = None) -> dict:
    m: dict = {"role": "assistant"}
    if content != "absent":
        m["content"] = content
    if calls:
        m["tool_calls"] = calls
    weight = draw(st.sampled_from([None, None, None, 1, 0]))
    if weight is not None:
        m["weight"] = weight
    return m


def draw_results(draw, calls: list[dict]) -> list[dict]:
    """One result per call, in any order (v11 and v13 encode them in the order of the calls)."""
    out = []
    for call in draw(st.permutations(calls)):
        content = draw(st.one_of(tricky_text, json_value.map(lambda v: json.dumps(v, ensure_ascii=False)),
                                 st.just("")))
        result = {"role": "tool", "tool_call_id": call["id"], "content": content}
        if draw(st.booleans()):
            result["name"] = call["function"]["name"]
        out.append(result)
    return out


@st.composite
def tool_conversations(draw, version: str, end: str = "assistant") -> tuple[list[dict], list[dict]]:
    """(messages, tools). end: "assistant" (an SFT row: a reply or a last call without results),
    "prompt" (a DPO prompt: a user message or the results of the last calls)."""
    tools = draw(tool_lists())
    names = [t["function"]["name"] for t in tools]
    messages: list[dict] = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(nonblank_text)})
    turns = draw(st.integers(1, 3))
    for t in range(turns):
        last = t == turns - 1
        messages.append({"role": "user", "content": draw(user_text)})
        if end == "prompt" and last and draw(st.booleans()):
            break
        rounds = draw(st.integers(0, 2))
        for r in range(rounds):
            # v2 encodes one result per call turn after the last user message (earlier ones are left out).
            most = 1 if version == "v2" and last else 3
            calls = draw_calls(draw, version, names, most)
            messages.append(assistant(draw, version, draw_reply_content(draw, version, with_calls=True), calls))
            if end == "assistant" and last and r == rounds - 1 and draw(st.booleans()):
                return messages, tools  # the row ends with the calls it trains
            messages += draw_results(draw, calls)
        if end == "prompt" and last:  # the prompt ends with the last results (or its user message)
            return messages, tools
        messages.append(assistant(draw, version, draw_reply_content(draw, version, with_calls=False)))
    return messages, tools


def usable_sft(messages: list[dict]) -> bool:
    return (any(m["role"] == "user" and m["content"].strip() for m in messages)
            and any(m.get("weight", 1) == 1 for m in messages if m["role"] == "assistant"))


SFT_EXAMPLES = 40
DPO_EXAMPLES = 25


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=examples(SFT_EXAMPLES), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_sft_tool_rows_equal_mistral_common(version, data):
    messages, tools = data.draw(tool_conversations(version))
    assume(usable_sft(messages))
    row = sft_row(messages, tools)
    result = checked("sft", row, version)
    ref = reference_encoding(version, messages, tools)
    if all(label == IGNORE_INDEX for label in ref.labels):
        # The only trained replies were ones the version encodes as nothing (v2 drops tool calls):
        # nothing would train, and the row is refused as such.
        assert result.error is not None and result.error.startswith("no trained tokens"), result.error
        return
    assert result.error is None, result.error
    assert result.ids == {"input_ids": ref.ids, "labels": ref.labels}
    assert (result.dropped_tool_calls, result.dropped_tool_results) == (ref.dropped_tool_calls, ref.dropped_tool_results)
    assert controls_in(version, ref.ids) == expected_controls(version, messages, tools)

    conversation = parse_sft_row(json.loads(row), version=version)
    enc = get_encoder(version)
    last = enc.encode_sft(conversation.messages, "last", tools=conversation.tools)
    assert last.labels == reference_encoding(version, messages, tools, train_on="last").labels
    if version in THINKING_VERSIONS:
        unthought = enc.encode_sft(conversation.messages, tools=conversation.tools, train_thinking=False)
        assert unthought.labels == reference_encoding(version, messages, tools, train_thinking=False).labels


@st.composite
def replies(draw, version: str, names: list[str]) -> dict:
    """One assistant reply: text, calls, or both where the version allows (thinking on v13)."""
    with_calls = draw(st.booleans())
    calls = draw_calls(draw, version, names, 3) if with_calls else None
    content = draw_reply_content(draw, version, with_calls)
    reply = {"role": "assistant", **({} if content == "absent" else {"content": content})}
    return {**reply, **({"tool_calls": calls} if calls else {})}


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=examples(DPO_EXAMPLES), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_dpo_tool_rows_equal_mistral_common(version, data):
    prompt, tools = data.draw(tool_conversations(version, end="prompt"))
    assume(any(m["role"] == "user" and m["content"].strip() for m in prompt))
    names = [t["function"]["name"] for t in tools]
    chosen, rejected = data.draw(replies(version, names)), data.draw(replies(version, names))
    shape = data.draw(st.sampled_from(["reply", "conversation"]))  # [reply], or the prompt repeated (ultrafeedback)
    sides = {k: [m] if shape == "reply" else [*prompt, m] for k, m in (("chosen", chosen), ("rejected", rejected))}
    result = checked("dpo", {"prompt": prompt, **sides, "tools": tools}, version)
    assume(result.error != "chosen and rejected are the same reply")
    assert result.error is None, result.error
    ids = result.ids
    assert ids["prompt_ids"] == reference_prompt(version, prompt, tools)
    for side, reply in (("chosen", chosen), ("rejected", rejected)):
        full = reference_encoding(version, [*prompt, reply], tools)
        assert ids["prompt_ids"] + ids[f"{side}_ids"] == full.ids
        assert ids[f"{side}_ids"][-1] == get_encoder(version).eos_id
        assert (result.dropped_tool_calls, result.dropped_tool_results) == (full.dropped_tool_calls,
                                                                            full.dropped_tool_results)


# ---------------------------------------------------------------------------------------------
# Explicit layouts, read as documentation
# ---------------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
TOOLS = [WEATHER]


def call(call_id: str = "abcdefgh1", name: str = "get_weather", arguments='{"city": "Paris"}') -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def calling(*calls: dict, **fields) -> dict:
    return {"role": "assistant", "tool_calls": list(calls), **fields}


def result(call_id: str = "abcdefgh1", content: str = "sunny", **fields) -> dict:
    return {"role": "tool", "tool_call_id": call_id, "content": content, **fields}


U = {"role": "user", "content": "Weather in Paris?"}
A = {"role": "assistant", "content": "Sunny."}
ONE_ROUND = [U, calling(call()), result(content='{"sky": "clear"}'), A]

# Decoded with special tokens kept (sentencepiece shows pieces: ▁ is a space).
TOOL_JSON = ('[{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", '
             '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]')
EXPECTED_LAYOUT = {
    # v2: calls as a JSON list without ids; a result carries the function's name.
    "v2": ('<s>[AVAILABLE_TOOLS]▁' + TOOL_JSON.replace(" ", "▁") + '[/AVAILABLE_TOOLS][INST]▁Weather▁in▁Paris?[/INST]'
           '[TOOL_CALLS]▁[{"name":▁"get_weather",▁"arguments":▁{"city":▁"Paris"}}]</s>'
           '[TOOL_RESULTS]▁[{"name":▁"get_weather",▁"content":▁{"sky":▁"clear"}}][/TOOL_RESULTS]▁Sunny.</s>'),
    # v3: the call's id in the list; a result is {"content", "call_id"} (JSON content parsed).
    "v3-tekken": (f'<s>[AVAILABLE_TOOLS]{TOOL_JSON}[/AVAILABLE_TOOLS][INST]Weather in Paris?[/INST]'
                  '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcdefgh1"}]</s>'
                  '[TOOL_RESULTS]{"content": {"sky": "clear"}, "call_id": "abcdefgh1"}[/TOOL_RESULTS]Sunny.</s>'),
    # v7: a result is its id, [TOOL_CONTENT], and the content as written.
    "v7-tekken": (f'<s>[AVAILABLE_TOOLS]{TOOL_JSON}[/AVAILABLE_TOOLS][INST]Weather in Paris?[/INST]'
                  '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcdefgh1"}]</s>'
                  '[TOOL_RESULTS]abcdefgh1[TOOL_CONTENT]{"sky": "clear"}[/TOOL_RESULTS]Sunny.</s>'),
    # v11: each call is name [CALL_ID] id [ARGS] arguments.
    "v11": (f'<s>[AVAILABLE_TOOLS]{TOOL_JSON}[/AVAILABLE_TOOLS][INST]Weather in Paris?[/INST]'
            '[TOOL_CALLS]get_weather[CALL_ID]abcdefgh1[ARGS]{"city": "Paris"}</s>'
            '[TOOL_RESULTS]abcdefgh1[TOOL_CONTENT]{"sky": "clear"}[/TOOL_RESULTS]Sunny.</s>'),
    # v13: no ids at all; the tools go before the *first* user message.
    "v13": (f'<s>[AVAILABLE_TOOLS]{TOOL_JSON}[/AVAILABLE_TOOLS][INST]Weather in Paris?[/INST]'
            '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}</s>'
            '[TOOL_RESULTS]{"sky": "clear"}[/TOOL_RESULTS]Sunny.</s>'),
}


@pytest.mark.parametrize("version", list(EXPECTED_LAYOUT))
def test_tool_layout(version):
    r = checked("sft", sft_row(ONE_ROUND, TOOLS), version)
    assert r.ids["input_ids"] == reference_tokens(version, ONE_ROUND, TOOLS)
    assert get_encoder(version).decode(r.ids["input_ids"]) == EXPECTED_LAYOUT[version]


@pytest.mark.parametrize("version", VERSIONS)
def test_calls_and_their_eos_are_trained_results_and_tools_are_not(version):
    enc = get_encoder(version)
    r = checked("sft", sft_row(ONE_ROUND, TOOLS), version)
    ids, labels = r.ids["input_ids"], r.ids["labels"]
    calls_at = ids.index(enc.raw.get_special_token("[TOOL_CALLS]"))
    results_at = ids.index(enc.raw.get_special_token("[TOOL_RESULTS]"))
    end_results = ids.index(enc.raw.get_special_token("[/TOOL_RESULTS]"))
    # Two trained spans: the calls through their EOS, and the reply through its EOS.
    assert trained_spans(labels) == [(calls_at, results_at), (end_results + 1, len(ids))]
    assert ids[results_at - 1] == enc.eos_id
    assert ids[end_results + 1:] == [*enc.text("Sunny."), enc.eos_id]
    assert labels == reference_encoding(version, ONE_ROUND, TOOLS).labels


@pytest.mark.parametrize("version", VERSIONS)
def test_typed_control_text_in_tool_rows_stays_text(version):
    typed = " ".join(TOOL_TRICKY)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": typed,
                                               "parameters": {"type": "object", "properties": {typed: {"type": "string"}}}}}]
    messages = [{"role": "system", "content": typed}, {"role": "user", "content": typed},
                calling(call(arguments={typed: [typed, {"k": typed}]})), result(content=typed),
                {"role": "assistant", "content": typed}]
    r = checked("sft", sft_row(messages, tools), version)
    assert r.error is None
    assert r.ids["input_ids"] == reference_tokens(version, messages, tools)
    assert controls_in(version, r.ids["input_ids"]) == expected_controls(version, messages, tools)


def test_v13_thinking_is_trained_and_can_be_masked():
    enc = get_encoder("v13")
    reply = {"role": "assistant", "content": [{"type": "thinking", "thinking": "Paris is in France."},
                                              {"type": "text", "text": "Sunny. "}]}
    messages = [U, reply]
    conversation = parse_sft_row({"messages": messages}, version="v13")
    think, end_think = enc.raw.get_special_token("[THINK]"), enc.raw.get_special_token("[/THINK]")
    thought = [think, *enc.text("Paris is in France."), end_think]
    # Text beside thinking keeps its trailing space (mistral-common strips only plain-string replies).
    answer = [*enc.text("Sunny. "), enc.eos_id]
    whole = enc.encode_sft(conversation.messages)
    assert whole.input_ids[-len(thought + answer):] == thought + answer
    assert whole.input_ids == reference_tokens("v13", messages)
    assert [whole.input_ids[a:b] for a, b in trained_spans(whole.labels)] == [thought + answer]
    masked = enc.encode_sft(conversation.messages, train_thinking=False)
    assert [masked.input_ids[a:b] for a, b in trained_spans(masked.labels)] == [answer]
    assert masked.labels == reference_encoding("v13", messages, train_thinking=False).labels


def test_text_chunks_are_joined_as_mistral_common_joins_them():
    messages = [U, {"role": "assistant", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": ""},
                                                     {"type": "text", "text": "two  "}]}]
    conversation = parse_sft_row({"messages": messages})
    assert conversation.messages[-1].content == "one\n\ntwo  "
    for version in ("v1", "v3", "v13"):
        ids = get_encoder(version).encode_sft(conversation.messages).input_ids
        assert ids == reference_tokens(version, messages)


def test_v11_and_v13_encode_results_in_the_order_of_the_calls():
    messages = [U, calling(call("abcdefgh1"), call("abcdefgh2", arguments={"city": "Rome"})),
                result("abcdefgh2", "rome"), result("abcdefgh1", "paris"), A]
    for version in VERSIONS[1:]:
        ids = checked("sft", sft_row(messages, TOOLS), version).ids["input_ids"]
        assert ids == reference_tokens(version, messages, TOOLS)
        text = get_encoder(version).decode(ids)
        in_call_order = text.index("paris") < text.index("rome")
        assert in_call_order == (version in ("v11", "v13")), version


# ---------------------------------------------------------------------------------------------
# What v2 leaves out
# ---------------------------------------------------------------------------------------------

EARLY_TOOLS = [U, calling(call("abcdefgh1"), call("abcdefgh2")), result("abcdefgh1"), result("abcdefgh2"),
               {"role": "assistant", "content": "Sunny in both."}, {"role": "user", "content": "And Rome?"},
               calling(call("abcdefgh3", arguments={"city": "Rome"})), result("abcdefgh3", "rain"),
               {"role": "assistant", "content": "Rain."}]


@pytest.mark.parametrize("version", VERSIONS)
def test_v2_leaves_out_calls_and_results_before_the_last_user_message_and_counts_them(version):
    r = checked("sft", sft_row(EARLY_TOOLS, TOOLS), version)
    assert r.error is None
    ref = reference_encoding(version, EARLY_TOOLS, TOOLS)
    assert r.ids == {"input_ids": ref.ids, "labels": ref.labels}
    dropped = (2, 2) if version == "v2" else (0, 0)
    assert (r.dropped_tool_calls, r.dropped_tool_results) == (ref.dropped_tool_calls, ref.dropped_tool_results) == dropped
    text = get_encoder(version).decode(r.ids["input_ids"])
    assert ("abcdefgh1" in text or '"city":▁"Paris"' in text or '"city": "Paris"' in text) == (version != "v2")
    assert "Sunny▁in▁both." in text or "Sunny in both." in text  # the reply itself stays
    # The same row as a DPO prompt: counted on the pair.
    pair = checked("dpo", {"prompt": EARLY_TOOLS[:6], "chosen": "Rain.", "rejected": "Snow.", "tools": TOOLS}, version)
    assert (pair.dropped_tool_calls, pair.dropped_tool_results) == dropped


def test_encode_batch_reports_what_was_left_out():
    text = sft_row(EARLY_TOOLS, TOOLS)
    out = encode_batch({"row": [text], "read_error": [None]}, kind="sft", encoder=get_encoder("v2"), max_length=None,
                       train_on="all", clean=False, on_long_rows="skip")
    assert out["error"] == [None]
    assert (out["dropped_tool_calls"], out["dropped_tool_results"]) == ([2], [2])
    assert out["input_ids"] == [checked("sft", text, "v2").ids["input_ids"]]


# ---------------------------------------------------------------------------------------------
# Bad rows: one reason each, before any model loads
# ---------------------------------------------------------------------------------------------


def sft(*messages: dict, tools=TOOLS) -> dict:
    return {"messages": list(messages), **({"tools": tools} if tools is not None else {})}


def thinking(text: str = "hmm") -> dict:
    return {"type": "thinking", "thinking": text}


def text_chunk(text: str = "ok") -> dict:
    return {"type": "text", "text": text}


NOT_NINE = "is not a valid tool call id for tokenizer {v}: it must be exactly 9 letters or digits " \
           "(tool_call_ids: regenerate replaces a row's ids)"
BAD_ROWS = [
    # (id, version, kind, row, reason, category)
    *[pytest.param(v, "sft", sft(U, calling(call("call_abc123")), result("call_abc123"), A),
                   f"messages[1].tool_calls[0]: id 'call_abc123' {NOT_NINE.format(v=v)}", "bad tool call id",
                   id=f"id-not-nine-{v}") for v in sorted(NINE_CHARACTER_ID_VERSIONS)],
    pytest.param("v13", "sft", sft(U, calling(call("null")), result("null"), A),
                 "messages[1].tool_calls[0]: id 'null' is not a valid tool call id for tokenizer v13: it must be "
                 "non-empty and not 'null' (tool_call_ids: regenerate replaces a row's ids)", "bad tool call id",
                 id="id-null-v13"),
    pytest.param("v3", "sft", sft(U, calling(call(""))), "messages[1].tool_calls[0]: 'id' is an empty string; a call "
                 "and its result are paired by this id", "empty content", id="id-empty"),
    pytest.param("v3", "sft", sft(U, calling(call(arguments=[1, 2]))),
                 "messages[1].tool_calls[0].function.arguments: arguments must be a JSON object (or a string holding "
                 "one), got an array; a call without arguments has {}", "bad tool arguments", id="arguments-array"),
    pytest.param("v3", "sft", sft(U, calling(call(arguments="42"))),
                 "messages[1].tool_calls[0].function.arguments: arguments must be a JSON object (or a string holding "
                 "one), got a number; a call without arguments has {}", "bad tool arguments", id="arguments-number"),
    pytest.param("v3", "sft", sft(U, calling(call(arguments='{"city": Paris}'))),
                 "messages[1].tool_calls[0].function.arguments: arguments must be a JSON object, and this string is "
                 "not JSON (Expecting value at column 10)", "bad tool arguments", id="arguments-not-json"),
    pytest.param("v3", "sft", sft(U, calling(call()), result("zzzzzzzz9"), A),
                 "messages[2]: tool_call_id 'zzzzzzzz9' answers no call of messages[1] (its calls: 'abcdefgh1')",
                 "unmatched tool result", id="result-answers-no-call"),
    pytest.param("v3", "sft", sft(U, A, result(), A),
                 "messages[2]: a tool result (for 'abcdefgh1') where no call is waiting; a result follows the "
                 "assistant message whose call it answers", "unmatched tool result", id="result-without-call"),
    pytest.param("v3", "sft", sft(U, calling(call()), result(), result(), A),
                 "messages[3]: answers call 'abcdefgh1' a second time", "unmatched tool result", id="result-twice"),
    pytest.param("v3", "sft", sft(U, calling(call()), result(name="search"), A),
                 "messages[2]: 'name' is 'search', but call 'abcdefgh1' called 'get_weather'", "unmatched tool result",
                 id="result-names-another-function"),
    pytest.param("v3", "sft", sft(U, calling(call()), {"role": "user", "content": "hello?"}, A),
                 "messages[1]: tool call(s) 'abcdefgh1' have no tool result; each call needs a 'tool' message with its "
                 "tool_call_id right after the calling message, before the next user message", "unanswered tool call",
                 id="call-unanswered-before-user"),
    pytest.param("v3", "sft", sft(U, calling(call(), call("abcdefgh2")), result(), A),
                 "messages[1]: tool call(s) 'abcdefgh2' have no tool result; each call needs a 'tool' message with its "
                 "tool_call_id right after the calling message, before the next assistant message",
                 "unanswered tool call", id="parallel-call-unanswered"),
    pytest.param("v3", "sft", sft(U, calling(call(name="get_time"))),
                 "messages[1].tool_calls[0]: calls 'get_time', which is not among the row's tools (its tools: "
                 "'get_weather')", "unknown tool", id="unknown-function"),
    pytest.param("v3", "sft", sft(U, calling(call()), tools=None),
                 "messages[1].tool_calls[0]: calls 'get_weather', which is not among the row's tools (the row has no "
                 "'tools')", "unknown tool", id="calls-without-tools"),
    pytest.param("v3", "sft", sft(U, calling(call()), result(), A, tools=None),
                 "messages[2]: unknown role 'tool' (expected one of system, user, assistant); a 'tool' message answers "
                 "a tool call, and needs the row's 'tools'", "unknown role", id="result-without-tools"),
    pytest.param("v1", "sft", sft(U, A), "tools: tool calling is not supported by tokenizer v1 (tools, tool calls and "
                 "tool results need v2 or later)", "not supported by the tokenizer", id="tools-on-v1"),
    pytest.param("v1", "sft", sft(*ONE_ROUND), "tools: tool calling is not supported by tokenizer v1 (tools, tool "
                 "calls and tool results need v2 or later)", "not supported by the tokenizer", id="tool-messages-on-v1"),
    *[pytest.param(v, "sft", sft(U, {"role": "assistant", "content": [thinking(), text_chunk()]}, tools=None),
                   f"messages[1]: thinking chunks are not supported by tokenizer {v} (they need v13)",
                   "not supported by the tokenizer", id=f"thinking-on-{v}") for v in ("v1", "v3", "v7-tekken", "v11")],
    *[pytest.param(v, "sft", sft(U, calling(call(), content="Let me look."), result(), A),
                   f"messages[1]: text and tool calls in one assistant message are not supported by tokenizer {v} (v7 "
                   "and later allow both); leave the text out or use a later version", "not supported by the tokenizer",
                   id=f"text-and-calls-on-{v}") for v in ("v2", "v3", "v3-tekken")],
    pytest.param("v2", "sft", sft(U, calling(call(), call("abcdefgh2")), result(), result("abcdefgh2"), A),
                 "messages[1]: more than one tool result for one assistant message after the last user message is not "
                 "supported by tokenizer v2 (parallel calls need v3 or later)", "not supported by the tokenizer",
                 id="v2-parallel-results"),
    pytest.param("v3", "sft", sft(U, calling(call(), call("abcdefgh1")), result(), A),
                 "messages[1].tool_calls[1]: id 'abcdefgh1' is used by two calls of this message; each call needs its "
                 "own id, which its result names", "bad tool call id", id="duplicate-id-in-a-message"),
    pytest.param("v3", "sft", sft(U, calling(call()), result(), {"role": "user", "content": "thanks"}, A),
                 "messages[3]: the tool results before this user message are not followed by an assistant reply; the "
                 "assistant answers with them before the user speaks", "wrong role order", id="results-then-user"),
    pytest.param("v3", "sft", sft(U, calling(call()), result()),
                 "messages: ends with tool results; the last message must be an assistant reply", "wrong role order",
                 id="ends-with-results"),
    pytest.param("v3", "sft", sft(U, calling(call(), content="   ")),
                 "messages[1]: empty assistant content (only whitespace) beside 'tool_calls'; leave 'content' out, null "
                 "or empty", "empty content", id="blank-content-beside-calls"),
    pytest.param("v13", "sft", sft(U, {"role": "assistant", "content": [text_chunk(), thinking()]}),
                 "messages[1].content[1]: a thinking chunk after text; a reply's thinking comes before its text",
                 "bad content chunk", id="thinking-after-text"),
    pytest.param("v13", "sft", sft(U, {"role": "assistant", "content": [thinking(" "), text_chunk()]}),
                 "messages[1].content[0]: empty thinking", "empty content", id="empty-thinking"),
    pytest.param("v13", "sft", sft(U, {"role": "assistant", "content": [{"type": "image_url", "image_url": "x"}]}),
                 'messages[1].content[0]: expected a chunk {"type": "text", "text": ...} or {"type": "thinking", '
                 '"thinking": ...}, got {"type": "image_url", "image_url": "x"}', "bad content chunk", id="image-chunk"),
    pytest.param("v3", "sft", sft(U, calling(call()), {**result(), "weight": 0}, A),
                 "messages[2]: 'weight' is only allowed on assistant messages", "other", id="weight-on-result"),
    pytest.param("v3", "sft", sft(U, calling(call()), {"role": "tool", "content": "x"}, A),
                 "messages[2]: missing field 'tool_call_id'", "missing field", id="result-without-id"),
    pytest.param("v3", "sft", sft(U, A, tools=[{"type": "function", "function": {"name": "get weather"}}]),
                 "tools[0].function: name 'get weather' is not a valid function name: use 1 to 64 letters, digits, '_' "
                 "or '-'", "bad tool definition", id="tool-name"),
    pytest.param("v3", "sft", sft(U, A, tools=[WEATHER, WEATHER]),
                 "tools[1]: tool 'get_weather' is listed twice; define each function once", "bad tool definition",
                 id="tool-twice"),
    pytest.param("v3", "sft", sft(U, A, tools=[{"type": "retrieval", "function": {"name": "x"}}]),
                 "tools[0]: 'type' must be 'function', got 'retrieval'", "bad tool definition", id="tool-type"),
    pytest.param("v3", "sft", sft(U, A, tools=[{"type": "function", "function": {"name": "x", "parameters": []}}]),
                 "tools[0].function: 'parameters' must be an object (a JSON Schema), got list", "bad tool definition",
                 id="tool-parameters-list"),
    pytest.param("v3", "sft", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                               "tools": TOOLS},
                 "'tools' needs the 'messages' shape (OpenAI messages with tool_calls and 'tool' results) or "
                 "'prompt'/'completion' as message lists, not 'conversations' (ShareGPT)", "unknown field",
                 id="tools-with-sharegpt"),
    pytest.param("v3", "dpo", {"prompt": [U, calling(call())], "chosen": "a", "rejected": "b", "tools": TOOLS},
                 "prompt[1]: tool call(s) 'abcdefgh1' have no tool result; each call needs a 'tool' message with its "
                 "tool_call_id right after the calling message, before the reply", "unanswered tool call",
                 id="dpo-prompt-ends-with-calls"),
    pytest.param("v3", "dpo", {"prompt": [U], "chosen": [calling(call(name="nope"))], "rejected": "b", "tools": TOOLS},
                 "chosen[0].tool_calls[0]: calls 'nope', which is not among the row's tools (its tools: 'get_weather')",
                 "unknown tool", id="dpo-reply-unknown-function"),
    pytest.param("v7", "dpo", {"prompt": [U], "chosen": [calling(call("call_1"))], "rejected": "b", "tools": TOOLS},
                 f"chosen[0].tool_calls[0]: id 'call_1' {NOT_NINE.format(v='v7')}", "bad tool call id",
                 id="dpo-reply-bad-id"),
    pytest.param("v3", "dpo", {"prompt": [U], "chosen": [calling(call())], "rejected": [calling(call())], "tools": TOOLS},
                 "chosen and rejected are the same reply", "chosen equals rejected", id="dpo-same-calls"),
]


@pytest.mark.parametrize("version, kind, row, reason, category", BAD_ROWS)
def test_bad_tool_rows_are_refused_with_their_reason(version, kind, row, reason, category):
    r = checked(kind, row, version)
    assert r.ids is None
    assert r.error == reason
    assert categorize(r.error) == category


def test_bad_tool_schema_names_the_schema_error():
    row = sft(U, A, tools=[{"type": "function", "function": {"name": "x", "parameters": {"type": "objekt"}}}])
    error = checked("sft", row, "v3").error
    assert error.startswith("tools[0].function.parameters: not a valid JSON Schema ('objekt' is not valid")
    assert categorize(error) == "bad tool definition"


# Rows refused above that mistral-common itself cannot encode either (the rest are refused here
# because they train something wrong: a result no call asked for, a name no tool has, ...).
MISTRAL_REFUSES = [
    ("v3", [U, calling(call("call_abc123")), result("call_abc123"), A]),
    ("v13", [U, calling(call("null")), result("null"), A]),
    ("v1", ONE_ROUND),
    ("v11", [U, {"role": "assistant", "content": [thinking(), text_chunk()]}]),
    ("v3", [U, calling(call(), content="Let me look."), result(), A]),
    ("v2", [U, calling(call(), call("abcdefgh2")), result(), result("abcdefgh2"), A]),
    ("v3", [U, calling(call(), call("abcdefgh2")), result(), A]),
    ("v3", [U, calling(call()), {"role": "user", "content": "hello?"}, A]),
    ("v11", [U, calling(call(), call("abcdefgh1")), result(), A]),
    ("v3", [U, calling(call()), result(), result(), A]),
]


@pytest.mark.parametrize("version, messages", MISTRAL_REFUSES)
def test_mistral_common_refuses_these_rows_too(version, messages):
    assert checked("sft", sft(*messages), version).error is not None
    with pytest.raises(MistralCommonException):
        finetuning_tokenizer(version).encode_chat_completion(request(messages, TOOLS))


# ---------------------------------------------------------------------------------------------
# tool_call_ids: regenerate
# ---------------------------------------------------------------------------------------------

# OpenAI-style ids, reused between turns as some exports do.
OPENAI_IDS = [U, calling(call("call_9f8e7d6c5b"), call("call_2", arguments={"city": "Rome"})),
              result("call_2", "rain"), result("call_9f8e7d6c5b"), {"role": "assistant", "content": "Mixed."},
              {"role": "user", "content": "And Oslo?"}, calling(call("call_2", arguments={"city": "Oslo"})),
              result("call_2", "snow"), {"role": "assistant", "content": "Snow."}]


def id_map(before: Conversation, after: Conversation) -> list[dict[str, str]]:
    """Per calling message, old id -> new id."""
    return [{old.id: new.id for old, new in zip(b.tool_calls, a.tool_calls)}
            for b, a in zip(before.messages, after.messages) if b.tool_calls]


def test_regenerated_ids_are_valid_deterministic_and_consistent():
    row = parse_sft_row(sft(*OPENAI_IDS))
    again = regenerate_tool_call_ids(parse_sft_row(sft(*OPENAI_IDS)), "v3")
    new = regenerate_tool_call_ids(row, "v3")
    assert new == again  # same row, same ids
    assert row == parse_sft_row(sft(*OPENAI_IDS))  # a pure function: the row itself is unchanged
    ids = [c.id for m in new.messages for c in m.tool_calls]
    assert len(set(ids)) == len(ids) == 3  # the reused "call_2" gets a new id per turn
    assert all(id_rule(v)(i) for v in VERSIONS for i in ids)
    # Each result takes the new id of the call it answered, turn by turn.
    maps, turn = id_map(row, new), -1
    for old, m in zip(row.messages, new.messages):
        turn += bool(old.tool_calls)
        if old.role == "tool":
            assert m.tool_call_id == maps[turn][old.tool_call_id]
    # Another row, other ids.
    other = regenerate_tool_call_ids(parse_sft_row(sft(*OPENAI_IDS[:-1], {"role": "assistant", "content": "x"})), "v3")
    assert not set(ids) & {c.id for m in other.messages for c in m.tool_calls}


def test_regenerated_ids_do_not_depend_on_the_process():
    code = ("import json, sys; from mistral_align.chat.schema import parse_sft_row; "
            "from mistral_align.chat.tool_ids import regenerate_tool_call_ids as r; "
            "c = r(parse_sft_row(json.loads(sys.argv[1])), 'v11'); print([x.id for m in c.messages for x in m.tool_calls])")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(sft(*OPENAI_IDS))], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    here = regenerate_tool_call_ids(parse_sft_row(sft(*OPENAI_IDS)), "v11")
    assert out == str([c.id for m in here.messages for c in m.tool_calls])


def with_ids(messages: list[dict], maps: list[dict[str, str]]) -> list[dict]:
    """The raw messages with the regenerated ids written in, for the reference."""
    out, turn = [], -1
    for m in messages:
        m = json.loads(json.dumps(m))
        if m.get("tool_calls"):
            turn += 1
            for c in m["tool_calls"]:
                c["id"] = maps[turn][c["id"]]
        elif m["role"] == "tool":
            m["tool_call_id"] = maps[turn][m["tool_call_id"]]
        out.append(m)
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_regenerated_rows_encode_as_mistral_common_does(version):
    row = sft(*OPENAI_IDS)
    kept = checked("sft", row, version)
    if version in NINE_CHARACTER_ID_VERSIONS:  # "keep" is the default, and these ids are not 9 characters
        assert kept.error == f"messages[1].tool_calls[0]: id 'call_9f8e7d6c5b' {NOT_NINE.format(v=version)}"
    regenerated = checked("sft", row, version, tool_call_ids="regenerate")
    assert regenerated.error is None
    maps = id_map(parse_sft_row(row), parse_sft_row(row, version=version, tool_call_ids="regenerate"))
    ref = reference_encoding(version, with_ids(OPENAI_IDS, maps), TOOLS)
    assert regenerated.ids == {"input_ids": ref.ids, "labels": ref.labels}


def test_regenerated_pair_gives_both_replies_the_same_ids():
    row = {"prompt": OPENAI_IDS[:5] + [{"role": "user", "content": "Oslo?"}],
           "chosen": [calling(call("call_x", arguments={"city": "Oslo"}))],
           "rejected": [calling(call("call_y", arguments={"city": "Olso"}))], "tools": TOOLS}
    pair = parse_preference(row, version="v11", tool_call_ids="regenerate")
    assert pair.chosen.tool_calls[0].id == pair.rejected.tool_calls[0].id  # ids are no difference the pair teaches
    prompt_ids = {c.id for m in pair.prompt for c in m.tool_calls}
    assert pair.chosen.tool_calls[0].id not in prompt_ids
    assert {m.tool_call_id for m in pair.prompt if m.role == "tool"} == prompt_ids
    r = checked("dpo", row, "v11", tool_call_ids="regenerate")
    assert r.error is None
    chosen = calling(call(pair.chosen.tool_calls[0].id, arguments={"city": "Oslo"}))
    maps = [{"call_9f8e7d6c5b": pair.prompt[1].tool_calls[0].id, "call_2": pair.prompt[1].tool_calls[1].id}]
    assert r.ids["prompt_ids"] + r.ids["chosen_ids"] == reference_tokens("v11", [*with_ids(row["prompt"], maps), chosen],
                                                                         TOOLS)


def test_tool_call_ids_is_checked():
    with pytest.raises(ValueError, match="tool_call_ids must be one of keep, regenerate"):
        checked("sft", sft(*ONE_ROUND), "v3", tool_call_ids="renumber")
    with pytest.raises(ValueError, match="has no tool calls"):
        regenerate_tool_call_ids(parse_sft_row(sft(*ONE_ROUND)), "v1")


def test_regenerate_leaves_rows_without_calls_alone():
    assert checked("sft", sft(U, A), "v3", tool_call_ids="regenerate").ids == checked("sft", sft(U, A), "v3").ids


def test_labels_are_unshifted_copies_of_the_ids():
    r = checked("sft", sft(*EARLY_TOOLS), "v13")
    assert all(lab in (IGNORE_INDEX, tok) for lab, tok in zip(r.ids["labels"], r.ids["input_ids"]))


def test_clean_strips_tool_results_and_chunks_too():
    row = sft(U, calling(call()), result(content="  sunny \n"),
              {"role": "assistant", "content": [thinking("  plan  "), text_chunk(" Sunny. ")]})
    conversation = parse_sft_row(row, clean=True, version="v13")
    assert conversation.messages[2].content == "sunny"
    assert [c for c in conversation.messages[3].content] == [Thinking("plan"), Text("Sunny.")]
    cleaned = [U, calling(call()), result(content="sunny"),
               {"role": "assistant", "content": [thinking("plan"), text_chunk("Sunny.")]}]
    assert checked("sft", row, "v13", clean=True).ids["input_ids"] == reference_tokens("v13", cleaned, TOOLS)
