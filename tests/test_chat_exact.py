"""The product promise: every token we train on is byte-identical to mistral-common's, and only
assistant content plus its EOS is trained.

The reference is mistral-common itself (real tokenizer files, no mocks). Ids are compared with
`MistralTokenizer.encode_chat_completion`; the expected loss mask is rebuilt from mistral-common's
own per-message encoders (`encode_user_message`, `encode_assistant_message`, ...) walked in the
same order as its `encode_instruct`, and that walk is itself checked against
`encode_chat_completion` on every example, so the mask oracle cannot drift from the reference
(tests/chat_reference.py). Tool calls, results and thinking: test_chat_tools.py.
"""

from __future__ import annotations

import pytest
from chat_reference import (
    examples,
    nonblank_text,
    reference_prompt,
    reference_sft,
    reference_tokens,
    trained_spans,
    user_text,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mistral_align.chat.encoder import IGNORE_INDEX, TOKENIZER_VERSIONS, get_encoder
from mistral_align.chat.schema import ConversationError, parse_messages, parse_preference, parse_sft_messages

VERSIONS = TOKENIZER_VERSIONS
# a version dropped from the encoder must not go untested
assert set(VERSIONS) == {"v1", "v2", "v3", "v7", "v3-tekken", "v7-tekken", "v11", "v13"}
SYSTEM_BLOCK = ("v7", "v7-tekken", "v11", "v13")

# ---------------------------------------------------------------------------------------------
# Generated conversations
# ---------------------------------------------------------------------------------------------


@st.composite
def conversations(draw, min_turns: int = 1, max_turns: int = 4, end_with: str = "assistant") -> list[dict]:
    messages: list[dict] = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(nonblank_text)})
    turns = draw(st.integers(min_turns, max_turns))
    for t in range(turns):
        messages.append({"role": "user", "content": draw(user_text)})
        if end_with == "user" and t == turns - 1:
            break
        reply = {"role": "assistant", "content": draw(nonblank_text)}
        weight = draw(st.sampled_from([None, None, 1, 0]))
        if weight is not None:
            reply["weight"] = weight
        messages.append(reply)
    assume(any(m["content"].strip() for m in messages if m["role"] == "user"))
    if end_with == "assistant":
        assume(any(m.get("weight", 1) == 1 for m in messages if m["role"] == "assistant"))
    return messages


def structure_counts(version: str, raw: list[dict]) -> dict[int, int]:
    """How often each control id must appear: once per structural use, never from typed text."""
    enc = get_encoder(version)
    users = sum(m["role"] == "user" for m in raw)
    assistants = sum(m["role"] == "assistant" for m in raw)
    counts = {enc.bos_id: 1, enc.eos_id: assistants}
    if version != "v1":
        counts[enc.begin_inst] = users
        counts[enc.end_inst] = users
    if version in SYSTEM_BLOCK:
        has_system = int(any(m["role"] == "system" for m in raw))
        counts[enc.begin_system] = has_system
        counts[enc.end_system] = has_system
    return counts


def assert_only_structural_specials(version: str, ids: list[int], raw: list[dict]) -> None:
    raw_tok = get_encoder(version).raw
    expected = {i: n for i, n in structure_counts(version, raw).items() if n}
    specials: dict[int, int] = {}
    for i in ids:
        if raw_tok.is_special(i):
            specials[i] = specials.get(i, 0) + 1
    assert specials == expected
    assert ids[0] == get_encoder(version).bos_id


SETTINGS = settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("version", VERSIONS)
@SETTINGS
@given(raw=conversations())
def test_sft_ids_and_labels_equal_mistral_common(version, raw):
    enc = get_encoder(version)
    messages = parse_sft_messages(raw)
    ours = enc.encode_sft(messages)
    ref_ids, ref_labels = reference_sft(version, raw)
    assert ours.input_ids == ref_ids
    assert ours.labels == ref_labels
    assert_only_structural_specials(version, ours.input_ids, raw)

    last = enc.encode_sft(messages, train_on="last")
    _, ref_last = reference_sft(version, raw, train_on="last")
    assert last.input_ids == ref_ids
    assert last.labels == ref_last


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=conversations(max_turns=3, end_with="user"),
    chosen=nonblank_text,
    rejected=nonblank_text,
    as_messages=st.booleans(),
)
def test_dpo_and_generation_prompt_equal_mistral_common(version, prompt, chosen, rejected, as_messages):
    assume(chosen.rstrip(" ") != rejected.rstrip(" "))  # otherwise the schema rejects the pair
    enc = get_encoder(version)
    if as_messages:  # the ultrafeedback_binarized shape: each side repeats the prompt
        row = {
            "prompt": prompt,
            "chosen": [*prompt, {"role": "assistant", "content": chosen}],
            "rejected": [*prompt, {"role": "assistant", "content": rejected}],
        }
    else:
        row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    pair = enc.encode_dpo(parse_preference(row))

    assert pair.prompt_ids == reference_prompt(version, prompt)
    assert pair.prompt_ids == enc.encode_prompt(parse_messages(prompt))
    for reply, ids in ((chosen, pair.chosen_ids), (rejected, pair.rejected_ids)):
        full = [*prompt, {"role": "assistant", "content": reply}]
        assert pair.prompt_ids + ids == reference_tokens(version, full)
        assert pair.prompt_ids + ids == enc.encode_sft(parse_sft_messages(full)).input_ids
        assert ids[-1] == enc.eos_id and enc.eos_id not in ids[:-1]
    assert pair.prompt_ids.count(enc.bos_id) == 1 and pair.prompt_ids[0] == enc.bos_id


# ---------------------------------------------------------------------------------------------
# Explicit layouts, read as documentation
# ---------------------------------------------------------------------------------------------

SYSTEM_CONVERSATION = [
    {"role": "system", "content": "SYS"},
    {"role": "user", "content": "u1"},
    {"role": "assistant", "content": "a1"},
    {"role": "user", "content": "u2"},
    {"role": "assistant", "content": "a2"},
]

# Decoded with special tokens kept (sentencepiece shows pieces: ▁ is a space, <0x0A> a newline).
EXPECTED_LAYOUT = {
    # v1: [INST] is plain text and the system prompt joins the FIRST user message.
    "v1": "<s>▁[INST]▁SYS<0x0A><0x0A>u1▁[/INST]▁a1</s>▁[INST]▁u2▁[/INST]▁a2</s>",
    # v2, v3, tekken: [INST] is a control token and the system prompt joins the LAST user message.
    "v2": "<s>[INST]▁u1[/INST]▁a1</s>[INST]▁SYS<0x0A><0x0A>u2[/INST]▁a2</s>",
    "v3": "<s>[INST]▁u1[/INST]▁a1</s>[INST]▁SYS<0x0A><0x0A>u2[/INST]▁a2</s>",
    "v3-tekken": "<s>[INST]u1[/INST]a1</s>[INST]SYS\n\nu2[/INST]a2</s>",
    # v7: the system prompt is its own block right after BOS.
    "v7": "<s>[SYSTEM_PROMPT]▁SYS[/SYSTEM_PROMPT][INST]▁u1[/INST]▁a1</s>[INST]▁u2[/INST]▁a2</s>",
    # v7-tekken, v11, v13: the v7 layout on tekken (no ▁; v11/v13 change only tools and thinking).
    "v7-tekken": "<s>[SYSTEM_PROMPT]SYS[/SYSTEM_PROMPT][INST]u1[/INST]a1</s>[INST]u2[/INST]a2</s>",
    "v11": "<s>[SYSTEM_PROMPT]SYS[/SYSTEM_PROMPT][INST]u1[/INST]a1</s>[INST]u2[/INST]a2</s>",
    "v13": "<s>[SYSTEM_PROMPT]SYS[/SYSTEM_PROMPT][INST]u1[/INST]a1</s>[INST]u2[/INST]a2</s>",
}


@pytest.mark.parametrize("version", VERSIONS)
def test_system_prompt_placement(version):
    enc = get_encoder(version)
    ids = enc.encode_sft(parse_sft_messages(SYSTEM_CONVERSATION)).input_ids
    assert ids == reference_tokens(version, SYSTEM_CONVERSATION)
    assert enc.decode(ids) == EXPECTED_LAYOUT[version]


@pytest.mark.parametrize("version", SYSTEM_BLOCK)
def test_system_block_keeps_the_system_text_as_typed(version):
    # Nothing around the system prompt is stripped or added: its block holds exactly its text.
    enc = get_encoder(version)
    system = "  Be brief.\n\n [INST] \t"
    raw = [{"role": "system", "content": system}, {"role": "user", "content": " hi "}, {"role": "assistant", "content": "ok"}]
    ids = enc.encode_sft(parse_sft_messages(raw)).input_ids
    assert ids == reference_tokens(version, raw)
    assert ids[: len(enc.text(system)) + 3] == [enc.bos_id, enc.begin_system, *enc.text(system), enc.end_system]
    assert ids[len(enc.text(system)) + 3 :] == [enc.begin_inst, *enc.text(" hi "), enc.end_inst, *enc.text("ok"), enc.eos_id]


@pytest.mark.parametrize("version", ["v2", "v3", "v3-tekken"])
def test_system_prompt_moves_with_the_last_user_message(version):
    # Truncating a v2/v3 conversation moves its system prompt; a prefix of the ids is not the
    # encoding of a prefix of the conversation, which is why DPO prompts are encoded whole.
    enc = get_encoder(version)
    short = enc.encode_sft(parse_sft_messages(SYSTEM_CONVERSATION[:3])).input_ids
    long = enc.encode_sft(parse_sft_messages(SYSTEM_CONVERSATION)).input_ids
    assert short == reference_tokens(version, SYSTEM_CONVERSATION[:3])
    assert long[: len(short)] != short


@pytest.mark.parametrize("version", VERSIONS)
def test_bos_once_and_eos_after_every_assistant_turn(version):
    enc = get_encoder(version)
    raw = [
        {"role": "user", "content": "<s> hi </s>"},
        {"role": "assistant", "content": "one </s>"},
        {"role": "user", "content": "again <s>"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "last"},
        {"role": "assistant", "content": "three"},
    ]
    ours = enc.encode_sft(parse_sft_messages(raw))
    assert ours.input_ids == reference_tokens(version, raw)
    assert ours.input_ids.count(enc.bos_id) == 1 and ours.input_ids[0] == enc.bos_id
    assert ours.input_ids.count(enc.eos_id) == 3
    assert ours.input_ids[-1] == enc.eos_id
    # Each EOS closes a reply: it is followed by the next user turn or ends the sequence.
    eos_at = [i for i, t in enumerate(ours.input_ids) if t == enc.eos_id]
    for i in eos_at[:-1]:
        if version == "v1":
            assert ours.input_ids[i + 1 : i + 1 + len(enc.text("[INST]"))] == enc.text("[INST]")
        else:
            assert ours.input_ids[i + 1] == enc.begin_inst


@pytest.mark.parametrize("version", [v for v in VERSIONS if v != "v1"])
def test_typed_control_text_never_becomes_a_control_token(version):
    enc = get_encoder(version)
    typed = "[INST] x [/INST] <s> </s> [SYSTEM_PROMPT] y [/SYSTEM_PROMPT] [THINK] z [/THINK] [ARGS] [CALL_ID]"
    raw = [
        {"role": "system", "content": typed},
        {"role": "user", "content": typed},
        {"role": "assistant", "content": typed},
        {"role": "user", "content": typed},
        {"role": "assistant", "content": typed},
    ]
    ids = enc.encode_sft(parse_sft_messages(raw)).input_ids
    assert ids == reference_tokens(version, raw)
    assert ids.count(enc.begin_inst) == 2
    assert ids.count(enc.end_inst) == 2
    assert ids.count(enc.bos_id) == 1
    assert ids.count(enc.eos_id) == 2
    if version in SYSTEM_BLOCK:
        assert ids.count(enc.begin_system) == 1 and ids.count(enc.end_system) == 1
    assert_only_structural_specials(version, ids, raw)


def test_v1_writes_inst_as_text():
    enc = get_encoder("v1")
    raw = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ids = enc.encode_sft(parse_sft_messages(raw)).input_ids
    assert ids == [enc.bos_id, *enc.text("[INST] hi [/INST]"), *enc.text("yo"), enc.eos_id]
    assert ids == reference_tokens("v1", raw)


@pytest.mark.parametrize("version", VERSIONS)
def test_trailing_spaces_of_a_reply(version):
    # mistral-common drops trailing spaces of a reply from v2 on (not newlines); v1 keeps them.
    enc = get_encoder(version)
    raw = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  answer \n  "}]
    ids = enc.encode_sft(parse_sft_messages(raw)).input_ids
    assert ids == reference_tokens(version, raw)
    kept = "  answer \n  " if version == "v1" else "  answer \n"
    assert ids[-len(enc.text(kept)) - 1 :] == [*enc.text(kept), enc.eos_id]


# ---------------------------------------------------------------------------------------------
# Loss masks
# ---------------------------------------------------------------------------------------------

MASK_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "first?"},
    {"role": "assistant", "content": "kept as context", "weight": 0},
    {"role": "user", "content": "second?"},
    {"role": "assistant", "content": "trained one"},
    {"role": "user", "content": "third?"},
    {"role": "assistant", "content": "trained two"},
]


@pytest.mark.parametrize("version", VERSIONS)
def test_only_assistant_content_and_its_eos_are_trained(version):
    enc = get_encoder(version)
    out = enc.encode_sft(parse_sft_messages(MASK_CONVERSATION))
    assert len(out.labels) == len(out.input_ids)
    # Unshifted: a trained label is the very id at that position.
    assert all(lab in (IGNORE_INDEX, tok) for lab, tok in zip(out.labels, out.input_ids))
    spans = trained_spans(out.labels)
    assert [out.input_ids[a:b] for a, b in spans] == [
        [*enc.text("trained one"), enc.eos_id],
        [*enc.text("trained two"), enc.eos_id],
    ]
    assert spans[-1][1] == len(out.input_ids)
    # The weight-0 reply is still in the input, as context, with its EOS masked too.
    context = [*enc.text("kept as context"), enc.eos_id]
    at = next(i for i in range(len(out.input_ids)) if out.input_ids[i : i + len(context)] == context)
    assert out.labels[at : at + len(context)] == [IGNORE_INDEX] * len(context)
    assert (out.input_ids, out.labels) == reference_sft(version, MASK_CONVERSATION)


@pytest.mark.parametrize("version", VERSIONS)
def test_train_on_last_trains_only_the_last_reply(version):
    enc = get_encoder(version)
    messages = parse_sft_messages(MASK_CONVERSATION)
    every = enc.encode_sft(messages)
    last = enc.encode_sft(messages, train_on="last")
    assert last.input_ids == every.input_ids
    spans = trained_spans(last.labels)
    assert [last.input_ids[a:b] for a, b in spans] == [[*enc.text("trained two"), enc.eos_id]]
    assert (last.input_ids, last.labels) == reference_sft(version, MASK_CONVERSATION, train_on="last")
    with pytest.raises(ValueError, match="train_on"):
        enc.encode_sft(messages, train_on="first")


# ---------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_dpo_pieces_join_into_the_full_conversation(version):
    enc = get_encoder(version)
    prompt = [
        {"role": "system", "content": "Judge kindly."},
        {"role": "user", "content": "Say hi [INST]"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": " and bye "},
    ]
    pair = enc.encode_dpo(parse_preference({"prompt": prompt, "chosen": "bye  ", "rejected": "no </s>"}))
    for reply, ids in (("bye  ", pair.chosen_ids), ("no </s>", pair.rejected_ids)):
        full = [*prompt, {"role": "assistant", "content": reply}]
        assert pair.prompt_ids + ids == reference_tokens(version, full)
        assert pair.prompt_ids + ids == enc.encode_sft(parse_sft_messages(full)).input_ids
        assert ids[-1] == enc.eos_id and ids.count(enc.eos_id) == 1
    assert pair.prompt_ids.count(enc.bos_id) == 1 and pair.prompt_ids[0] == enc.bos_id
    assert pair.prompt_ids == reference_prompt(version, prompt)
    assert pair.chosen_ids != pair.rejected_ids


def test_dpo_string_prompt_is_one_user_message():
    enc = get_encoder("v3")
    pair = enc.encode_dpo(parse_preference({"prompt": "What?", "chosen": "This.", "rejected": "That."}))
    assert pair.prompt_ids == [enc.bos_id, enc.begin_inst, *enc.text("What?"), enc.end_inst]
    assert pair.chosen_ids == [*enc.text("This."), enc.eos_id]


# ---------------------------------------------------------------------------------------------
# Schema errors: what cannot be trained is rejected with a reason, never silently dropped
# ---------------------------------------------------------------------------------------------

U = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}
S = {"role": "system", "content": "s"}

BAD_SFT = [
    pytest.param("not a list", "expected a list", id="not-a-list"),
    pytest.param([], "no messages", id="empty"),
    pytest.param(["hi"], "expected an object", id="message-not-object"),
    pytest.param([{"role": "tool", "content": "x"}, A], "unknown role 'tool'", id="unknown-role"),
    pytest.param([{"content": "x"}, A], "missing field 'role'", id="missing-role"),
    pytest.param([{"role": "user"}, A], "missing field 'content'", id="missing-content"),
    pytest.param([{"role": "user", "content": 3}, A], "must be a string", id="content-not-string"),
    pytest.param([{**U, "name": "bob"}, A], "unknown field", id="unknown-field"),
    pytest.param([A, U, A], "wrong role order", id="starts-with-assistant"),
    pytest.param([U, U, A], "wrong role order", id="two-users"),
    pytest.param([U, A, A], "wrong role order", id="two-assistants"),
    pytest.param([U, S, A], "only allowed as the first", id="system-in-the-middle"),
    pytest.param([S, S, U, A], "only allowed as the first", id="two-systems"),
    pytest.param([S], "only a system message", id="only-system"),
    pytest.param([U], "ends with a user turn", id="ends-with-user"),
    pytest.param([U, A, U], "ends with a user turn", id="ends-with-user-after-turns"),
    pytest.param([U, {"role": "assistant", "content": ""}], "empty assistant", id="empty-assistant"),
    pytest.param([U, {"role": "assistant", "content": " \n\t"}], "empty assistant", id="blank-assistant"),
    pytest.param([{"role": "system", "content": "  "}, U, A], "empty system", id="blank-system"),
    pytest.param([{"role": "user", "content": " "}, A], "every user message is empty", id="all-users-empty"),
    pytest.param([{**U, "weight": 1}, A], "only allowed on assistant", id="weight-on-user"),
    pytest.param([{**S, "weight": 0}, U, A], "only allowed on assistant", id="weight-on-system"),
    pytest.param([U, {**A, "weight": 2}], "must be 0 or 1", id="weight-2"),
    pytest.param([U, {**A, "weight": 0.5}], "must be 0 or 1", id="weight-half"),
    pytest.param([U, {**A, "weight": True}], "must be 0 or 1", id="weight-bool"),
    pytest.param([U, {**A, "weight": 0}], "weight 0", id="nothing-trained"),
]


@pytest.mark.parametrize("raw, reason", BAD_SFT)
def test_schema_rejects_bad_sft(raw, reason):
    with pytest.raises(ConversationError, match=reason):
        parse_sft_messages(raw)


def test_schema_accepts_what_the_encoder_handles():
    # An empty user turn is legal in mistral-common (and proven equal above) as long as some user
    # turn says something; weight as an int 0/1 on assistants is legal.
    messages = parse_sft_messages([{"role": "user", "content": ""}, A, U, {**A, "weight": 1}])
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]


BAD_DPO = [
    pytest.param("row", "expected a JSON object", id="not-object"),
    pytest.param({"prompt": "q", "chosen": "a"}, "missing field 'rejected'", id="missing-rejected"),
    pytest.param({"prompt": 1, "chosen": "a", "rejected": "b"}, "must be a string or a list", id="prompt-int"),
    pytest.param({"prompt": " ", "chosen": "a", "rejected": "b"}, "prompt: empty", id="blank-prompt"),
    pytest.param({"prompt": "q", "chosen": "", "rejected": "b"}, "chosen: empty", id="empty-chosen"),
    pytest.param({"prompt": "q", "chosen": "a", "rejected": "\n"}, "rejected: empty", id="blank-rejected"),
    pytest.param({"prompt": "q", "chosen": "same", "rejected": "same"}, "same reply", id="chosen-equals-rejected"),
    pytest.param({"prompt": "q", "chosen": "ok", "rejected": "ok  "}, "same reply", id="differ-only-in-trailing-spaces"),
    pytest.param({"prompt": [U, A], "chosen": "a", "rejected": "b"}, "must end with a user", id="prompt-ends-assistant"),
    pytest.param({"prompt": [A, U], "chosen": "a", "rejected": "b"}, "wrong role order", id="prompt-wrong-order"),
    pytest.param(
        {"prompt": [{"role": "bot", "content": "q"}], "chosen": "a", "rejected": "b"}, "unknown role", id="prompt-role"
    ),
    pytest.param(
        {"prompt": [{**U, "weight": 1}], "chosen": "a", "rejected": "b"}, "only allowed on assistant", id="weight-on-user"
    ),
    pytest.param({"prompt": "q", "chosen": [U], "rejected": "b"}, "must end with an assistant", id="chosen-is-user"),
    pytest.param(
        {"prompt": "q", "chosen": [{**A, "weight": 0}], "rejected": "b"}, "weight' 0", id="weight-0-reply"
    ),
    pytest.param(
        {"prompt": [U], "chosen": [{"role": "user", "content": "other"}, A], "rejected": "b"},
        "does not start with the prompt",
        id="chosen-other-prompt",
    ),
    pytest.param({"prompt": "q", "chosen": [], "rejected": "b"}, "no messages", id="chosen-empty-list"),
]


@pytest.mark.parametrize("row, reason", BAD_DPO)
def test_schema_rejects_bad_preference(row, reason):
    with pytest.raises(ConversationError, match=reason):
        parse_preference(row)
