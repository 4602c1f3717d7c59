"""KTO's data (dpo.objective=kto): rows {prompt, completion, label} in every shape a DPO row's prompt
and reply take (strings, messages, a system prompt, tools), encoded exactly as mistral-common does;
preference pairs split into a desirable and an undesirable row; `validate --kind kto` and
`preview --kind kto`."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from chat_reference import reference_prompt, reference_tokens
from doc_commands import doc_commands
from tool_rows import TOOLS, call, write_jsonl

from mistral_align.chat.encoder import get_encoder
from mistral_align.chat.schema import Message
from mistral_align.data.encode import check_row
from mistral_align.data.kto import balance_advice
from mistral_align.data.load import load_kto_dataset
from mistral_align.entry.cli import main
from mistral_align.schema.data import DataConfig, SourceConfig


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def tool_call(city: str) -> dict:
    return {**call(city), "id": "abcdefgh1"}  # a v3 id


KTO_ROWS = [
    ({"prompt": "Add: 2 + 2", "completion": "4", "label": True},
     [{"role": "user", "content": "Add: 2 + 2"}], {"role": "assistant", "content": "4"}, None),
    ({"system": "Be brief.", "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                        {"role": "user", "content": "Bye"}],
      "completion": [{"role": "assistant", "content": "See you, and have a long and lovely day!"}], "label": False},
     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
      {"role": "user", "content": "Bye"}], {"role": "assistant", "content": "See you, and have a long and lovely day!"}, None),
    ({"tools": TOOLS, "prompt": [{"role": "user", "content": "Weather in Oslo?"}],
      "completion": [{"role": "assistant", "tool_calls": [tool_call("Oslo")]}], "label": True},
     [{"role": "user", "content": "Weather in Oslo?"}], {"role": "assistant", "tool_calls": [tool_call("Oslo")]}, TOOLS),
]  # fmt: skip


@pytest.mark.parametrize("row, prompt, reply, tools", KTO_ROWS, ids=["strings", "messages-system", "tools"])
def test_kto_rows_encode_exactly_as_mistral_common(row, prompt, reply, tools):
    r = check_row("kto", json.dumps(row), get_encoder("v3"))
    assert r.error is None, r.error
    ids = r.ids
    assert ids["prompt_ids"] == reference_prompt("v3", prompt, tools)
    assert ids["prompt_ids"] + ids["completion_ids"] == reference_tokens("v3", [*prompt, reply], tools)
    assert ids["label"] is row["label"] and ids["rejected_ids"] == []
    assert (r.desirable, r.undesirable) == ((1, 0) if row["label"] else (0, 1))
    assert r.trained == len(ids["completion_ids"]) and r.tool_row == (tools is not None)


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "x", "completion": "y", "label": "yes"}, "'label' must be true (a desirable reply) or false"),
    ({"prompt": "x", "completion": "y", "label": 1}, "'label' must be true"),
    ({"prompt": "x", "completion": "y"}, "missing field 'label' (a KTO row holds 'prompt', 'completion' and 'label')"),
    ({"prompt": "x", "completion": "y", "label": True, "score": 3}, "'score' is not read here: it is a rating"),
    ({"prompt": "x", "completion": [{"role": "user", "content": "y"}], "label": True}, "must end with an assistant reply"),
    ({"prompt": "", "completion": "y", "label": False}, "prompt: empty"),
])  # fmt: skip
def test_bad_kto_rows_say_why_in_one_line(row, reason):
    r = check_row("kto", json.dumps(row), get_encoder("v3"))
    assert r.ids is None and reason in r.error and "\n" not in r.error


def test_pairs_are_split_in_two_rows_shuffled_once_and_kept_on_one_side_of_the_eval_split(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Add: {i} + 1", "chosen": str(i + 1), "rejected": str(i + 2)}
                                                   for i in range(10)])  # fmt: skip
    kto = write_jsonl(tmp_path / "kto.jsonl", [row for row, *_ in KTO_ROWS])
    cfg = DataConfig(train=[SourceConfig(path=str(pairs)), SourceConfig(path=str(kto))], eval_fraction=0.2)
    data = load_kto_dataset(cfg, get_encoder("v3"))
    assert data.train.column_names == ["prompt_ids", "completion_ids", "label"]
    # 13 rows in, 3 held out (a pair is held out whole); 10 pairs give 20 rows.
    rows = data.train.to_list() + data.eval.to_list()
    assert len(rows) == 23 and sum(r["label"] for r in rows) == 10 + 2
    halves = {}
    for split in (data.train, data.eval):
        for r in split.to_list():
            halves.setdefault(tuple(r["prompt_ids"]), set()).add((id(split), r["label"]))
    for prompt, seen in halves.items():
        assert len({s for s, _ in seen}) == 1, prompt  # both halves of a pair on the same side
    assert data.report["desirable"] == 12 and data.report["undesirable"] == 11
    # Each training row names its line; a pair's two rows name the same one.
    assert len(data.train_rows) == len(data.train) and sum(o.endswith("pairs.jsonl:1") for o in data.train_rows) in (0, 2)
    # Shuffled once, the same way every time (TRL reads KTO batches in order): not in file order.
    again = load_kto_dataset(cfg, get_encoder("v3"))
    assert again.train.to_list() == data.train.to_list() and again.train_rows == data.train_rows
    assert data.train_rows != sorted(data.train_rows, key=lambda o: (o.split(":")[0], int(o.split(":")[1])))


def test_validate_counts_desirable_and_undesirable_and_gives_trls_balance_advice(tmp_path, capsys):
    rows = [{"prompt": f"q{i}", "completion": "a", "label": i < 6} for i in range(10)]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    assert main(["validate", "--kind", "kto", "--data", str(path)]) == 0
    out = capsys.readouterr().out
    assert "KTO replies: 6 desirable, 4 undesirable" in out
    # TRL's range (kto_trainer: desirable_weight in [n_u/n_d, 1.33 n_u/n_d] or undesirable_weight in
    # [n_d/n_u/1.33, n_d/n_u]) for 6 / 4: [0.67, 0.89] or [1.13, 1.50].
    assert ("warning: 6 desirable vs 4 undesirable rows at weights 1 / 1 is a weighted ratio of 1.50, outside TRL's "
            "recommended [1, 1.33]: set dpo.desirable_weight in [0.67, 0.89] or dpo.undesirable_weight in [1.13, 1.50]") in out
    assert balance_advice(6, 4, undesirable_weight=1.3) is None and balance_advice(5, 5) is None
    assert "no undesirable (label false) rows" in balance_advice(3, 0)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert main(["validate", "--kind", "kto", "--data", str(pairs), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["desirable"], report["undesirable"], report["balance_warning"]) == (1, 1, None)


def test_preview_jsonl_prints_kto_rows_and_a_pair_as_its_two_rows(tmp_path, capsys):
    enc = get_encoder("v3")
    path = write_jsonl(tmp_path / "mixed.jsonl", [KTO_ROWS[0][0], {"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert main(["preview", "--kind", "kto", "--tokenizer", "v3", "--data", str(path), "--jsonl"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [list(line) for line in lines] == [["prompt_ids", "completion_ids", "label"]] * 3
    assert [line["label"] for line in lines] == [True, True, False]
    assert lines[1]["prompt_ids"] == lines[2]["prompt_ids"] == enc.encode_prompt([Message("user", "p")])
    assert lines[1]["completion_ids"] == enc.encode_reply(Message("assistant", "a"))
    assert lines[2]["completion_ids"] == enc.encode_reply(Message("assistant", "b"))
    assert main(["preview", "--kind", "kto", "--tokenizer", "v3", "--data", str(path), "--color", "never"]) == 0
    shown = capsys.readouterr().out
    assert "desirable:  " in shown and "undesirable: " in shown


def test_the_docs_kto_validate_line_runs_and_advises_a_weight(capsys, monkeypatch):
    (command,) = doc_commands("mistral-align validate --kind kto")
    monkeypatch.chdir(ROOT)
    assert main(list(command.argv[1:])) == 0
    out = capsys.readouterr().out
    # The docs' KTO command follows the advice: dpo.undesirable_weight=1.3 is in [1.13, 1.50].
    assert "KTO replies: 6 desirable, 4 undesirable" in out and "dpo.undesirable_weight in [1.13, 1.50]" in out
    (kto,) = doc_commands("dpo.objective=kto")
    assert "dpo.undesirable_weight=1.3" in kto.argv
