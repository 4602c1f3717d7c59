"""Tool rows in the training loaders: `<stage>.data.tool_call_ids` and `sft.data.train_thinking` as
typed, checked config keys that reach the encoder, change the encoded-data cache key and the data
fingerprint, and make a resume with another value refused; the data report counts tool rows,
thinking rows and what the version's encoding leaves out."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from tool_rows import CITIES, dpo_row, sft_row, two_turn_row, write_jsonl

from mistral_align.chat.encoder import IGNORE_INDEX, get_encoder
from mistral_align.data.encode import check_row
from mistral_align.data.load import DataError, load_dpo_dataset, load_sft_dataset
from mistral_align.errors import ConfigError, RunDirError
from mistral_align.schema.data import DataConfig, SFTDataConfig, SourceConfig, check_data_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def sft_cfg(path, **kw):
    return SFTDataConfig(train=[SourceConfig(str(path))], **kw)


def test_defaults_keep_ids_and_train_thinking():
    assert SFTDataConfig().tool_call_ids == DataConfig().tool_call_ids == "keep"
    assert SFTDataConfig().train_thinking is True and not hasattr(DataConfig(), "train_thinking")


def test_bad_values_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"^sft.data.tool_call_ids: 'renumber' is not one of keep, regenerate$"):
        check_data_config(sft_cfg("a.jsonl", tool_call_ids="renumber"), "sft", "sft.data")
    with pytest.raises(ConfigError, match=r"^dpo.data.tool_call_ids: 'Keep' is not one of keep, regenerate$"):
        check_data_config(DataConfig(train=[SourceConfig("a.jsonl")], tool_call_ids="Keep"), "dpo", "dpo.data")
    with pytest.raises(ConfigError, match=r"^sft.data.train_thinking: must be true or false, got 'no'$"):
        check_data_config(sft_cfg("a.jsonl", train_thinking="no"), "sft", "sft.data")


def test_the_keys_are_typed_in_every_recipe_and_composed():
    from hydra import compose, initialize_config_dir

    from mistral_align.schema.recipe import check_config, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("sft_dpo", overrides=["experiment=test_tiny", "sft.data.tool_call_ids=regenerate",
                                            "sft.data.train_thinking=false", "dpo.data.tool_call_ids=regenerate"])
        assert (cfg.sft.data.tool_call_ids, cfg.sft.data.train_thinking, cfg.dpo.data.tool_call_ids) == \
            ("regenerate", False, "regenerate")
        check_config(cfg)
        with pytest.raises(Exception, match="train_thinking"):  # DPO replies are compared whole: no such key
            compose("dpo", overrides=["dpo.data.train_thinking=false"])
        cfg.dpo.data.tool_call_ids = "drop"
        with pytest.raises(ConfigError, match=r"^dpo.data.tool_call_ids: 'drop' is not one of keep, regenerate$"):
            check_config(cfg)


def test_tool_call_ids_reach_the_encoder(tmp_path):
    enc = get_encoder("v3")
    rows = [sft_row(c) for c in CITIES]
    path = write_jsonl(tmp_path / "tools.jsonl", rows)
    # keep (the default): OpenAI-style ids are not v3's 9 characters, so every row is bad, by line.
    with pytest.raises(DataError) as e:
        load_sft_dataset(sft_cfg(path), enc)
    assert e.value.problems == [f"{path}:{i}: messages[1].tool_calls[0]: id 'call_0001' is not a valid tool call id "
                                "for tokenizer v3: it must be exactly 9 letters or digits (tool_call_ids: regenerate "
                                "replaces a row's ids)" for i in range(1, 6)]
    data = load_sft_dataset(sft_cfg(path, tool_call_ids="regenerate"), enc)
    expected = [check_row("sft", json.dumps(r, ensure_ascii=False), enc, tool_call_ids="regenerate").ids for r in rows]
    assert [{"input_ids": a, "labels": b} for a, b in zip(data.train["input_ids"], data.train["labels"])] == expected
    assert all(enc.raw.get_special_token("[TOOL_CALLS]") in ids for ids in data.train["labels"])  # calls trained
    dpo_path = write_jsonl(tmp_path / "pairs.jsonl", [dpo_row("Paris", "Rome"), dpo_row("Oslo", "Lima")])
    pairs = load_dpo_dataset(DataConfig(train=[SourceConfig(str(dpo_path))], tool_call_ids="regenerate"), enc)
    assert pairs.train["chosen_ids"][0] == check_row("dpo", json.dumps(dpo_row("Paris", "Rome")), enc,
                                                     tool_call_ids="regenerate").ids["chosen_ids"]


def test_train_thinking_false_masks_the_thinking_of_trained_replies(tmp_path):
    enc = get_encoder("v13")
    path = write_jsonl(tmp_path / "think.jsonl", [sft_row(c, thinking=True) for c in CITIES[:2]])
    trained = load_sft_dataset(sft_cfg(path), enc)
    masked = load_sft_dataset(sft_cfg(path, train_thinking=False), enc)
    think = enc.raw.get_special_token("[THINK]")
    assert trained.train["input_ids"] == masked.train["input_ids"]
    for a, b in zip(trained.train["labels"], masked.train["labels"]):
        assert think in a and think not in b
        span = a[a.index(think): a.index(enc.raw.get_special_token("[/THINK]")) + 1]
        assert sum(x != IGNORE_INDEX for x in a) - sum(x != IGNORE_INDEX for x in b) == len(span)
    assert masked.report["thinking_rows"] == 2 and masked.report["tool_rows"] == 2


def test_the_report_counts_tool_rows_and_what_v2_leaves_out(tmp_path):
    rows = [two_turn_row("Paris"), sft_row("Rome"), {"messages": [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": "hello"}]}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    data = load_sft_dataset(sft_cfg(path), get_encoder("v2"))  # v2 accepts any non-empty id
    r = data.report
    # Row 1's call and result come before its last user message: v2 encodes them as nothing.
    assert (r["tool_rows"], r["thinking_rows"], r["dropped_tool_calls"], r["dropped_tool_results"]) == (2, 0, 1, 1)
    assert r["train"]["dropped_tool_calls"] == 1
    assert load_sft_dataset(sft_cfg(path, tool_call_ids="regenerate"), get_encoder("v3")).report["dropped_tool_calls"] == 0


def test_cache_key_and_fingerprint_follow_the_tool_settings(tmp_path):
    enc = get_encoder("v13")
    path = write_jsonl(tmp_path / "think.jsonl", [sft_row(c, thinking=True) for c in CITIES])
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "mistral_align"
    base = load_sft_dataset(sft_cfg(path), enc)
    seen = {base.fingerprint}
    for kw in ({"train_thinking": False}, {"tool_call_ids": "regenerate"}):
        seen.add(load_sft_dataset(sft_cfg(path, **kw), enc).fingerprint)
    assert len(seen) == 3 and len(set(cache.glob("encoded-*.arrow"))) == 3  # one cached encoding each
    assert load_sft_dataset(sft_cfg(path), enc).fingerprint == base.fingerprint


def test_a_resume_with_another_tool_setting_is_refused(tmp_path):
    from hydra import compose, initialize_config_dir

    from mistral_align.rundir.drift import check_same_training
    from mistral_align.rundir.layout import write_resolved_config
    from mistral_align.schema.recipe import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        first = compose("sft_dpo", overrides=["experiment=test_tiny"])
        write_resolved_config(tmp_path, first, ("sft", "dpo"))
        for stage in ("sft", "dpo"):  # both stages kept something trained (rundir/drift.py stages_started)
            (tmp_path / stage / "adapter").mkdir(parents=True)
        for override, shown in (("sft.data.tool_call_ids=regenerate", "sft.data.tool_call_ids: 'keep' -> 'regenerate'"),
                                ("dpo.data.tool_call_ids=regenerate", "dpo.data.tool_call_ids: 'keep' -> 'regenerate'"),
                                ("sft.data.train_thinking=false", "sft.data.train_thinking: True -> False"),
                                ("model.tokenizer_file=/x/tekken.json", "model.tokenizer_file: None -> '/x/tekken.json'")):
            changed = compose("sft_dpo", overrides=["experiment=test_tiny", override])
            with pytest.raises(RunDirError, match=shown):
                check_same_training(tmp_path, changed, ("sft", "dpo"), "sft_dpo")
