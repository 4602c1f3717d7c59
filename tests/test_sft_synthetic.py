"""The demo's generated skills: deterministic, held-out prompts never trained on, plausible wrong answers;
the tool_call skill's rows exact to mistral-common, and its scorer (a call's name and arguments as JSON)."""

from __future__ import annotations

import json
import random
import re

import pytest
from chat_reference import reference_encoding, reference_prompt

from mistral_align.chat import Message, ToolCall, get_encoder, parse_preference, parse_sft_row
from mistral_align.data.encode import check_row
from mistral_align.data.synthetic import (
    SKILLS,
    TOOLS,
    WORDS,
    as_call,
    call_text,
    eval_row,
    generate_items,
    make_splits,
    preference_row,
    sft_row,
    skill_of,
    wrong_answer,
    write_dpo_splits,
    write_sft_splits,
)
from mistral_align.train.evaluate import reply_matches, score_replies, split_prompt_reference
from mistral_align.train.report import pipeline_summary, pipeline_table


def _right(skill: str, body: str) -> str:
    """The right answer to a prompt's body, worked out here independently of the generator."""
    return {
        "copy": lambda: body,
        "reverse": lambda: " ".join(reversed(body.split())),
        "upper": lambda: body.upper(),
        "add": lambda: str(sum(int(x) for x in body.split(" + "))),
        "tool_call": lambda: json.dumps({"name": "add", "arguments": dict(zip("ab", map(int, re.findall(r"\d+", body))))}),
    }[skill]()


def test_items_are_correct_and_deterministic():
    a = generate_items(list(SKILLS), 40, seed=3)
    assert a == generate_items(list(SKILLS), 40, seed=3)
    assert {i.skill for i in a} == set(SKILLS)
    for item in a:
        assert item.answer == _right(item.skill, item.prompt.split(": ", 1)[1])


def test_held_out_prompts_are_never_trained_on():
    train, held = make_splits(list(SKILLS), 2000, 64, seed=0)
    assert len(held) == 64 and len({h.prompt for h in held}) == 64
    assert not {h.prompt for h in held} & {t.prompt for t in train}
    assert {h.skill for h in held} == set(SKILLS)


def test_wrong_answers_are_wrong_and_pairs_parse():
    rng = random.Random(0)
    for item in generate_items(list(SKILLS), 200, seed=1):
        wrong = wrong_answer(item, rng)
        assert wrong != item.answer and wrong.strip()
        parse_preference(preference_row(item, rng))


def test_words_are_single_tokens_so_skills_are_positional():
    enc = get_encoder("v3")
    assert all(len(enc.text(w)) == 1 for w in WORDS)


def test_written_splits_parse_and_give_prompt_and_reference(tmp_path):
    train_path, eval_path = write_sft_splits(tmp_path, list(SKILLS), 20, 10, seed=0)
    enc = get_encoder("v3")
    skills = []
    for line in eval_path.read_text().splitlines():
        conv = parse_sft_row(json.loads(line), version="v3")
        e = enc.encode_sft(conv.messages, tools=conv.tools)
        prompt, ref = split_prompt_reference(e.input_ids, e.labels)
        assert prompt == enc.encode_prompt(conv.messages[:-1], tools=conv.tools)
        assert ref == enc.encode_reply(conv.messages[-1])  # a tool_call row ends at the call
        skills.append(skill_of(enc.decode(prompt[1:])))
    assert sorted(skills) == sorted(list(SKILLS) * 2)
    assert len(train_path.read_text().splitlines()) == 20


def test_noise_replaces_that_share_of_one_skills_training_replies_only(tmp_path):
    text_skills = [s for s in SKILLS if s != "tool_call"]
    train_path, eval_path = write_sft_splits(tmp_path, text_skills, 800, 16, seed=0, noise={"upper": 0.5})
    wrong = {skill: 0 for skill in text_skills}
    total = dict(wrong)
    for line in train_path.read_text().splitlines():
        user, reply = (m["content"] for m in json.loads(line)["messages"])
        skill = skill_of(user)
        total[skill] += 1
        wrong[skill] += reply != _right(skill, user.split(": ", 1)[1])
    assert 0.4 < wrong["upper"] / total["upper"] < 0.6
    assert wrong["copy"] == wrong["reverse"] == wrong["add"] == 0
    for line in eval_path.read_text().splitlines():  # held-out replies are always right
        user, reply = (m["content"] for m in json.loads(line)["messages"])
        if user.startswith("Uppercase"):
            assert reply == user.split(": ", 1)[1].upper()


# -- the tool_call skill -------------------------------------------------------------------------

# The demo's v3 and the other versions whose files mistral-common ships with tools (the tekken ones
# take seconds to load; test_chat_tools.py covers every version's tool layout).
TOOL_VERSIONS = ("v3", "v2", "v7")


@pytest.mark.parametrize("version", TOOL_VERSIONS)
def test_tool_call_rows_validate_and_encode_exactly_as_mistral_common(version):
    """The whole exchange (SFT), the held-out row that ends at the call, and each preference pair,
    through check_row (what training, validate and preview share), equal mistral-common's ids and
    mask."""
    rng = random.Random(0)
    enc = get_encoder(version)
    for item in generate_items(["tool_call"], 4, seed=TOOL_VERSIONS.index(version)):
        for row in (sft_row(item), eval_row(item)):
            r = check_row("sft", json.dumps(row), enc)
            assert r.error is None, r.error
            ref = reference_encoding(version, row["messages"], row["tools"])
            assert (r.ids["input_ids"], r.ids["labels"]) == (ref.ids, ref.labels)
        assert len(sft_row(item)["messages"]) == 4  # the call, its result and the reply that uses it
        pair = preference_row(item, rng)
        r = check_row("dpo", json.dumps(pair), enc)
        assert r.error is None, r.error
        assert r.ids["prompt_ids"] == reference_prompt(version, pair["prompt"], pair["tools"])
        for side in ("chosen", "rejected"):
            whole = reference_encoding(version, pair["prompt"] + pair[side], pair["tools"]).ids
            assert r.ids["prompt_ids"] + r.ids[f"{side}_ids"] == whole


def test_tool_call_items_offer_add_and_a_distractor_and_rows_use_the_result():
    for item in generate_items(["tool_call"], 50, seed=4):
        assert "add" in item.tools and len(set(item.tools)) == 2 and set(item.tools) <= set(TOOLS)
        assert len(item.call_id) == 9 and item.call_id.isalnum()
        a, b = (int(x) for x in re.findall(r"\d+", item.prompt))
        assert item.prompt == f"Calculate: {a}, and then add {b}" and min(a, b) >= 10  # no one-digit sum
        user, call, result, final = sft_row(item)["messages"]
        assert call["tool_calls"][0]["id"] == result["tool_call_id"] == item.call_id
        assert result["content"] == str(a + b) and final["content"] == f"The sum is {a + b}."


def test_one_offset_copies_both_arguments_of_a_call_from_the_prompt():
    """What makes the skill learnable by the demo's tiny model: in v3's tokens, each argument's
    digits stand the same distance after their copy in the prompt, a and b alike (with
    "48 + 95" b stood three tokens further than a, and the model learned a only)."""
    enc = get_encoder("v3")
    for item in generate_items(["tool_call"], 20, seed=5):
        row = parse_sft_row(eval_row(item), version="v3")
        ids = enc.encode_sft(row.messages, tools=row.tools).input_ids
        prompt, call = split_prompt_reference(ids, enc.encode_sft(row.messages, tools=row.tools).labels)
        a, b = (enc.text(str(n))[1:] for n in map(int, re.findall(r"\d+", item.prompt)))  # the digits, no "▁"

        def at(seq, digits, start=0):
            return next(i for i in range(start, len(seq)) if seq[i:i + len(digits)] == digits)

        in_prompt = [at(prompt, a), at(prompt, b, at(prompt, a) + len(a))]
        in_call = [at(call, a), at(call, b, at(call, a) + len(a))]
        assert len(a) == len(b) == 2
        assert len(prompt) + in_call[0] - in_prompt[0] == len(prompt) + in_call[1] - in_prompt[1]


def test_tool_call_wrong_replies_are_each_kind_and_never_right():
    """Rejected replies: the wrong tool (a distractor the row offers, the right numbers), the right
    tool with a wrong number, or a sum written without calling."""
    rng = random.Random(0)
    kinds = {"tool": 0, "arguments": 0, "no call": 0}
    for item in generate_items(["tool_call"], 300, seed=2):
        wrong = wrong_answer(item, rng)
        right, call = as_call(item.answer), as_call(wrong)
        assert wrong != item.answer
        if call is None:
            kinds["no call"] += 1
            assert wrong.isdigit()
        elif call["name"] != "add":
            kinds["tool"] += 1
            assert call["name"] in item.tools and call["arguments"] == right["arguments"]
        else:
            kinds["arguments"] += 1
            assert call["arguments"] != right["arguments"]
        pair = parse_preference(preference_row(item, rng), version="v3")
        assert pair.chosen.tool_calls[0].name == "add" and pair.chosen != pair.rejected
    assert min(kinds.values()) > 60, kinds


def _reply(enc, *calls: tuple[str, str, str], content: str = "") -> list[int]:
    return enc.encode_reply(Message("assistant", content, tool_calls=tuple(ToolCall(*c) for c in calls)))


def test_reply_matches_scores_a_call_by_its_name_and_arguments_as_json():
    enc = get_encoder("v3")
    calls, eos = enc.raw.get_special_token("[TOOL_CALLS]"), enc.eos_id
    right = ("abcdefgh1", "add", '{"a": 4821, "b": 9087}')
    ref = _reply(enc, right)
    assert reply_matches(enc, ref, ref)
    assert reply_matches(enc, _reply(enc, ("ZZZZZZZZ9", "add", '{"a": 4821, "b": 9087}')), ref)  # the id is the model's
    # the same call spelled otherwise (keys in another order, no id): equal as JSON
    assert reply_matches(enc, [calls, *enc.text('[{"arguments": {"b": 9087, "a": 4821}, "name": "add"}]'), eos], ref)
    wrong = {
        "wrong tool": _reply(enc, ("abcdefgh1", "multiply", '{"a": 4821, "b": 9087}')),
        "wrong number": _reply(enc, ("abcdefgh1", "add", '{"a": 4821, "b": 9088}')),
        "a number as a string": _reply(enc, ("abcdefgh1", "add", '{"a": "4821", "b": 9087}')),
        "arguments swapped": _reply(enc, ("abcdefgh1", "add", '{"a": 9087, "b": 4821}')),
        "a second call": _reply(enc, right, ("bcdefgh12", "add", '{"a": 1, "b": 2}')),
        "no call, the sum as text": enc.encode_reply(Message("assistant", "13908")),
        "never stops": ref[:-1] + enc.text(" more"),
        "cut short": ref[:-1],
        "not JSON": [calls, *enc.text('[{"name": "add", "arguments": {"a": 4821'), eos],
        "no arguments": [calls, *enc.text('[{"name": "add"}]'), eos],
        "empty": [],
    }
    for what, out in wrong.items():
        assert not reply_matches(enc, out, ref), what
    text_ref = enc.encode_reply(Message("assistant", "stone river"))  # a text reply: its ids, nothing else
    assert reply_matches(enc, text_ref, text_ref)
    assert not reply_matches(enc, enc.encode_reply(Message("assistant", "river stone")), text_ref)


def test_scores_count_right_and_wrong_calls_per_skill(tmp_path):
    """score_replies on the held-out rows the demo writes, with hand-made replies: every text skill
    answered right, the tool_call prompts answered by the right call (another id), the wrong tool,
    a wrong number, and no call."""
    _, eval_path = write_sft_splits(tmp_path, list(SKILLS), 20, 20, seed=1)
    enc = get_encoder("v3")
    pairs, outputs, n_tool = [], [], 0
    for line in eval_path.read_text().splitlines():
        conv = parse_sft_row(json.loads(line), version="v3")
        e = enc.encode_sft(conv.messages, tools=conv.tools)
        prompt, ref = split_prompt_reference(e.input_ids, e.labels)
        pairs.append((prompt, ref))
        reply = conv.messages[-1]
        if reply.tool_calls:
            (call,) = reply.tool_calls
            args = json.loads(call.arguments)
            out = [("ZZZZZZZZ9", "add", call.arguments), ("ZZZZZZZZ9", "subtract", call.arguments),
                   ("ZZZZZZZZ9", "add", json.dumps({**args, "b": args["b"] + 1}))][n_tool % 4:n_tool % 4 + 1]
            outputs.append(_reply(enc, *out) if out else enc.encode_reply(Message("assistant", str(sum(args.values())))))
            n_tool += 1
        else:
            outputs.append(ref)
    scores = score_replies(enc, pairs, outputs, group=skill_of)
    assert n_tool == 4 and scores["n"] == 20
    assert scores["by_group"] == {"add": 1.0, "copy": 1.0, "reverse": 1.0, "tool_call": 0.25, "upper": 1.0}
    assert scores["exact_match"] == 17 / 20
    assert [s["correct"] for s in scores["samples"] if s["prompt"].startswith("[AVAILABLE_TOOLS]")] == [True, False,
                                                                                                          False, False]


def test_dpo_splits_hold_tool_pairs_out_of_the_same_prompts(tmp_path):
    train_path, eval_path = write_dpo_splits(tmp_path, list(SKILLS), 50, 10, seed=0)
    _, held = make_splits(list(SKILLS), 0, 10, seed=0)
    rows = [json.loads(line) for line in train_path.read_text().splitlines()]
    tool_rows = [r for r in rows if "tools" in r]
    assert len(tool_rows) == 10
    assert not {r["prompt"][0]["content"] for r in tool_rows} & {h.prompt for h in held}
    assert call_text("add", 1, 2) == '{"name": "add", "arguments": {"a": 1, "b": 2}}'


def test_the_demo_table_shows_each_skills_bar_and_names_a_miss():
    def stage(name: str, after: dict, bars: dict | None) -> dict:
        out = {"exact_match": {"before": 0.0, "after": sum(after.values()) / len(after)}, "n": 20, "samples_after": [],
               "by_skill": {"before": dict.fromkeys(after, 0.0), "after": after}}
        if bars:
            out["bars"] = {k: {"bar": b, "exact_match": after[k], "cleared": after[k] >= b} for k, b in bars.items()}
        return {name: {}, "eval": out}

    bars = {"copy": 0.9, "tool_call": 0.5}
    sft = stage("sft", {"copy": 1.0, "tool_call": 0.75}, bars)
    dpo = stage("dpo", {"copy": 1.0, "tool_call": 0.25}, bars)
    table = pipeline_table(pipeline_summary(sft, dpo))
    rows = {line.split()[0]: line for line in table.splitlines() if line.startswith("  ")}
    assert rows["copy"].split()[1:] == ["0.0%", "100.0%", "100.0%", "90%"]
    assert rows["tool_call"].split()[1:] == ["0.0%", "75.0%", "25.0%", "50%", "!"]
    assert "below its bar: tool_call 25.0% after DPO (bar 50%)" in table
    cleared = pipeline_table(pipeline_summary(sft, stage("dpo", {"copy": 1.0, "tool_call": 0.5}, bars)))
    assert "!" not in cleared and "every skill cleared its bar after SFT and after DPO" in cleared
    assert "bar" not in pipeline_table(pipeline_summary(stage("sft", {"copy": 1.0}, None), stage("dpo", {"copy": 1.0}, None)))
