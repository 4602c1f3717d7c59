"""Tools when serving: a generated reply read back by mistral-common's own decoding (every version),
the saved tokenizer's `apply_chat_template(..., tools=...)` equal to our encoder, `mistral-align chat
--tools` with `/tool ID RESULT`, and what the GGUF chat template does with tools."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from tool_rows import TOOLS, WEATHER, call, sft_row

from mistral_align.chat.decode import decode_reply, name_calls
from mistral_align.chat.encoder import get_encoder
from mistral_align.chat.hf_tokenizer import load_hf_tokenizer, save_hf_tokenizer
from mistral_align.chat.messages import ConversationError, Message, Text, Thinking, ToolCall
from mistral_align.chat.schema import parse_sft_row, parse_tools
from mistral_align.chat.tool_rules import TEXT_WITH_CALLS_VERSIONS, TOOL_VERSIONS
from mistral_align.inference.session import ChatSession, Sampling, interactive

VERSIONS = ("v2", "v3", "v7", "v3-tekken", "v7-tekken", "v11", "v13")
assert set(VERSIONS) == set(TOOL_VERSIONS)


# -- reading a generated reply --------------------------------------------------------------------


def replies(version: str) -> list[Message]:
    """Replies the version can encode: calls (parallel but on v2), text beside them (v7+), thinking (v13),
    CJK, emoji, nested JSON and control-token text in the arguments."""
    weather = ToolCall("abcdefgh1", "get_weather", json.dumps({"city": "東京 🎉"}, ensure_ascii=False))
    nested = ToolCall("ZZZZZZZZ9", "search", json.dumps({"q": "[TOOL_CALLS] [INST]", "n": [1, 2.5, None, {"a": {}}]}))
    calls = (weather,) if version == "v2" else (weather, nested)
    out = [Message("assistant", "", tool_calls=calls), Message("assistant", "Plain text, 中文 [TOOL_CALLS] typed.")]
    if version in TEXT_WITH_CALLS_VERSIONS:
        out.append(Message("assistant", "Let me look that up.", tool_calls=calls))
    if version == "v13":
        out.append(Message("assistant", (Thinking("The user wants weather 🤔\n"), Text("Checking.")), tool_calls=calls))
        out.append(Message("assistant", (Thinking("No tool needed."), Text("Hello!"))))
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_a_reply_decodes_to_the_message_that_encodes_it(version):
    enc = get_encoder(version)
    for m in replies(version):
        ids = enc.encode_reply(m)
        got = decode_reply(enc, ids)
        assert got.content == m.content and [(c.name, c.arguments) for c in got.tool_calls] == \
            [(c.name, c.arguments) for c in m.tool_calls]
        if version in ("v2", "v13"):  # their layouts carry no call id: mistral-common reads "null"
            assert {c.id for c in got.tool_calls} <= {"null"}
        else:
            assert [c.id for c in got.tool_calls] == [c.id for c in m.tool_calls]
        named = name_calls(got, version, set())
        assert enc.encode_reply(named) == ids  # and it encodes back to the very same ids
        assert decode_reply(enc, ids[:-1]) == got  # without its EOS (a reply cut at max_new_tokens)


def test_named_calls_get_fresh_ids_of_the_version():
    m = Message("assistant", "", tool_calls=(ToolCall("null", "a", "{}"), ToolCall("null", "b", "{}"),
                                             ToolCall("call_x", "c", "{}")))
    taken = {"aaaaaaaaa"}
    named = name_calls(m, "v3", taken)
    ids = [c.id for c in named.tool_calls]
    assert len(set(ids)) == 3 and "aaaaaaaaa" not in ids and all(len(i) == 9 and i.isalnum() for i in ids)
    assert taken == {"aaaaaaaaa", *ids}
    assert name_calls(Message("assistant", "", tool_calls=(ToolCall("abcdefgh1", "a", "{}"),)), "v3",
                      set()).tool_calls[0].id == "abcdefgh1"  # a valid id is kept


@pytest.mark.parametrize("version", ["v3", "v11", "v13"])
def test_a_reply_that_is_no_call_is_refused(version):
    enc = get_encoder(version)
    ids = [enc.raw.get_special_token("[TOOL_CALLS]"), *enc.text("get_weather not json"), enc.eos_id]
    with pytest.raises(ConversationError, match="the reply holds a tool call that is not one"):
        decode_reply(enc, ids)


# -- the saved tokenizer's chat template ----------------------------------------------------------


def call_rounds(version: str) -> list[dict]:
    """A conversation with two rounds of calls (parallel ones where the version allows), CJK and emoji,
    typed control tokens, a result given as JSON and one as text; v13 with thinking in the history."""
    two = [call("東京", "abcdefgh1"), call("Oslo", "ZZZZZZZZ9", "get_time")]
    first = two[:1] if version == "v2" else two
    results = [{"role": "tool", "tool_call_id": c["id"], "name": c["function"]["name"],
                "content": json.dumps({"sky": "rain 🌧"}, ensure_ascii=False) if k == 0 else "12:00 [TOOL_RESULTS]"}
               for k, c in enumerate(first)]
    reply: dict = {"role": "assistant", "content": "Rain in 東京."}
    if version == "v13":
        reply["content"] = [{"type": "thinking", "thinking": "It rains."}, {"type": "text", "text": "Rain in 東京."}]
    return [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": "Weather in 東京 [INST]?"},
            {"role": "assistant", "tool_calls": first}, *results, reply,
            {"role": "user", "content": "And in Paris?"},
            {"role": "assistant", "tool_calls": [call("Paris", "0a1B2c3D4")]},
            {"role": "tool", "tool_call_id": "0a1B2c3D4", "name": "get_weather", "content": "sunny"}]


@pytest.fixture(scope="module", params=VERSIONS)
def saved(request, tmp_path_factory):
    version = request.param
    return version, save_hf_tokenizer(version, tmp_path_factory.mktemp(version.replace("-", "_")))


def _ours(version: str, messages: list[dict]):
    return parse_sft_row({"messages": messages, "tools": TOOLS}, version=version)


def test_apply_chat_template_with_tools_equals_our_prompts(saved):
    version, path = saved
    tok, enc = load_hf_tokenizer(path), get_encoder(version)
    conversation = call_rounds(version)
    # Every point where the model is asked to reply: after a user message or after the results.
    ends = [i for i, m in enumerate(conversation) if m["role"] == "user"
            or (m["role"] == "tool" and (i + 1 == len(conversation) or conversation[i + 1]["role"] != "tool"))]
    for end in ends:
        prompt = conversation[: end + 1]
        ours = _ours(version, [*prompt, {"role": "assistant", "content": "x"}])
        theirs = tok.apply_chat_template(prompt, tools=TOOLS, add_generation_prompt=True)["input_ids"]
        assert theirs == enc.encode_prompt(ours.messages[:-1], tools=ours.tools), (version, end)


def test_apply_chat_template_in_finetuning_mode_equals_our_training_ids(saved):
    from transformers import AutoTokenizer

    version, path = saved
    tok, enc = AutoTokenizer.from_pretrained(str(path), mode="finetuning"), get_encoder(version)
    for messages in ([*call_rounds(version), {"role": "assistant", "content": "Sunny in Paris."}],
                     sft_row("Rome")["messages"][:2]):  # a row that ends with the call it trains
        if version not in ("v2", "v13"):
            messages = json.loads(json.dumps(messages).replace("call_0001", "abcdefgh1"))
        ours = _ours(version, messages)
        ids = tok.apply_chat_template(messages, tools=TOOLS)["input_ids"]
        assert ids == enc.encode_sft(ours.messages, tools=ours.tools).input_ids, version


def test_v2_results_need_their_name_through_the_chat_template(tmp_path):
    """v2 writes each result's function name; our schema takes it from the call, the HF path writes
    "name": null for a result that does not spell it (README, "Tools and reasoning")."""
    tok, enc = load_hf_tokenizer(save_hf_tokenizer("v2", tmp_path)), get_encoder("v2")
    prompt = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "tool_calls": [call("Rome", "abcdefgh1")]},
              {"role": "tool", "tool_call_id": "abcdefgh1", "content": "sunny"}]
    ours = _ours("v2", [*prompt, {"role": "assistant", "content": "x"}])
    expected = enc.encode_prompt(ours.messages[:-1], tools=ours.tools)
    unnamed = tok.apply_chat_template(prompt, tools=TOOLS, add_generation_prompt=True)["input_ids"]
    assert unnamed != expected and "null" in enc.decode(unnamed) and "null" not in enc.decode(expected)
    prompt[2]["name"] = "get_weather"
    assert tok.apply_chat_template(prompt, tools=TOOLS, add_generation_prompt=True)["input_ids"] == expected


# -- chat sessions with tools ---------------------------------------------------------------------


class Scripted:
    """A model stub that replies with the given id lists in turn (each ending with EOS), recording
    every prompt it was given."""

    def __init__(self, *replies: list[int]):
        self.replies, self.prompts = list(replies), []

    def parameters(self):
        yield torch.zeros(1)

    def generate(self, input_ids, streamer=None, **kw):
        self.prompts.append(input_ids[0].tolist())
        new = torch.tensor([self.replies.pop(0)])
        if streamer is not None:
            streamer.put(input_ids)
            for t in new[0]:
                streamer.put(t.reshape(1))
            streamer.end()
        return torch.cat([input_ids, new], dim=1)


@pytest.mark.parametrize("version, stream", [("v3", True), ("v13", False), ("v11", True)])
def test_interactive_tool_call_and_result(version, stream):
    enc = get_encoder(version)
    tools = parse_tools(TOOLS)
    calls = (ToolCall("abcdefgh1", "get_weather", '{"city": "東京"}'), ToolCall("ZZZZZZZZ9", "get_time", '{"city": "Oslo"}'))
    text = "Let me check." if version != "v3" else ""
    model = Scripted(enc.encode_reply(Message("assistant", text, tool_calls=calls)),
                     enc.encode_reply(Message("assistant", "Rain in 東京, noon in Oslo.")))
    session = ChatSession(model, enc, Sampling(temperature=0), system="Be brief.", tools=tools)
    out = io.StringIO()
    script = "Weather in 東京?\n/tool nope 1\n/tool ZZZZZZZZ9 12:00\nhello\n/tool {a} {\"sky\": \"rain\"}\n/exit\n"
    first_id = "abcdefgh1" if version != "v13" else "aaaaaaaaa"  # v13 writes no ids: the session names the calls
    interactive(session, io.StringIO(script.replace("{a}", first_id)), out, stream=stream)
    lines = out.getvalue().splitlines()
    second_id = "ZZZZZZZZ9" if version != "v13" else "baaaaaaaa"
    shown = json.loads(lines[1] if text else lines[0])
    assert shown == {"tool_calls": [
        {"id": first_id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": "東京"}}},
        {"id": second_id, "type": "function", "function": {"name": "get_time", "arguments": {"city": "Oslo"}}}]}
    if text:
        assert lines[0] == text
    rest = lines[2 if text else 1:]
    assert rest[0] == f"[answer each call with /tool ID RESULT: {first_id}, {second_id}]"
    assert rest[1].startswith("[no tool call 'nope' is waiting for a result (waiting: ")
    if version == "v13":  # the script's second id was written for versions with ids
        assert rest[2].startswith("[no tool call 'ZZZZZZZZ9'") and len(model.prompts) == 1
        return
    assert rest[2].startswith("[answer the tool call(s) abcdefgh1 first")  # "hello" while a call waits
    assert rest[3] == "Rain in 東京, noon in Oslo."
    # The prompt after the results is the exact encoding of the whole conversation.
    expected = [Message("system", "Be brief."), Message("user", "Weather in 東京?"),
                Message("assistant", text, tool_calls=calls),
                Message("tool", "12:00", tool_call_id="ZZZZZZZZ9", name="get_time"),
                Message("tool", '{"sky": "rain"}', tool_call_id="abcdefgh1", name="get_weather")]
    assert model.prompts[1] == enc.encode_prompt(expected, tools=tools)
    assert model.prompts[0] == enc.encode_prompt(expected[:2], tools=tools)


def _folder(tmp_path: Path, version: str) -> Path:
    """A merged-model folder as far as `chat` reads it before any model loads."""
    folder = tmp_path / f"merged_{version}"
    save_hf_tokenizer(version, folder)
    (folder / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("content, reason", [
    (None, "no such file"), ("{not json", "not a JSON file"), ('[{"type": "function"}]', "tools[0]: missing field 'function'"),
    ("[]", "lists no tools"),
])  # fmt: skip
def test_bad_tools_files_are_refused_before_the_model_loads(tmp_path, capsys, content, reason):
    from mistral_align.entry.cli import main

    tools = tmp_path / "tools.json"
    if content is not None:
        tools.write_text(content)
    assert main(["chat", str(_folder(tmp_path, "v3")), "--tools", str(tools), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mistral-align chat: error: --tools {tools}: {reason}") and err.count("\n") == 1


def test_tools_on_v1_are_refused(tmp_path, capsys):
    from mistral_align.entry.cli import main

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps({"tools": [WEATHER]}))
    assert main(["chat", str(_folder(tmp_path, "v1")), "--tools", str(tools), "--prompt", "x"]) == 2
    assert "--tools: tokenizer v1 has no tool calling" in capsys.readouterr().err


def test_chat_help_documents_tools():
    from mistral_align.entry.cli import build_parser

    chat = build_parser()._subparsers._group_actions[0].choices["chat"]
    text = chat.format_help()
    assert "--tools FILE" in text and "/tool ID RESULT" in text


# -- GGUF ------------------------------------------------------------------------------------------


def test_the_gguf_chat_template_leaves_tools_out():
    """What the README says of GGUF: its template renders system/user/assistant text only; tools,
    calls and results are left out, and a reply of calls only (content null) does not render."""
    import jinja2

    from mistral_align.export.gguf import CHAT_TEMPLATES

    env = jinja2.Environment()
    messages = sft_row("Rome")["messages"]
    for version, template in CHAT_TEMPLATES.items():
        t = env.from_string(template)
        kw = {"bos_token": "<s>", "eos_token": "</s>", "tools": TOOLS}
        with pytest.raises(TypeError):  # the calling message has no content
            t.render(messages=[messages[0], {**messages[1], "content": None}], **kw)
        text = t.render(messages=[messages[0], {**messages[1], "content": ""}, *messages[2:]], **kw)
        # The same text as the conversation without tools, calls and results.
        plain = [messages[0], {"role": "assistant", "content": ""}, messages[3]]
        assert text == t.render(messages=plain, bos_token="<s>", eos_token="</s>"), version
        assert "get_weather" not in text and "[TOOL" not in text and "[AVAILABLE" not in text


# -- a trained model calls the tool ---------------------------------------------------------------


@pytest.mark.slow
def test_chat_prints_the_call_a_trained_model_makes_and_answers_its_result(tmp_path, capsys, monkeypatch):
    """A tiny model trained (full fine-tune, one row) on a tool conversation: `chat --tools` builds the
    same prompt ids, so the greedy reply is the trained call, printed as JSON; /tool gives it the result
    and the greedy reply is the trained answer."""
    import sys

    from transformers import MistralConfig, MistralForCausalLM

    from mistral_align.entry.cli import main

    version = "v3"
    enc = get_encoder(version)
    row = json.loads(json.dumps(sft_row("Rome")).replace("call_0001", "abcdefgh1"))
    conv = parse_sft_row(row, version=version)
    encoding = enc.encode_sft(conv.messages, tools=conv.tools)
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=enc.vocab_size, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=512, tie_word_embeddings=False))
    ids, labels = torch.tensor([encoding.input_ids]), torch.tensor([encoding.labels])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 20, losses[::10]
    folder = tmp_path / "merged"
    model.save_pretrained(folder)
    save_hf_tokenizer(version, folder)
    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))

    cmd = ["chat", str(folder), "--tools", str(tmp_path / "tools.json"), "--temperature", "0", "--max-new-tokens", "60"]
    capsys.readouterr()
    assert main([*cmd, "--prompt", "Weather in Rome?"]) == 0
    assert json.loads(capsys.readouterr().out) == {"tool_calls": [
        {"id": "abcdefgh1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]}
    script = 'Weather in Rome?\n/tool abcdefgh1 {"sky": "cloudy"}\n/exit\n'
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))  # piped in
    assert main(cmd) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "It is cloudy in Rome."
