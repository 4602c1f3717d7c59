"""Reading rows: file types, line numbers, row shapes (incl. the two Hub shapes), format detection."""

from __future__ import annotations

import json

import datasets
import pytest

from mistral_align.chat.encoder import get_encoder
from mistral_align.chat.schema import parse_preference, parse_sft_messages
from mistral_align.data.load import DataError, load_dpo_dataset, load_sft_dataset
from mistral_align.data.read import SourceError, check_kind, read_source
from mistral_align.schema.data import DataConfig, SourceConfig


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # Keep encoded-data cache files out of the user's ~/.cache during tests.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


def conv(q, a, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


# Rows shaped like HuggingFaceH4/ultrachat_200k (prompt, prompt_id, messages), text written here.
ULTRACHAT_ROWS = [
    {"prompt": "How do tides work?", "prompt_id": "a1" * 32, "messages": conv("How do tides work?", "The Moon's pull raises the sea.")},
    {
        "prompt": "Name two planets.",
        "prompt_id": "b2" * 32,
        "messages": conv("Name two planets.", "Mars and Venus.")
        + [{"role": "user", "content": "One more?"}, {"role": "assistant", "content": "Jupiter."}],
    },
]

# Rows shaped like HuggingFaceH4/ultrafeedback_binarized: prompt str, chosen/rejected are
# [user, assistant] conversations repeating the prompt, plus score and id columns.
ULTRAFEEDBACK_ROWS = [
    {
        "prompt": "Is ice denser than water?",
        "prompt_id": "c3" * 32,
        "chosen": conv("Is ice denser than water?", "No, ice is less dense, which is why it floats."),
        "rejected": conv("Is ice denser than water?", "Yes, ice sinks."),
        "messages": conv("Is ice denser than water?", "No, ice is less dense, which is why it floats."),
        "score_chosen": 9.0,
        "score_rejected": 2.5,
    },
    {
        "prompt": "Spell 'cat' backwards.",
        "prompt_id": "d4" * 32,
        "chosen": conv("Spell 'cat' backwards.", "tac"),
        "rejected": conv("Spell 'cat' backwards.", "cta"),
        "messages": conv("Spell 'cat' backwards.", "tac"),
        "score_chosen": 10.0,
        "score_rejected": 1.0,
    },
]


def test_jsonl_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"messages": []}\n\n   \n{"a": 1}\n{broken\n')
    raw = read_source(SourceConfig(str(path)))
    assert raw.lines == [1, 4, 5]
    assert raw.rows[2] == "{broken"


def test_invalid_utf8_is_a_row_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"messages": []}\n{"messages": "\xff"}\n')
    raw = read_source(SourceConfig(str(path)))
    assert raw.read_errors[0] is None
    assert raw.read_errors[1].startswith("invalid UTF-8")


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        read_source(SourceConfig(str(tmp_path / "nope.jsonl")))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(SourceError, match="unsupported file type"):
        read_source(SourceConfig(str(tmp_path / "d.csv")))


def test_json_list_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"messages": conv("a", "b")}, {"messages": conv("c", "d")}]))
    raw = read_source(SourceConfig(str(path)))
    assert raw.lines == [1, 2] and raw.format == "messages"
    path.write_text(json.dumps({"messages": []}))
    with pytest.raises(SourceError, match="must hold a list"):
        read_source(SourceConfig(str(path)))


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"messages": conv("a", "b")}, "messages"),
        (ULTRACHAT_ROWS[0], "ultrachat"),
        ({"prompt": "a", "chosen": "b", "rejected": "c"}, "preference"),
        (ULTRAFEEDBACK_ROWS[0], "ultrafeedback"),
    ],
)
def test_format_detection(tmp_path, row, fmt):
    raw = read_source(SourceConfig(str(write_jsonl(tmp_path / "d.jsonl", ["not json", row]))))
    assert raw.format == fmt


def test_kind_mismatch_is_named(tmp_path):
    raw = read_source(SourceConfig(str(write_jsonl(tmp_path / "d.jsonl", ULTRAFEEDBACK_ROWS))))
    with pytest.raises(SourceError, match="DPO data, but SFT data was expected"):
        check_kind(raw, "sft")
    check_kind(raw, "dpo")


def test_forced_unknown_format(tmp_path):
    with pytest.raises(SourceError, match="unknown format"):
        read_source(SourceConfig(str(write_jsonl(tmp_path / "d.jsonl", ULTRACHAT_ROWS)), format="oasst"))


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_ultrachat_shape_reads_messages_as_is(tmp_path, suffix):
    path = tmp_path / f"uc.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, ULTRACHAT_ROWS)
    else:
        datasets.Dataset.from_list(ULTRACHAT_ROWS).to_parquet(str(path))
    enc = get_encoder("v3")
    data = load_sft_dataset(DataConfig(train=[SourceConfig(str(path))]), enc)
    assert data.report["sources"][0]["format"] == "ultrachat"
    assert data.train.column_names == ["input_ids", "labels"]
    for got, row in zip(data.train, ULTRACHAT_ROWS):
        want = enc.encode_sft(parse_sft_messages(row["messages"]))
        assert got["input_ids"] == want.input_ids and got["labels"] == want.labels


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_ultrafeedback_shape_maps_columns(tmp_path, suffix):
    path = tmp_path / f"uf.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, ULTRAFEEDBACK_ROWS)
    else:
        datasets.Dataset.from_list(ULTRAFEEDBACK_ROWS).to_parquet(str(path))
    enc = get_encoder("v7")
    data = load_dpo_dataset(DataConfig(train=[SourceConfig(str(path))]), enc)
    assert data.report["sources"][0]["format"] == "ultrafeedback"
    assert data.train.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    for got, row in zip(data.train, ULTRAFEEDBACK_ROWS):
        want = enc.encode_dpo(parse_preference(row))
        assert got == {"prompt_ids": want.prompt_ids, "chosen_ids": want.chosen_ids, "rejected_ids": want.rejected_ids}
        # The prompt is in the prompt ids only, not repeated before the reply.
        assert got["chosen_ids"] == [*enc.text(row["chosen"][1]["content"]), enc.eos_id]


def test_parquet_with_weight_on_some_messages_only(tmp_path):
    # Arrow fills a missing `weight` with null; that must read as "no weight", not a bad value.
    rows = [
        {"messages": conv("q1", "a1")},
        {"messages": [*conv("q2", "wrong"), {"role": "user", "content": "again"}, {"role": "assistant", "content": "right"}]},
    ]
    rows[1]["messages"][1]["weight"] = 0
    path = tmp_path / "w.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    enc = get_encoder("v3")
    data = load_sft_dataset(DataConfig(train=[SourceConfig(str(path))]), enc)
    want = enc.encode_sft(parse_sft_messages(rows[1]["messages"]))
    assert data.train[1]["labels"] == want.labels
    assert [t for t in want.labels if t != -100] == [*enc.text("right"), enc.eos_id]


def test_a_directory_is_named_as_one(tmp_path):
    # It used to read "no such file", though it is there.
    (tmp_path / "data").mkdir()
    with pytest.raises(SourceError, match=rf"^{tmp_path / 'data'}: is a directory; name a .jsonl, .json or .parquet file"):
        read_source(SourceConfig(str(tmp_path / "data")))
    with pytest.raises(DataError, match="is a directory"):
        load_sft_dataset(DataConfig(train=[SourceConfig(str(tmp_path / "data"))]), get_encoder("v3"))


def test_not_a_file_nor_hub_id_is_a_clear_error(tmp_path):
    # A path with a data suffix never goes to the Hub, so this fails offline, without a download.
    with pytest.raises(DataError, match="no such file"):
        load_sft_dataset(DataConfig(train=[SourceConfig(str(tmp_path / "missing.jsonl"))]), get_encoder("v3"))


# -- row shapes users bring (chat/schema.py "row shapes") ----------------------------------------

SYSTEM = "Answer in French."


def _sft_ids(path, enc, **kw):
    data = load_sft_dataset(DataConfig(train=[SourceConfig(str(path))], **kw), enc)
    return [(r["input_ids"], r["labels"]) for r in data.train]


def _want_sft(enc, messages):
    e = enc.encode_sft(parse_sft_messages(messages))
    return (e.input_ids, e.labels)


@pytest.mark.parametrize("version", ["v3", "v7"])  # v7: the system prompt has its own block
def test_sft_shapes_give_the_exact_ids_of_the_messages_they_mean(tmp_path, version):
    enc = get_encoder(version)
    rows = [
        {"system": SYSTEM, "messages": conv("Hello", "Bonjour")},
        {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": "Hello"},
                           {"from": "gpt", "value": "Bonjour"}, {"from": "user", "value": "Thanks"},
                           {"from": "assistant", "value": "Merci"}], "id": "sg-1"},
        {"system": SYSTEM, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Salut"}]},
        {"prompt": "Two plus two?", "completion": "Quatre."},
        {"prompt": "Red?", "completion": "Rouge.", "system": SYSTEM},
        {"system": "", "messages": conv("Empty system", "Means none")},
    ]
    canonical = [
        conv("Hello", "Bonjour", SYSTEM),
        conv("Hello", "Bonjour", SYSTEM) + conv("Thanks", "Merci"),
        conv("Hi", "Salut", SYSTEM),
        conv("Two plus two?", "Quatre."),
        conv("Red?", "Rouge.", SYSTEM),
        conv("Empty system", "Means none"),
    ]
    got = _sft_ids(write_jsonl(tmp_path / "shapes.jsonl", rows), enc)
    assert got == [_want_sft(enc, m) for m in canonical]
    # The system prompt really is in the ids (the bug: a top-level "system" was dropped without a word).
    assert got[0] != _want_sft(enc, conv("Hello", "Bonjour"))
    for row in rows[1:2]:
        raw = read_source(SourceConfig(str(write_jsonl(tmp_path / "sg.jsonl", [row]))))
        assert raw.format == "sharegpt"
    raw = read_source(SourceConfig(str(write_jsonl(tmp_path / "pc.jsonl", rows[3:4]))))
    assert raw.format == "prompt_completion"
    with pytest.raises(SourceError, match="SFT data, but DPO data was expected"):
        check_kind(raw, "dpo")


def test_dpo_top_level_system_goes_before_the_prompt(tmp_path):
    enc = get_encoder("v7")
    rows = [
        {"system": SYSTEM, "prompt": "Hello", "chosen": "Bonjour", "rejected": "Hello"},
        {"system": SYSTEM, "prompt": "Is ice dense?", "chosen": conv("Is ice dense?", "Non."),
         "rejected": conv("Is ice dense?", "Oui."), "id": 7},
    ]
    data = load_dpo_dataset(DataConfig(train=[SourceConfig(str(write_jsonl(tmp_path / "p.jsonl", rows)))]), enc)
    wants = [
        {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"}],
         "chosen": "Bonjour", "rejected": "Hello"},
        {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Is ice dense?"}],
         "chosen": "Non.", "rejected": "Oui."},
    ]
    for got, want_row in zip(data.train, wants):
        want = enc.encode_dpo(parse_preference(want_row))
        assert got == {"prompt_ids": want.prompt_ids, "chosen_ids": want.chosen_ids, "rejected_ids": want.rejected_ids}


UNKNOWN_KEY_ROWS = [
    # (kind, row, reason after "FILE:LINE: ")
    ("sft", {"messages": conv("a", "b"), "sytem": "typo"},
     "unknown field(s) ['sytem'] (an SFT row holds 'messages', 'conversations' (ShareGPT), 'prompt' and "
     "'completion', or 'instruction', 'input' and 'output' (Alpaca), optionally with 'system')"),
    ("sft", {"messages": conv("a", "b"), "prompt": "a"}, "unknown field(s) ['prompt']"),
    ("sft", {"messages": conv("a", "b"), "conversations": []}, "both 'messages' and 'conversations': a row has one shape"),
    ("sft", {"prompt": "a"}, "missing field 'completion'"),
    ("sft", {"prompt": ["a"], "completion": "b"}, "'prompt' must be a string, got list"),
    ("sft", {"system": SYSTEM, "messages": conv("a", "b", "Other")},
     "two system prompts: the row's 'system' field and messages[0]; keep one"),
    ("sft", {"system": 3, "messages": conv("a", "b")}, "'system' must be a string, got int"),
    ("sft", {"conversations": [{"from": "bot", "value": "a"}]},
     "conversations[0]: unknown role (from) 'bot' (expected one of human, user, gpt, assistant, system)"),
    ("sft", {"conversations": [{"from": "human", "content": "a"}]}, "conversations[0]: unknown field(s) ['content']"),
    ("sft", {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": 1}]},
     "conversations[1]: 'value' must be a string, got int"),
    ("dpo", {"prompt": "p", "chosen": "a", "rejected": "b", "messages": conv("p", "a")},
     "unknown field(s) ['messages'] (a DPO row holds 'prompt', 'chosen' and 'rejected', optionally with 'system')"),
    ("dpo", {"system": SYSTEM, "prompt": conv("p", "x", "Other")[:1] + [{"role": "user", "content": "p"}],
             "chosen": "a", "rejected": "b"},
     "two system prompts: the row's 'system' field and prompt[0]; keep one"),
]


@pytest.mark.parametrize("kind, row, reason", UNKNOWN_KEY_ROWS)
def test_unknown_row_keys_and_bad_shapes_are_named_with_file_and_line(tmp_path, kind, row, reason):
    good = {"messages": conv("ok", "fine")} if kind == "sft" else {"prompt": "ok", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, row])
    load = load_sft_dataset if kind == "sft" else load_dpo_dataset
    with pytest.raises(DataError) as info:
        load(DataConfig(train=[SourceConfig(str(path))]), get_encoder("v3"))
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{path}:2: {reason}"), info.value.problems[0]


# -- a lone surrogate ("\ud800" in JSON) is a bad row, not a crash in the tokenizer -------------

SURROGATE_ROWS = {
    "sft": [
        ('{"messages": [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "ok"}]}',
         "messages[0].content: not valid Unicode: a lone surrogate \\ud800 at character 3"),
        ('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "\\udfff"}]}',
         "conversations[1].value: not valid Unicode: a lone surrogate \\udfff at character 0"),
        ('{"prompt": "\\ud83d", "completion": "ok"}', "prompt: not valid Unicode"),
        ('{"system": "\\ud800", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
         "system: not valid Unicode"),
    ],
    "dpo": [
        ('{"prompt": "hi \\ud800", "chosen": "a", "rejected": "b"}', "prompt: not valid Unicode"),
        ('{"prompt": "hi", "chosen": "a \\ud800", "rejected": "b"}', "chosen: not valid Unicode"),
        ('{"prompt": [{"role": "user", "content": "\\udc00"}], "chosen": "a", "rejected": "b"}',
         "prompt[0].content: not valid Unicode"),
    ],
}


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_a_lone_surrogate_is_a_bad_row_named_with_file_line_and_field(tmp_path, kind, suffix):
    good = '{"messages": [{"role": "user", "content": "a \\ud83d\\ude00"}, {"role": "assistant", "content": "b"}]}' \
        if kind == "sft" else '{"prompt": "\\ud83d\\ude00 pair is fine", "chosen": "a", "rejected": "b"}'
    rows = [good] + [text for text, _ in SURROGATE_ROWS[kind]]
    path = tmp_path / f"s.{suffix}"
    path.write_text("\n".join(rows) + "\n" if suffix == "jsonl" else "[" + ",\n".join(rows) + "]")
    load = load_sft_dataset if kind == "sft" else load_dpo_dataset
    with pytest.raises(DataError) as info:
        load(DataConfig(train=[SourceConfig(str(path))]), get_encoder("v3"))
    assert [p.split(": ", 1)[0] for p in info.value.problems] == [f"{path}:{i}" for i in range(2, len(rows) + 1)]
    for problem, (_, reason) in zip(info.value.problems, SURROGATE_ROWS[kind]):
        assert problem.split(": ", 1)[1].startswith(reason), problem
    # on_bad_rows=skip drops them and trains on the rest.
    data = load(DataConfig(train=[SourceConfig(str(path))], on_bad_rows="skip"), get_encoder("v3"))
    assert len(data.train) == 1 and data.report["skipped_by_reason"] == {"invalid Unicode": len(rows) - 1}


# -- a source's extra columns can be dropped by name --------------------------------------------


def test_ignore_fields_drops_a_sources_extra_columns_by_name(tmp_path):
    extra = {"score": 7.5, "source": "forum", "id": "r1"}
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", **extra}, {"prompt": "q", "chosen": "c", "rejected": "d"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_dpo_dataset(DataConfig(train=[SourceConfig(str(path))]), get_encoder("v3"))
    assert info.value.problems[0].startswith(f"{path}:1: unknown field(s) ['source']")
    assert "'score' is not read here: it is a rating of the reply" in info.value.problems[0]
    assert "ignore_fields" in info.value.problems[0]
    kept = load_dpo_dataset(DataConfig(train=[SourceConfig(str(path), ignore_fields=["score", "source"])]),
                            get_encoder("v3"))  # fmt: skip
    clean = write_jsonl(tmp_path / "clean.jsonl", [{k: v for k, v in r.items() if k in ("prompt", "chosen", "rejected")}
                                                   for r in rows])  # fmt: skip
    want = load_dpo_dataset(DataConfig(train=[SourceConfig(str(clean))]), get_encoder("v3"))
    assert kept.train.to_list() == want.train.to_list() and len(kept.train) == 2
    # What is dropped is part of what was read: the encoded-data cache tells the two apart.
    assert read_source(SourceConfig(str(path), ignore_fields=["score", "source"])).content_hash != read_source(
        SourceConfig(str(path))).content_hash
