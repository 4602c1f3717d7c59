"""Training loaders: ids, mixtures, eval split, bad and long rows, num_proc, fingerprint, cache."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import datasets
import pytest

from mistral_align.chat.encoder import IGNORE_INDEX, get_encoder
from mistral_align.chat.schema import parse_preference, parse_sft_messages
from mistral_align.data.load import DataError, load_dpo_dataset, load_sft_dataset
from mistral_align.data.packing import packing_efficiency
from mistral_align.errors import ConfigError
from mistral_align.schema.data import DataConfig, SFTDataConfig, SourceConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture(scope="module")
def v3():
    return get_encoder("v3")


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return str(path)


def sft_row(i, words=3):
    return {
        "messages": [
            {"role": "user", "content": f"question {i}"},
            {"role": "assistant", "content": " ".join(f"answer{i}" for _ in range(words))},
        ]
    }


def sft_cfg(*paths, **kw):
    return SFTDataConfig(train=[SourceConfig(p) for p in paths], **kw)


def tag_of(ids, enc):
    """The row number i that sft_row(i) wrote, read back from its ids."""
    return int(enc.raw.decode(ids).split("question ")[1].split()[0].split("[")[0])


def test_sft_ids_and_report_match_the_encoder(v3):
    path = str(EXAMPLES / "sft_example.jsonl")
    data = load_sft_dataset(sft_cfg(path), v3)
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert len(data.train) == len(rows) and data.eval is None
    want = [v3.encode_sft(parse_sft_messages(r["messages"])) for r in rows]
    assert data.train["input_ids"] == [w.input_ids for w in want]
    assert data.train["labels"] == [w.labels for w in want]
    r = data.report
    assert r["rows_read"] == r["rows_kept"] == 10 and r["skipped_rows"] == 0
    assert r["tokens"] == sum(len(w.input_ids) for w in want)
    assert r["trained_tokens"] == sum(sum(t != IGNORE_INDEX for t in w.labels) for w in want)
    assert r["packing_efficiency"] == pytest.approx(packing_efficiency([len(w.input_ids) for w in want], 2048))
    # The weight-0 reply in the examples is context only.
    reply = [*v3.text("It is 124."), v3.eos_id]
    ids, labels = data.train[5]["input_ids"], data.train[5]["labels"]
    at = next(i for i in range(len(ids)) if ids[i : i + len(reply)] == reply)
    assert labels[at : at + len(reply)] == [IGNORE_INDEX] * len(reply)
    assert labels[-1] == v3.eos_id  # the later reply is trained


def test_train_on_last_masks_earlier_replies(v3):
    path = str(EXAMPLES / "sft_example.jsonl")
    all_ = load_sft_dataset(sft_cfg(path), v3).report["trained_tokens"]
    last = load_sft_dataset(sft_cfg(path, train_on="last"), v3).report["trained_tokens"]
    assert last < all_


def test_dpo_ids_match_the_encoder(v3):
    path = str(EXAMPLES / "dpo_example.jsonl")
    data = load_dpo_dataset(DataConfig(train=[SourceConfig(path)]), v3)
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    for got, row in zip(data.train, rows, strict=True):
        want = v3.encode_dpo(parse_preference(row))
        assert (got["prompt_ids"], got["chosen_ids"], got["rejected_ids"]) == (
            want.prompt_ids,
            want.chosen_ids,
            want.rejected_ids,
        )
    assert data.report["packing_efficiency"] is None


# -- mixtures -----------------------------------------------------------------------------------


@pytest.fixture
def two_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [sft_row(i) for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [sft_row(100 + i) for i in range(20)])
    return a, b


def test_fraction_and_absolute_weights(v3, two_sources):
    a, b = two_sources
    cfg = DataConfig(train=[SourceConfig(a, weight=0.5), SourceConfig(b, weight=3)], seed=1)
    data = load_sft_dataset(cfg, v3)
    tags = [tag_of(ids, v3) for ids in data.train["input_ids"]]
    from_a, from_b = [t for t in tags if t < 100], [t for t in tags if t >= 100]
    assert len(from_a) == 5 and len(from_b) == 3
    assert from_a == sorted(from_a) and len(set(from_a)) == 5  # file order, no repeats
    assert [s["rows_kept"] for s in data.report["sources"]] == [5, 3]
    # Same seed, same rows; another seed, (almost surely) other rows.
    assert load_sft_dataset(cfg, v3).train["input_ids"] == data.train["input_ids"]
    cfg.seed = 2
    assert load_sft_dataset(cfg, v3).train["input_ids"] != data.train["input_ids"]


def test_count_above_source_size_repeats_rows(v3, two_sources):
    a, _ = two_sources
    data = load_sft_dataset(DataConfig(train=[SourceConfig(a, weight=25)]), v3)
    counts = Counter(tag_of(ids, v3) for ids in data.train["input_ids"])
    assert len(data.train) == 25 and set(counts) == set(range(10))
    assert sorted(counts.values()) == [2] * 5 + [3] * 5


def test_weight_zero_drops_a_source(v3, two_sources):
    a, b = two_sources
    data = load_sft_dataset(DataConfig(train=[SourceConfig(a, weight=0), SourceConfig(b)]), v3)
    assert len(data.train) == 20 and all(tag_of(ids, v3) >= 100 for ids in data.train["input_ids"])


def test_negative_weight_is_refused(v3, two_sources):
    with pytest.raises(ConfigError, match=r"data.train\[0\].weight: must be >= 0"):
        load_sft_dataset(DataConfig(train=[SourceConfig(two_sources[0], weight=-1)]), v3)


# -- eval ---------------------------------------------------------------------------------------


def test_eval_sources(v3, two_sources):
    a, b = two_sources
    data = load_sft_dataset(DataConfig(train=[SourceConfig(a)], eval=[SourceConfig(b, weight=0.25)]), v3)
    assert len(data.train) == 10 and len(data.eval) == 5
    assert all(tag_of(ids, v3) >= 100 for ids in data.eval["input_ids"])
    assert data.report["eval"]["rows"] == 5 and data.report["eval_sources"][0]["rows_kept"] == 5


def test_eval_fraction_holds_rows_out(v3, two_sources):
    a, b = two_sources
    data = load_sft_dataset(DataConfig(train=[SourceConfig(a), SourceConfig(b)], eval_fraction=0.2, seed=3), v3)
    assert (len(data.train), len(data.eval)) == (24, 6)
    train_tags = {tag_of(ids, v3) for ids in data.train["input_ids"]}
    eval_tags = {tag_of(ids, v3) for ids in data.eval["input_ids"]}
    assert not train_tags & eval_tags and len(train_tags | eval_tags) == 30
    again = load_sft_dataset(DataConfig(train=[SourceConfig(a), SourceConfig(b)], eval_fraction=0.2, seed=3), v3)
    assert again.eval["input_ids"] == data.eval["input_ids"]


def test_eval_fraction_of_small_data_holds_out_one_row_and_says_so(v3, tmp_path, caplog):
    """10 rows at the default 2% used to stop the run ("leaves 0 eval rows"): the README's own
    example files could not train. Now at least one row (and never all) is held out, with a note."""
    path = write_jsonl(tmp_path / "ten.jsonl", [sft_row(i) for i in range(10)])
    with caplog.at_level(logging.INFO, logger="mistral_align.data.load"):
        data = load_sft_dataset(sft_cfg(path, eval_fraction=0.02), v3)
    assert (len(data.train), len(data.eval)) == (9, 1)
    assert data.report["eval"]["rows"] == 1
    notes = [r.getMessage() for r in caplog.records if "eval_fraction" in r.getMessage()]
    assert notes == ["SFT data: sft.data.eval_fraction=0.02 of 10 training row(s) is 0.2 rows: holding out 1 "
                     "row(s) for evaluation (list sft.data.eval sources to choose them)"]
    two = write_jsonl(tmp_path / "two.jsonl", [sft_row(0), sft_row(1)])
    data = load_sft_dataset(sft_cfg(two, eval_fraction=0.9), v3)  # 1.8 rounds to 2: one is kept to train on
    assert (len(data.train), len(data.eval)) == (1, 1)
    one = write_jsonl(tmp_path / "one.jsonl", [sft_row(0)])
    data = load_sft_dataset(sft_cfg(one, eval_fraction=0.5), v3)  # nothing to spare: no eval split
    assert len(data.train) == 1 and data.eval is None
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mistral_align.data.load"):
        data = load_sft_dataset(sft_cfg(path, eval_fraction=0.2), v3)  # exact: no note
    assert (len(data.train), len(data.eval)) == (8, 2) and not caplog.records


def test_an_empty_file_is_named_as_having_no_rows(v3, tmp_path):
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.json", "[]")):
        path = tmp_path / name
        path.write_text(text)
        for load in (load_sft_dataset, load_dpo_dataset):  # DPO used to say "eval_fraction=0.05 of 0 rows"
            with pytest.raises(DataError) as info:
                load(DataConfig(train=[SourceConfig(str(path))], eval_fraction=0.05), v3)
            assert str(info.value) == f"{path}: has no rows"


# -- bad rows -----------------------------------------------------------------------------------


BAD_ROWS = [
    sft_row(0),
    "{not json",
    {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
    sft_row(1),
    {"messages": [{"role": "user", "content": "q"}]},
]


def test_bad_rows_error_names_every_row(v3, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    with pytest.raises(DataError) as info:
        load_sft_dataset(sft_cfg(path), v3)
    lines = str(info.value).splitlines()
    assert lines[0].startswith("3 bad row(s) in the SFT data")
    assert lines[1:] == [
        f"{path}:2: invalid JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{path}:3: messages[0]: unknown role 'robot' (expected one of system, user, assistant)",
        f"{path}:5: messages: ends with a user turn; the last message must be an assistant reply",
    ]
    assert info.value.problems == lines[1:]


def test_many_bad_rows_are_capped_in_the_message(v3, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [sft_row(0)] + ["[]"] * 30)
    with pytest.raises(DataError) as info:
        load_sft_dataset(sft_cfg(path), v3)
    lines = str(info.value).splitlines()
    assert len(lines) == 1 + 20 + 1 and lines[-1] == "... and 10 more"
    assert lines[1] == f"{path}:2: expected a JSON object with 'messages', got list"
    assert len(info.value.problems) == 30


def test_skip_drops_and_reports_bad_rows(v3, tmp_path, caplog):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    with caplog.at_level(logging.WARNING, logger="mistral_align.data.load"):
        data = load_sft_dataset(sft_cfg(path, on_bad_rows="skip"), v3)
    assert [tag_of(ids, v3) for ids in data.train["input_ids"]] == [0, 1]
    r = data.report
    assert r["rows_read"] == 5 and r["rows_kept"] == 2 and r["bad_rows"] == 3
    assert r["skipped_by_reason"] == {"invalid JSON": 1, "unknown role": 1, "ends with a user turn": 1}
    assert r["skipped_examples"][0].startswith(f"{path}:2: invalid JSON")
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 3 of 5 rows" in warnings[0] and "\n" not in warnings[0]


def test_dpo_bad_rows(v3, tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "p", "chosen": "a"},
            {"prompt": "p", "chosen": "a", "rejected": "b"},
        ],
    )
    with pytest.raises(DataError) as info:
        load_dpo_dataset(DataConfig(train=[SourceConfig(path)]), v3)
    assert info.value.problems == [
        f"{path}:1: chosen and rejected are the same reply",
        f"{path}:2: missing field 'rejected'",
    ]


def test_nothing_left_is_an_error(v3, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["[]", "{}"])
    with pytest.raises(DataError, match="no SFT training rows left"):
        load_sft_dataset(sft_cfg(path, on_bad_rows="skip"), v3)


# -- long rows ----------------------------------------------------------------------------------


@pytest.fixture
def long_file(tmp_path):
    return write_jsonl(tmp_path / "long.jsonl", [sft_row(0), sft_row(1, words=60), sft_row(2)])


def test_long_rows_are_skipped_and_counted_by_default(v3, long_file):
    data = load_sft_dataset(sft_cfg(long_file, max_length=40), v3)
    assert [tag_of(ids, v3) for ids in data.train["input_ids"]] == [0, 2]
    assert data.report["over_length_rows"] == 1 and data.report["skipped_by_reason"] == {"over length": 1}
    assert data.report["skipped_examples"][0].startswith(f"{long_file}:2: ")
    assert "over max_length 40" in data.report["skipped_examples"][0]


def test_long_rows_error(v3, long_file):
    with pytest.raises(DataError, match=r"long\.jsonl:2: \d+ tokens, over max_length 40") as info:
        load_sft_dataset(sft_cfg(long_file, max_length=40, on_long_rows="error"), v3)
    assert "raise sft.data.max_length" in str(info.value)


def test_long_rows_truncate_keeps_bos(v3, long_file):
    data = load_sft_dataset(sft_cfg(long_file, max_length=40, on_long_rows="truncate"), v3)
    ids, labels = data.train[1]["input_ids"], data.train[1]["labels"]
    full = v3.encode_sft(parse_sft_messages(sft_row(1, words=60)["messages"]))
    assert len(ids) == 40 and ids == full.input_ids[:40] and labels == full.labels[:40]
    assert ids[0] == v3.bos_id and ids.count(v3.bos_id) == 1
    assert data.report["truncated_rows"] == 1 and data.report["over_length_rows"] == 0


def test_dpo_refuses_truncation(v3):
    cfg = DataConfig(train=[SourceConfig(str(EXAMPLES / "dpo_example.jsonl"))], on_long_rows="truncate")
    with pytest.raises(ConfigError, match="SFT only"):
        load_dpo_dataset(cfg, v3)


def test_dpo_long_rows_count_prompt_plus_longest_reply(v3, tmp_path):
    long_reply = " ".join(["word"] * 50)
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": "p", "chosen": "short", "rejected": long_reply}, {"prompt": "p", "chosen": "a", "rejected": "b"}],
    )
    data = load_dpo_dataset(DataConfig(train=[SourceConfig(path)], max_length=30), v3)
    assert len(data.train) == 1 and data.report["over_length_rows"] == 1


# -- processes, fingerprint, cache --------------------------------------------------------------


def test_num_proc_2_gives_identical_ids(v3, tmp_path):
    rows = [sft_row(i, words=1 + i % 7) for i in range(300)]
    rows[17] = "{bad"
    path = write_jsonl(tmp_path / "many.jsonl", rows)
    one = load_sft_dataset(sft_cfg(path, num_proc=1, on_bad_rows="skip", eval_fraction=0.1), v3)
    two = load_sft_dataset(sft_cfg(path, num_proc=2, on_bad_rows="skip", eval_fraction=0.1), v3)
    assert one.train["input_ids"] == two.train["input_ids"] and one.train["labels"] == two.train["labels"]
    assert one.eval["input_ids"] == two.eval["input_ids"]
    assert one.problems == two.problems == [f"{path}:18: invalid JSON (Expecting property name enclosed in double quotes at column 2)"]
    assert one.fingerprint == two.fingerprint


def test_fingerprint_follows_content_and_settings(v3, tmp_path):
    rows = [sft_row(i) for i in range(5)]
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    same = write_jsonl(tmp_path / "copy.jsonl", rows)
    other = write_jsonl(tmp_path / "b.jsonl", rows[:4])
    base = load_sft_dataset(sft_cfg(a), v3).fingerprint
    assert len(base) == 64
    assert load_sft_dataset(sft_cfg(same), v3).fingerprint == base
    assert load_sft_dataset(sft_cfg(other), v3).fingerprint != base
    assert load_sft_dataset(sft_cfg(a, max_length=100), v3).fingerprint != base
    assert load_sft_dataset(sft_cfg(a, train_on="last"), v3).fingerprint != base
    assert load_sft_dataset(sft_cfg(a), get_encoder("v7")).fingerprint != base


def test_encoded_sources_are_cached_and_invalidated(v3, tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, [sft_row(i) for i in range(5)])
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "mistral_align"
    first = load_sft_dataset(sft_cfg(str(path)), v3)
    files = set(cache.glob("encoded-*.arrow"))
    assert len(files) == 1
    again = load_sft_dataset(sft_cfg(str(path)), v3)
    assert set(cache.glob("encoded-*.arrow")) == files and again.train["input_ids"] == first.train["input_ids"]
    write_jsonl(path, [sft_row(i) for i in range(6)])
    changed = load_sft_dataset(sft_cfg(str(path)), v3)
    assert len(changed.train) == 6 and len(set(cache.glob("encoded-*.arrow"))) == 2


def test_no_cache_files_when_caching_is_disabled(v3, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [sft_row(i) for i in range(5)])
    datasets.disable_caching()
    try:
        load_sft_dataset(sft_cfg(path), v3)
    finally:
        datasets.enable_caching()
    assert not list((Path(datasets.config.HF_DATASETS_CACHE) / "mistral_align").glob("encoded-*"))
