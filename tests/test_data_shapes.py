"""The data shapes people have on disk, read as they are, with ids and masks equal to mistral-common's
for the conversation each row holds: Alpaca (instruction/input/output), TRL's conversational
prompt/completion, TRL's implicit-prompt preference pairs. And the columns other formats give a
meaning (KTO's label, ratings, tool_calls...): named for what they are, never offered for dropping.

The ids are read back from `mistral-align preview --jsonl`, the shape from `validate --json`: the
commands that share their reader and encoder with training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chat_reference import reference_encoding, reference_tokens
from mistral_align.errors import DataError

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = {"id": "abcdefgh1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str, **fields) -> dict:
    return {"role": "assistant", "content": text, **fields}


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def cli(*argv: str, capsys) -> tuple[int, str, str]:
    from mistral_align.entry.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def preview(path: Path, kind: str, version: str, capsys) -> list[dict]:
    code, out, err = cli("preview", "--kind", kind, "--tokenizer", version, "--data", str(path), "--jsonl", capsys=capsys)
    assert code == 0 and err == "", err
    return [json.loads(line) for line in out.splitlines()]


def shape_of(path: Path, kind: str, capsys) -> str:
    code, out, _ = cli("validate", "--kind", kind, "--data", str(path), "--json", capsys=capsys)
    report = json.loads(out)
    assert code == 0 and report["valid"], report
    return report["format"]


# Each SFT row, and the conversation (mistral-common's messages, with weights) it stands for.
ALPACA = [
    ({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
     [user("Add the numbers.\n2 and 3"), assistant("5")], None),
    ({"instruction": "Name a colour.", "input": "", "output": "Blue."},  # an empty input is no input
     [user("Name a colour."), assistant("Blue.")], None),
    ({"instruction": "Translate «bonjour».", "output": "こんにちは", "system": "Answer in Japanese."},
     [{"role": "system", "content": "Answer in Japanese."}, user("Translate «bonjour»."), assistant("こんにちは")], None),
]
CONVERSATIONAL = [
    ({"prompt": [user("Hi")], "completion": [assistant("Hello!")]}, [user("Hi"), assistant("Hello!")], None),
    # the prompt's replies are context (TRL trains the completion only): weight 0
    ({"prompt": [{"role": "system", "content": "Be brief."}, user("2+2?"), assistant("4."), user("And 3+3?")],
      "completion": [assistant("6.")]},
     [{"role": "system", "content": "Be brief."}, user("2+2?"), assistant("4.", weight=0), user("And 3+3?"),
      assistant("6.")], None),
    # tools: the completion calls one, reads its result, answers (all of it the completion)
    ({"prompt": [user("Weather in Paris?")],
      "completion": [{"role": "assistant", "tool_calls": [CALL]},
                     {"role": "tool", "tool_call_id": "abcdefgh1", "content": "sunny"}, assistant("Sunny.")],
      "tools": [WEATHER]},
     [user("Weather in Paris?"), {"role": "assistant", "tool_calls": [CALL]},
      {"role": "tool", "tool_call_id": "abcdefgh1", "content": "sunny"}, assistant("Sunny.")], [WEATHER]),
]


@pytest.mark.parametrize("version", ["v1", "v3", "v7", "v3-tekken", "v13"])
@pytest.mark.parametrize("name,cases", [("alpaca", ALPACA), ("conversational_prompt_completion", CONVERSATIONAL)])
def test_sft_shapes_are_read_as_they_are_with_mistral_commons_ids_and_mask(name, cases, version, tmp_path, capsys):
    cases = [c for c in cases if c[2] is None or version != "v1"]  # v1 has no tools
    path = write(tmp_path / "rows.jsonl", [row for row, _, _ in cases])
    assert shape_of(path, "sft", capsys) == name
    for got, (_, conversation, tools) in zip(preview(path, "sft", version, capsys), cases, strict=True):
        want = reference_encoding(version, conversation, tools)
        assert got == {"input_ids": want.ids, "labels": want.labels}


@pytest.mark.parametrize("version", ["v1", "v3", "v7", "v11"])
def test_implicit_prompt_pairs_equal_the_same_pairs_with_their_prompt(version, tmp_path, capsys):
    prompt = [{"role": "system", "content": "Be kind."}, user("Is it raining?"), assistant("No."), user("Sure?")]
    chosen, rejected = assistant("Yes, I checked."), assistant("Whatever.")
    implicit = write(tmp_path / "implicit.jsonl", [{"chosen": [*prompt, chosen], "rejected": [*prompt, rejected]}])
    explicit = write(tmp_path / "explicit.jsonl", [{"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}])
    assert shape_of(implicit, "dpo", capsys) == "implicit_prompt_preference"
    [got] = preview(implicit, "dpo", version, capsys)
    assert [got] == preview(explicit, "dpo", version, capsys)
    assert got["prompt_ids"] + got["chosen_ids"] == reference_tokens(version, [*prompt, chosen])
    assert got["prompt_ids"] + got["rejected_ids"] == reference_tokens(version, [*prompt, rejected])


@pytest.mark.parametrize("row,reason", [
    ({"chosen": [user("a"), assistant("b")], "rejected": [user("x"), assistant("y")]},
     "missing field 'prompt' (chosen and rejected do not start with the same message"),
    ({"chosen": [user("a"), assistant("b"), user("c"), assistant("d")],
      "rejected": [user("a"), assistant("z"), user("c"), assistant("e")]},
     "chosen: 3 message(s) after the 1 both conversations start with; a pair without 'prompt' shares every message "
     "but the last, the reply"),
    ({"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("b")]},
     "chosen and rejected are the same conversation"),
])
def test_implicit_prompt_pairs_that_are_not_pairs_are_refused(row, reason, tmp_path, capsys):
    code, out, _ = cli("validate", "--kind", "dpo", "--data", str(write(tmp_path / "d.jsonl", [row])), capsys=capsys)
    assert code == 1 and f"d.jsonl:1: {reason}" in out, out


@pytest.mark.parametrize("row,reason", [
    ({"prompt": [user("a")], "completion": [user("b")]},
     "completion[0]: a completion starts with the assistant's reply, got user"),
    ({"prompt": [user("a"), assistant("b", weight=1), user("c")], "completion": [assistant("d")]},
     "prompt[1]: 'weight' 1 in a prompt; a prompt is context, never trained"),
    ({"prompt": [user("a")], "completion": [assistant("b"), assistant("c")]},
     "completion[1]: wrong role order: expected user, got assistant"),
    ({"prompt": [user("a")], "completion": "b"}, "'prompt' must be a string, got list, as 'completion' is one"),
    ({"instruction": "a", "input": 3, "output": "b"}, "'input' must be a string, got int"),
    ({"input": "a", "output": "b"}, "missing field 'instruction' (an Alpaca row holds 'instruction', 'input' and 'output')"),
    ({"instruction": "a", "output": "b", "tools": [WEATHER]}, "'tools' needs the 'messages' shape"),
])
def test_a_bad_row_of_these_shapes_names_its_own_field(row, reason, tmp_path, capsys):
    code, out, _ = cli("validate", "--kind", "sft", "--data", str(write(tmp_path / "d.jsonl", [row])), capsys=capsys)
    assert code == 1 and f"d.jsonl:1: {reason}" in out, out


# -- columns whose meaning we know ---------------------------------------------------------------

KTO = [{"prompt": "Is the sky green?", "completion": "Yes, always.", "label": False},
       {"prompt": "Is the sky blue?", "completion": "Yes, by day.", "label": True}]


def test_kto_rows_are_not_trained_as_sft_even_with_their_label_dropped(tmp_path, capsys):
    """Validated as SFT with --ignore-fields label, KTO rows passed, and training would have taught
    the undesirable completion as a target."""
    path = write(tmp_path / "kto.jsonl", KTO)
    code, out, _ = cli("validate", "--kind", "sft", "--data", str(path), capsys=capsys)
    assert code == 1 and "KTO's verdict on the completion (true: desirable, false: undesirable)" in out
    assert "dpo.objective=kto" in out and "ignore_fields" not in out
    code, out, _ = cli("validate", "--kind", "sft", "--data", str(path), "--ignore-fields", "label", capsys=capsys)
    assert code == 1, out
    assert out.startswith(f"FAILED: {path}: ignore_fields drops 'label', which these rows hold as KTO's verdict on the "
                          "completion (true: desirable, false: undesirable) (line 1: false); dropped, every completion, "
                          "the undesirable ones too, would be trained as a target. KTO rows are taken by a preference "
                          "stage with dpo.objective=kto")
    # the training loader says the same, before any row is encoded
    from mistral_align.chat.encoder import get_encoder
    from mistral_align.data.load import load_sft_dataset
    from mistral_align.schema.data import SFTDataConfig, SourceConfig

    with pytest.raises(DataError, match="ignore_fields drops 'label'"):
        load_sft_dataset(SFTDataConfig(train=[SourceConfig(str(path), ignore_fields=["label"])]), get_encoder("v3"))
    # as DPO data, too, they are named for what they are
    code, out, _ = cli("validate", "--kind", "dpo", "--data", str(path), capsys=capsys)
    assert code == 1 and "KTO data, not DPO data" in out and "dpo.objective=kto" in out


def test_desirable_only_kto_rows_may_drop_their_label(tmp_path, capsys):
    path = write(tmp_path / "good.jsonl", [KTO[1]])
    code, out, _ = cli("validate", "--kind", "sft", "--data", str(path), "--ignore-fields", "label", capsys=capsys)
    assert code == 0, out


MEANINGFUL = [
    # (row, what the message must say)
    ({"messages": [user("a"), assistant("b")], "label": False}, "'label' is not read here: it is KTO's verdict"),
    ({"messages": [user("a"), assistant("b")], "score": 4.5}, "'score' is not read here: it is a rating of the reply"),
    ({"messages": [user("a"), assistant("b")], "tool_calls": [CALL]},
     "'tool_calls' is not read here: it is an assistant message's tool calls: they go inside that message"),
    ({"messages": [user("a"), assistant("b")], "chosen": "c"}, "'chosen' is not read here: it is a reply of a preference pair"),
    ({"instruction": "a", "output": "b", "history": [["q", "r"]]}, "'history' is not read here: it is the earlier turns"),
]


@pytest.mark.parametrize("row,meaning", MEANINGFUL, ids=[next(k for k in r if k in m) for r, m in MEANINGFUL])
def test_a_column_with_a_meaning_is_named_for_it_and_never_offered_for_dropping(row, meaning, tmp_path, capsys):
    # after 60 plain rows, so the file's shape is plain chat and the row's own check speaks
    rows = [{"messages": [user(f"q{i}"), assistant("r")]} for i in range(60)] + [row]
    code, out, _ = cli("validate", "--kind", "sft", "--data", str(write(tmp_path / "d.jsonl", rows)), capsys=capsys)
    [line] = [x for x in out.splitlines() if x.startswith(f"{tmp_path / 'd.jsonl'}:61: ")]
    assert code == 1 and meaning in line and "ignore_fields" not in line, line


def test_an_unknown_column_beside_a_known_one_is_still_offered_for_dropping(tmp_path, capsys):
    row = {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 9, "source": "web"}
    code, out, _ = cli("validate", "--kind", "dpo", "--data", str(write(tmp_path / "d.jsonl", [row])), capsys=capsys)
    [line] = [x for x in out.splitlines() if ":1: " in x]
    assert line.split(":1: ", 1)[1] == (
        "unknown field(s) ['source'] (a DPO row holds 'prompt', 'chosen' and 'rejected', optionally with 'system'); "
        "to drop such columns, list them in the source's ignore_fields; 'score_chosen' is not read here: it is a "
        "rating of the reply (reward-model or rated data); DPO reads which reply was chosen, not by how much")


def test_preview_says_how_rows_of_another_shape_were_read(tmp_path, capsys):
    path = write(tmp_path / "alpaca.jsonl", [ALPACA[0][0]])
    code, out, _ = cli("preview", "--kind", "sft", "--tokenizer", "v3", "--data", str(path), "--color", "never",
                       capsys=capsys)
    assert code == 0 and out.splitlines()[0] == f"{path}: rows read as alpaca ('instruction'/'input'/'output')"
    code, out, _ = cli("validate", "--kind", "sft", "--data", str(path), capsys=capsys)
    assert "rows read as: alpaca ('instruction'/'input'/'output')" in out.splitlines()
