"""`validate` and `preview` on tool rows: the training loader's options (--tool-call-ids,
--[no-]train-thinking), one `FILE:LINE: reason` line per bad row, what the version leaves out counted
in the human and the --json report, and preview's two contract shapes (--jsonl) and trained tokens
set apart (human view)."""

from __future__ import annotations

import json

import datasets
import pytest
from tool_rows import dpo_row, sft_row, two_turn_row, write_jsonl

from mistral_align.chat.encoder import IGNORE_INDEX, get_encoder
from mistral_align.data.encode import check_row
from mistral_align.entry.cli import main


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


BAD_CALL = {"tools": [], "messages": [{"role": "user", "content": "x"},
                                      {"role": "assistant", "tool_calls": [{"id": "abcdefgh1", "type": "function",
                                                                            "function": {"name": "f", "arguments": "[]"}}]}]}


@pytest.fixture
def mixed(tmp_path):
    """Line 1: a call and result before the last user message; 2: ids of OpenAI's form; 3: arguments
    that are no JSON object; 4: a call of a tool the row does not have; 5: plain chat."""
    unknown = sft_row("Oslo")
    unknown["messages"][1]["tool_calls"][0]["function"]["name"] = "get_news"
    return write_jsonl(tmp_path / "tools.jsonl", [
        json.loads(json.dumps(two_turn_row("Paris")).replace("call_0001", "abcdefgh1")), sft_row("Rome"), BAD_CALL,
        json.loads(json.dumps(unknown).replace("call_0001", "abcdefgh1")),
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])


def test_validate_names_each_bad_tool_row_in_one_line(mixed, capsys):
    assert main(["validate", "--kind", "sft", "--data", str(mixed), "--tokenizer", "v3"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [
        f"{mixed}:2: messages[1].tool_calls[0]: id 'call_0001' is not a valid tool call id for tokenizer v3: it must be "
        "exactly 9 letters or digits (tool_call_ids: regenerate replaces a row's ids)",
        f"{mixed}:3: messages[1].tool_calls[0].function.arguments: arguments must be a JSON object (or a string "
        "holding one), got an array; a call without arguments has {}",
        f"{mixed}:4: messages[1].tool_calls[0]: calls 'get_news', which is not among the row's tools (its tools: "
        "'get_weather', 'get_time')",
    ]
    assert out[3] == f"{mixed}: 5 rows, 2 valid, 3 bad (0 over max_length 2048)"
    assert "tool rows: 1  thinking rows: 0" in out and out[-1] == "FAILED: fix or drop the rows above"


def test_validate_regenerates_ids_and_counts_what_v2_leaves_out(mixed, capsys):
    assert main(["validate", "--kind", "sft", "--data", str(mixed), "--tokenizer", "v3", "--tool-call-ids", "regenerate",
                 "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [b["line"] for b in report["bad_rows"]] == [3, 4]  # line 2's ids are regenerated
    assert (report["tool_rows"], report["dropped_tool_calls"], report["dropped_tool_results"]) == (2, 0, 0)
    assert main(["validate", "--kind", "sft", "--data", str(mixed), "--tokenizer", "v2", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    # v2: line 1's call and result come before its last user message and are encoded as nothing.
    assert (report["tool_rows"], report["dropped_tool_calls"], report["dropped_tool_results"]) == (2, 1, 1)
    assert main(["validate", "--kind", "sft", "--data", str(mixed), "--tokenizer", "v2"]) == 1
    human = capsys.readouterr().out
    assert ("left out by tokenizer v2 (as mistral-common encodes it): 1 tool call(s) and 1 tool result(s) before the "
            "last user message of their row") in human


def test_validate_dpo_tool_pairs_and_thinking(tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [dpo_row("Paris"), dpo_row("Rome", "Oslo")])
    assert main(["validate", "--kind", "dpo", "--data", str(pairs), "--tokenizer", "v13", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] and report["tool_rows"] == 2
    think = write_jsonl(tmp_path / "think.jsonl", [sft_row("Lima", thinking=True)])
    assert main(["validate", "--kind", "sft", "--data", str(think), "--tokenizer", "v13", "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert main(["validate", "--kind", "sft", "--data", str(think), "--tokenizer", "v13", "--json",
                 "--no-train-thinking"]) == 0
    masked = json.loads(capsys.readouterr().out)
    assert trained["thinking_rows"] == masked["thinking_rows"] == 1
    assert masked["trained_tokens"] < trained["trained_tokens"] and masked["tokens"] == trained["tokens"]
    assert main(["validate", "--kind", "sft", "--data", str(think), "--tokenizer", "v11", "--tool-call-ids",
                 "regenerate"]) == 1
    assert f"{think}:1: messages[3]: thinking chunks are not supported by tokenizer v11 (they need v13)" in capsys.readouterr().out


def test_preview_jsonl_keeps_the_two_shapes_for_tool_rows(tmp_path, capsys):
    sft = write_jsonl(tmp_path / "sft.jsonl", [sft_row(c, thinking=True) for c in ("Paris", "東京")])
    assert main(["preview", "--tokenizer", "v13", "--kind", "sft", "--data", str(sft), "--jsonl",
                 "--no-train-thinking"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    enc = get_encoder("v13")
    assert lines == [check_row("sft", json.dumps(sft_row(c, thinking=True)), enc, train_thinking=False).ids
                     for c in ("Paris", "東京")]
    assert all(set(line) == {"input_ids", "labels"} for line in lines)
    assert enc.raw.get_special_token("[THINK]") not in [x for x in lines[0]["labels"] if x != IGNORE_INDEX]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [dpo_row("Paris"), dpo_row("Rome", "Oslo")])
    assert main(["preview", "--tokenizer", "v3", "--kind", "dpo", "--data", str(pairs), "--jsonl",
                 "--tool-call-ids", "regenerate"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [set(line) for line in lines] == [{"prompt_ids", "chosen_ids", "rejected_ids"}] * 2
    assert lines[1] == check_row("dpo", json.dumps(dpo_row("Rome", "Oslo")), get_encoder("v3"),
                                 tool_call_ids="regenerate").ids
    # keep (the default): the OpenAI-style ids are refused, one line per row on stderr, no JSON line.
    assert main(["preview", "--tokenizer", "v3", "--kind", "dpo", "--data", str(pairs), "--jsonl"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 2
    assert captured.err.startswith(f"{pairs}:1: chosen[0].tool_calls[0]: id 'call_0001' is not a valid tool call id")


def test_preview_sets_the_trained_call_apart(tmp_path, capsys):
    rows = write_jsonl(tmp_path / "v2.jsonl", [two_turn_row("Rome")])
    assert main(["preview", "--tokenizer", "v2", "--kind", "sft", "--data", str(rows), "--color", "never"]) == 0
    header, body = capsys.readouterr().out.splitlines()[:2]
    assert header.endswith("left out: 1 tool call(s), 1 tool result(s)")
    assert "[TOOL_CALLS]" not in body and "{+▁You ▁are ▁welcome . </s>+}" in body  # v2 drops the early call
    one = write_jsonl(tmp_path / "v3.jsonl", [sft_row("Rome")])
    assert main(["preview", "--tokenizer", "v3", "--kind", "sft", "--data", str(one), "--color", "never",
                 "--tool-call-ids", "regenerate"]) == 0
    header, body = capsys.readouterr().out.splitlines()[:2]
    assert "left out" not in header
    assert "[AVAILABLE_TOOLS]" in body.split("{+")[0]  # the tools: masked
    call = body.split("{+", 1)[1].split("+}", 1)[0]
    assert call.startswith("[TOOL_CALLS] ") and call.endswith(" </s>")  # the call and its EOS: trained
    result = body.split("+}", 1)[1].split("{+", 1)[0]
    assert result.strip().startswith("[TOOL_RESULTS]") and result.strip().endswith("[/TOOL_RESULTS]")  # masked
