"""`mistral-align validate` and `preview`: the contracts in DESIGN.md, through the CLI's `main` (one test runs
the console script itself, as a user does)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from mistral_align.chat.encoder import IGNORE_INDEX, TOKENIZER_VERSIONS, get_encoder, load_mistral_tokenizer
from mistral_align.chat.schema import parse_preference, parse_sft_messages
from mistral_align.entry.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "data"
SFT, DPO, BROKEN = (str(EXAMPLES / f) for f in ("sft_example.jsonl", "dpo_example.jsonl", "sft_broken.jsonl"))
EXE = str(Path(sys.executable).with_name("mistral-align"))

BROKEN_LINES = [
    f"{BROKEN}:2: invalid JSON (Expecting ',' delimiter at column 58)",
    f"{BROKEN}:3: missing field 'messages' (an SFT row holds 'messages', 'conversations' (ShareGPT), 'prompt' "
    "and 'completion', or 'instruction', 'input' and 'output' (Alpaca); found ['conversation'])",
    f"{BROKEN}:4: messages[0]: unknown role 'human' (expected one of system, user, assistant)",
    f"{BROKEN}:5: messages[0]: wrong role order: expected user, got assistant "
    "(roles must alternate user/assistant, starting with user)",
    f"{BROKEN}:6: messages[1]: empty assistant content",
    f"{BROKEN}:7: messages: ends with a user turn; the last message must be an assistant reply",
    f"{BROKEN}:8: messages[0]: 'content' must be a string, got int",
]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run(*args):
    """The console script itself, as a user runs it (one test; the rest call `main` in this process)."""
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=120, env=os.environ.copy())


def cli(capsys, *args) -> tuple[int, str, str]:
    """`mistral-align ARGS` in this process: exit code, stdout, stderr."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def rows_of(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# -- validate ------------------------------------------------------------------------------------


def test_validate_good_file_exits_0(capsys):
    code, out, err = cli(capsys, "validate", "--kind", "sft", "--data", SFT)
    assert code == 0, err
    assert "10 rows, 10 valid, 0 bad" in out and "packing efficiency" in out
    assert "Traceback" not in err


def test_validate_json_on_broken_file_exits_1(capsys):
    code, out, _ = cli(capsys, "validate", "--kind", "sft", "--data", BROKEN, "--json")
    assert code == 1
    b = json.loads(out)  # the whole stdout is one JSON object
    assert b["valid"] is False and (b["rows"], b["valid_rows"]) == (9, 2)
    assert [f"{x['where']}: {x['reason']}" for x in b["bad_rows"]] == BROKEN_LINES
    assert [x["line"] for x in b["bad_rows"]] == [2, 3, 4, 5, 6, 7, 8]


def test_validate_missing_file_is_a_clear_error(tmp_path, capsys):
    code, out, err = cli(capsys, "validate", "--kind", "sft", "--data", str(tmp_path / "nope.jsonl"))
    assert code == 2
    assert err.strip() == f"mistral-align validate: error: {tmp_path / 'nope.jsonl'}: no such file"
    assert out == ""


def test_validate_and_preview_name_a_directory_as_one(tmp_path, capsys):
    for args in (["validate", "--kind", "sft"], ["preview", "--tokenizer", "v3", "--kind", "dpo"]):
        assert main([*args, "--data", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"error: {tmp_path}: is a directory; name a .jsonl, .json or .parquet file in it"), err


def test_validate_broken_file_names_every_bad_row(capsys):
    assert main(["validate", "--kind", "sft", "--data", BROKEN]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[: len(BROKEN_LINES)] == BROKEN_LINES
    assert f"{BROKEN}: 9 rows, 2 valid, 7 bad" in out


def test_validate_json_report_on_good_file(capsys):
    assert main(["validate", "--kind", "sft", "--data", SFT, "--json", "--tokenizer", "v7"]) == 0
    g = json.loads(capsys.readouterr().out)
    enc = get_encoder("v7")
    encs = [enc.encode_sft(parse_sft_messages(r["messages"])) for r in rows_of(SFT)]
    assert g["valid"] is True and g["rows"] == 10 and g["bad_rows"] == [] and g["tokenizer"] == "v7"
    assert g["tokens"] == sum(len(e.input_ids) for e in encs)
    assert g["trained_tokens"] == sum(sum(t != IGNORE_INDEX for t in e.labels) for e in encs)
    assert 0 < g["packing_efficiency"] <= 1 and g["over_length_rows"] == 0


def test_validate_rows_over_length(capsys):
    assert main(["validate", "--kind", "sft", "--data", SFT, "--max-length", "30", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    enc = get_encoder("v3")
    lengths = [len(enc.encode_sft(parse_sft_messages(r["messages"])).input_ids) for r in rows_of(SFT)]
    assert report["over_length_rows"] == sum(n > 30 for n in lengths) > 0
    assert all("over max_length 30" in x["reason"] for x in report["bad_rows"])
    assert report["tokens"] == sum(n for n in lengths if n <= 30)


def test_validate_dpo(tmp_path, capsys):
    assert main(["validate", "--kind", "dpo", "--data", DPO]) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "x", "rejected": "x"}\n{"prompt": "p", "chosen": "x", "rejected": "y"}\n')
    capsys.readouterr()
    assert main(["validate", "--kind", "dpo", "--data", str(bad)]) == 1
    assert capsys.readouterr().out.splitlines()[0] == f"{bad}:1: chosen and rejected are the same reply"


def test_validate_and_preview_drop_the_fields_named(tmp_path, capsys):
    data = tmp_path / "extra.jsonl"
    data.write_text('{"prompt": "p", "chosen": "x", "rejected": "y", "score": 3, "source": "web"}\n')
    assert main(["validate", "--kind", "dpo", "--data", str(data)]) == 1
    out = capsys.readouterr().out  # a rating is named for what it is, not offered to ignore_fields
    assert "unknown field(s) ['source']" in out and "'score' is not read here: it is a rating of the reply" in out
    assert main(["validate", "--kind", "dpo", "--data", str(data), "--ignore-fields", "score, source"]) == 0
    capsys.readouterr()
    assert main(["preview", "--tokenizer", "v3", "--kind", "dpo", "--data", str(data), "--jsonl",
                 "--ignore-fields", "score,source"]) == 0  # fmt: skip
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    want = get_encoder("v3").encode_dpo(parse_preference({"prompt": "p", "chosen": "x", "rejected": "y"}))
    assert row["prompt_ids"] == want.prompt_ids and row["chosen_ids"] == want.chosen_ids


def test_validate_wrong_kind_and_empty_file(tmp_path, capsys):
    assert main(["validate", "--kind", "dpo", "--data", SFT, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["valid"] is False and "SFT data, but DPO data was expected" in out["error"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["validate", "--kind", "sft", "--data", str(empty)]) == 1
    assert "no rows" in capsys.readouterr().out


def test_bad_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["validate", "--kind", "sft", "--data", SFT, "--tokenizer", "v9"])
    assert e.value.code == 2


# -- preview ------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", TOKENIZER_VERSIONS)
def test_preview_jsonl_equals_the_encoder(version, capsys):
    enc = get_encoder(version)
    assert main(["preview", "--tokenizer", version, "--kind", "sft", "--data", SFT, "--jsonl"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = [enc.encode_sft(parse_sft_messages(r["messages"])) for r in rows_of(SFT)]
    assert got == [{"input_ids": w.input_ids, "labels": w.labels} for w in want]

    assert main(["preview", "--tokenizer", version, "--kind", "dpo", "--data", DPO, "--jsonl"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = [enc.encode_dpo(parse_preference(r)) for r in rows_of(DPO)]
    assert got == [{"prompt_ids": w.prompt_ids, "chosen_ids": w.chosen_ids, "rejected_ids": w.rejected_ids} for w in want]


@pytest.mark.parametrize("version", TOKENIZER_VERSIONS)
def test_preview_jsonl_equals_mistral_common(version, capsys):
    # An independent check on the ids the CLI prints, straight from mistral-common.
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    tok = load_mistral_tokenizer(version)
    assert main(["preview", "--tokenizer", version, "--kind", "sft", "--data", SFT, "--jsonl"]) == 0
    got = [json.loads(line)["input_ids"] for line in capsys.readouterr().out.splitlines()]
    for ids, row in zip(got, rows_of(SFT), strict=True):
        msgs = [kinds[m["role"]](content=m["content"]) for m in row["messages"]]
        assert ids == tok.encode_chat_completion(ChatCompletionRequest(messages=msgs)).tokens


@pytest.mark.slow  # launches the console script
def test_preview_jsonl_subprocess_skips_invalid_rows():
    p = run("preview", "--tokenizer", "v3", "--kind", "sft", "--data", BROKEN, "--jsonl")  # the console script
    assert p.returncode == 1
    assert p.stderr.splitlines() == BROKEN_LINES
    got = [json.loads(line) for line in p.stdout.splitlines()]
    enc = get_encoder("v3")
    lines = Path(BROKEN).read_text().splitlines()
    good = [json.loads(lines[0]), json.loads(lines[8])]
    assert got == [
        {"input_ids": e.input_ids, "labels": e.labels} for e in (enc.encode_sft(parse_sft_messages(r["messages"])) for r in good)
    ]


def test_a_lone_surrogate_is_one_line_per_row_in_validate_and_preview(tmp_path, capsys):
    # JSON allows "\ud800", which is no Unicode character: sentencepiece used to fail on it with a
    # pybind RuntimeError traceback. Now it is a bad row like any other, named with its field.
    good = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
    bad = '{"messages": [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "b"}]}'
    data = tmp_path / "s.jsonl"
    data.write_text(f"{good}\n{bad}\n")
    reason = (f"{data}:2: messages[0].content: not valid Unicode: a lone surrogate \\ud800 at character 3 "
              "(a JSON \\uD800-\\uDBFF escape must be followed by its \\uDC00-\\uDFFF pair)")
    code, out, err = cli(capsys, "validate", "--kind", "sft", "--data", str(data))
    assert code == 1 and out.splitlines()[0] == reason and err == "", err
    code, out, err = cli(capsys, "preview", "--tokenizer", "v3", "--kind", "sft", "--data", str(data), "--jsonl")
    assert code == 1 and err.splitlines() == [reason] and len(out.splitlines()) == 1
    dpo = tmp_path / "p.jsonl"
    dpo.write_text('{"prompt": "p", "chosen": "\\udfff", "rejected": "b"}\n')
    code, out, err = cli(capsys, "preview", "--tokenizer", "v3", "--kind", "dpo", "--data", str(dpo))
    assert code == 1 and err.startswith(f"{dpo}:1: chosen: not valid Unicode"), err
    assert "Traceback" not in err


def test_preview_max_rows(capsys):
    assert main(["preview", "--tokenizer", "v3", "--kind", "dpo", "--data", DPO, "--jsonl", "--max-rows", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_human_preview_marks_trained_tokens(tmp_path, capsys):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Ping"}, {"role": "assistant", "content": "Pong"}]}) + "\n")
    enc = get_encoder("v3")
    assert main(["preview", "--tokenizer", "v3", "--kind", "sft", "--data", str(data), "--color", "never"]) == 0
    out = capsys.readouterr().out
    header, body = out.splitlines()[:2]
    e = enc.encode_sft(parse_sft_messages(json.loads(data.read_text())["messages"]))
    trained = " ".join(enc.piece(t) for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE_INDEX)
    masked = " ".join(enc.piece(t) for t, lab in zip(e.input_ids, e.labels) if lab == IGNORE_INDEX)
    assert body == f"{masked} {{+{trained}+}}"
    assert f"tokens: {len(e.input_ids)}" in header and f"trained: {sum(x != IGNORE_INDEX for x in e.labels)}" in header
    assert "\x1b[" not in out  # no colour codes in logs

    assert main(["preview", "--tokenizer", "v3", "--kind", "sft", "--data", str(data), "--color", "always"]) == 0
    assert f"\x1b[32m{{+{trained}+}}\x1b[0m" in capsys.readouterr().out


def test_human_preview_dpo_shows_prompt_masked_and_replies_trained(capsys):
    assert main(["preview", "--tokenizer", "v3-tekken", "--kind", "dpo", "--data", DPO, "--max-rows", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("prompt:   <s> [INST]") and "{+" not in lines[1]
    assert lines[2].startswith("chosen:   {+Red ▁is") and lines[2].endswith("</s>+}")
    assert lines[3].startswith("rejected: {+Green")


def test_human_preview_on_broken_file(capsys):
    code, out, err = cli(capsys, "preview", "--tokenizer", "v1", "--kind", "sft", "--data", BROKEN)
    assert code == 1 and "Traceback" not in err
    assert out.count("{+") == 2 and err.splitlines() == BROKEN_LINES
