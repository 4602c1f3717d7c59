"""The tokenizer versions mistral-common encodes but ships no file for (v7-tekken, v11, v13).

Their tekken files are made from the shipped Nemo file (`chat/tekken_files.py`); exactness of
ids and masks against mistral-common is proven with every other version in test_chat_exact.py.
Here: the made files are what they claim to be, and the CLI serves the new versions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import pytest

from mistral_align.chat.encoder import (
    IGNORE_INDEX,
    TOKENIZER_VERSIONS,
    get_encoder,
    load_mistral_tokenizer,
    tokenizer_file,
)
from mistral_align.chat.schema import parse_preference, parse_sft_messages
from mistral_align.chat.tekken_files import DERIVED_VERSIONS, derived_tekken_file, special_tokens
from mistral_align.entry.cli import main
from mistral_align.names import DERIVED_TOKENIZER_VERSIONS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "data"
SFT, DPO = (str(EXAMPLES / f) for f in ("sft_example.jsonl", "dpo_example.jsonl"))

INSTRUCT_CLASS = {"v7-tekken": "InstructTokenizerV7", "v11": "InstructTokenizerV11", "v13": "InstructTokenizerV13"}
# Ranks as in mistral-common's own test files for these versions (tests/test_tekken.py).
EXTRA_TOKENS = {
    "v7-tekken": {},
    "v11": {"[ARGS]": 32, "[CALL_ID]": 33},
    "v13": {"[ARGS]": 32, "[CALL_ID]": 33, "[THINK]": 34, "[/THINK]": 35},
}
COMMON_TOKENS = {"<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4, "<pad>": 11, "[SYSTEM_PROMPT]": 17,
                 "[/SYSTEM_PROMPT]": 18}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_the_new_versions_are_offered():
    assert set(DERIVED_TOKENIZER_VERSIONS) == set(DERIVED_VERSIONS) == {"v7-tekken", "v11", "v13"}
    assert set(DERIVED_TOKENIZER_VERSIONS) <= set(TOKENIZER_VERSIONS)


@pytest.mark.parametrize("version", DERIVED_TOKENIZER_VERSIONS)
def test_made_file_is_the_version_mistral_common_encodes(version):
    mistral = load_mistral_tokenizer(version)
    it = mistral.instruct_tokenizer
    raw = it.tokenizer
    assert type(it).__name__ == INSTRUCT_CLASS[version]
    assert raw.version.value == DERIVED_VERSIONS[version][0]
    assert type(raw).__name__ == "Tekkenizer" and raw.n_words == 131072 and raw.num_special_tokens == 1000
    for name, rank in {**COMMON_TOKENS, **EXTRA_TOKENS[version]}.items():
        assert raw.get_special_token(name) == rank, name
    absent = {"[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]"} - set(EXTRA_TOKENS[version])
    for name in absent:
        with pytest.raises(Exception):
            raw.get_special_token(name)
    assert [t["rank"] for t in special_tokens(version)] == list(range(len(special_tokens(version))))


@pytest.mark.parametrize("version", DERIVED_TOKENIZER_VERSIONS)
def test_made_file_keeps_the_nemo_vocabulary(version):
    ours = get_encoder(version).raw
    nemo = get_encoder("v3-tekken").raw
    assert ours._tekken_token2id_nospecial == nemo._tekken_token2id_nospecial
    text = "Hello  world\n\n你好 🎉 [INST] </s> [THINK]"
    assert ours.encode(text, bos=False, eos=False) == nemo.encode(text, bos=False, eos=False)


def test_made_file_is_cached_and_follows_the_cache_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("MISTRAL_ALIGN_CACHE", str(tmp_path / "cache"))
    first = derived_tekken_file("v11")
    assert first.parent == tmp_path / "cache" / "tokenizers" and first.is_file()
    stamp = first.stat().st_mtime_ns
    assert derived_tekken_file("v11") == first and first.stat().st_mtime_ns == stamp  # not rewritten
    assert tokenizer_file("v11") == first
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # no temporary left behind
    with pytest.raises(ValueError, match="unknown tokenizer version"):
        tokenizer_file("v15")


def test_unwritable_cache_falls_back_to_the_temp_directory(tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")  # a file where the cache folder should be: mkdir fails even for root
    monkeypatch.setenv("MISTRAL_ALIGN_CACHE", str(blocker))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path = derived_tekken_file("v7-tekken")
    assert path.parent == tmp_path / "tmp" / f"mistral_align-{os.getuid()}" / "tokenizers" and path.is_file()
    assert derived_tekken_file("v7-tekken") == path


# -- CLI ------------------------------------------------------------------------------------------


def rows_of(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("version", DERIVED_TOKENIZER_VERSIONS)
def test_validate_json_report(version, capsys):
    assert main(["validate", "--kind", "sft", "--data", SFT, "--json", "--tokenizer", version]) == 0
    g = json.loads(capsys.readouterr().out)
    enc = get_encoder(version)
    encs = [enc.encode_sft(parse_sft_messages(r["messages"])) for r in rows_of(SFT)]
    assert g["valid"] is True and g["rows"] == len(encs) and g["tokenizer"] == version
    assert g["tokens"] == sum(len(e.input_ids) for e in encs)
    assert g["trained_tokens"] == sum(sum(t != IGNORE_INDEX for t in e.labels) for e in encs)
    assert main(["validate", "--kind", "dpo", "--data", DPO, "--tokenizer", version]) == 0


@pytest.mark.parametrize("version", DERIVED_TOKENIZER_VERSIONS)
def test_preview_jsonl_equals_mistral_common_for_dpo(version, capsys):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    tok = load_mistral_tokenizer(version)
    assert main(["preview", "--tokenizer", version, "--kind", "dpo", "--data", DPO, "--jsonl"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    enc = get_encoder(version)
    for out, row in zip(got, rows_of(DPO), strict=True):
        pair = parse_preference(row)
        for side, reply in (("chosen_ids", pair.chosen), ("rejected_ids", pair.rejected)):
            msgs = [kinds[m.role](content=m.content) for m in (*pair.prompt, reply)]
            assert out["prompt_ids"] + out[side] == tok.encode_chat_completion(ChatCompletionRequest(messages=msgs)).tokens
        assert out["prompt_ids"] == enc.encode_prompt(pair.prompt)


def test_preview_shows_the_system_block(tmp_path, capsys):
    data = tmp_path / "one.jsonl"
    row = {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "[THINK] hi"},
                        {"role": "assistant", "content": "Hello"}]}
    data.write_text(json.dumps(row) + "\n")
    assert main(["preview", "--tokenizer", "v13", "--kind", "sft", "--data", str(data), "--color", "never"]) == 0
    body = capsys.readouterr().out.splitlines()[1]
    assert body.startswith("<s> [SYSTEM_PROMPT] Be") and "[/SYSTEM_PROMPT] [INST]" in body
    assert body.endswith("{+Hello </s>+}")
    # A typed "[THINK]" is text: the real control token (id 34) is not in the ids.
    ids = get_encoder("v13").encode_sft(parse_sft_messages(row["messages"])).input_ids
    assert 34 not in ids and ids.count(get_encoder("v13").begin_system) == 1
