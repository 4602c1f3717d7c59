"""The demo's generated skills: deterministic, held-out prompts never trained on, plausible wrong answers."""

from __future__ import annotations

import json
import random

from mistral_align.chat import get_encoder, parse_preference, parse_sft_messages
from mistral_align.data.synthetic import (
    skill_of,
    SKILLS,
    WORDS,
    generate_items,
    make_splits,
    preference_row,
    wrong_answer,
    write_sft_splits,
)
from mistral_align.train.evaluate import split_prompt_reference


def test_items_are_correct_and_deterministic():
    a = generate_items(list(SKILLS), 40, seed=3)
    assert a == generate_items(list(SKILLS), 40, seed=3)
    for item in a:
        body = item.prompt.split(": ", 1)[1]
        expected = {
            "copy": lambda: body,
            "reverse": lambda: " ".join(reversed(body.split())),
            "upper": lambda: body.upper(),
            "add": lambda: str(sum(int(x) for x in body.split(" + "))),
        }[item.skill]
        assert item.answer == expected()


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
    train_path, eval_path = write_sft_splits(tmp_path, list(SKILLS), 20, 8, seed=0)
    enc = get_encoder("v3")
    for line in eval_path.read_text().splitlines():
        messages = parse_sft_messages(json.loads(line)["messages"])
        e = enc.encode_sft(messages)
        prompt, ref = split_prompt_reference(e.input_ids, e.labels)
        assert prompt == enc.encode_prompt(messages[:-1])
        assert ref == enc.text(messages[-1].content) + [enc.eos_id]
        assert skill_of(enc.decode(prompt[1:]).replace("\u2581", " ")) in {"copy", "reverse", "add", "uppercase"}
    assert len(train_path.read_text().splitlines()) == 20


def test_noise_replaces_that_share_of_one_skills_training_replies_only(tmp_path):
    train_path, eval_path = write_sft_splits(tmp_path, list(SKILLS), 800, 16, seed=0, noise={"upper": 0.5})
    wrong = {skill: 0 for skill in SKILLS}
    total = dict(wrong)
    for line in train_path.read_text().splitlines():
        user, reply = (m["content"] for m in json.loads(line)["messages"])
        skill = skill_of(user)
        skill = "upper" if skill == "uppercase" else skill
        total[skill] += 1
        body = user.split(": ", 1)[1]
        right = {"copy": lambda: body, "reverse": lambda: " ".join(reversed(body.split())), "upper": body.upper,
                 "add": lambda: str(sum(int(x) for x in body.split(" + ")))}[skill]()  # fmt: skip
        wrong[skill] += reply != right
    assert 0.4 < wrong["upper"] / total["upper"] < 0.6
    assert wrong["copy"] == wrong["reverse"] == wrong["add"] == 0
    for line in eval_path.read_text().splitlines():  # held-out replies are always right
        user, reply = (m["content"] for m in json.loads(line)["messages"])
        if user.startswith("Uppercase"):
            assert reply == user.split(": ", 1)[1].upper()
