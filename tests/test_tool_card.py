"""The model card's "Tool calls" section: shown when the run's data had tool rows (the data report in
manifest.json), with ids equal to mistral-common's for the prompt, the call and the result."""

from __future__ import annotations

import json

import pytest
from chat_reference import reference_prompt, reference_tokens

from mistral_align.hub.card import TOOL_EXAMPLE, data_has_tools, render_card, tool_format_section
from mistral_align.rundir.finished import RunSource


def _ids_in(section: str) -> list[list[int]]:
    return [json.loads(block.split("\n", 1)[0]) for block in section.split("```\n")[1:] if block.startswith("[")
            and block.split("\n", 1)[0][1:2].isdigit()]


@pytest.mark.parametrize("version", ["v2", "v3", "v7-tekken", "v11", "v13"])
def test_the_section_shows_mistral_commons_ids(version):
    section = tool_format_section(version)
    ask, call, answer = _ids_in(section)
    messages, tools = TOOL_EXAMPLE["messages"], TOOL_EXAMPLE["tools"]
    assert ask == reference_prompt(version, messages[:1], tools)
    assert ask + call == reference_tokens(version, messages[:2], tools)
    assert ask + call + answer == reference_prompt(version, messages[:3], tools)
    assert json.dumps(TOOL_EXAMPLE, indent=1, ensure_ascii=False) in section


def _run(tmp_path, report: dict | None, section: str | None = "sft") -> RunSource:
    manifest = {"data": {"report": report}} if section is None else {section: {"data": {"report": report}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return RunSource(path=tmp_path, kind="run", stage="sft", base="mistralai/Mistral-7B-v0.3", tokenizer_version="v3",
                     config={"sft": {}})


def test_the_section_appears_only_when_the_data_had_tools(tmp_path):
    plain = _run(tmp_path, {"tool_rows": 0})
    assert not data_has_tools(plain) and "## Tool calls" not in render_card(plain, "me/x", "mistralai/Mistral-7B-v0.3")
    for section in ("sft", "dpo", None):  # a pipeline's stage, or a single-stage run's top-level report
        tools = _run(tmp_path, {"tool_rows": 3}, section)
        assert data_has_tools(tools)
        card = render_card(tools, "me/x", "mistralai/Mistral-7B-v0.3")
        assert "## Tool calls\n\n" + tool_format_section("v3") in card
        assert card.index("## Prompt format") < card.index("## Tool calls") < card.index("## Usage")
    (tmp_path / "manifest.json").unlink()
    assert not data_has_tools(plain)
