"""The reference pages cannot drift from the code: docs/config.md is generated from the typed
schema and must equal what the schema gives today."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import config_reference  # noqa: E402


def test_the_config_reference_is_generated_from_todays_schema():
    assert (ROOT / "docs" / "config.md").read_text() == config_reference.render(), (
        "docs/config.md is stale: run .venv/bin/python scripts/config_reference.py"
    )


def test_every_schema_key_has_a_row_and_the_check_can_fail(tmp_path, monkeypatch):
    text = config_reference.render()
    for key in ("`lr`", "`beta`", "`tool_call_ids`", "`dist_timeout_s`", "`train_thinking`", "`ignore_fields`"):
        assert f"| {key} |" in text
    stale = tmp_path / "config.md"
    stale.write_text(text.replace("| `lr` |", "| `learning_rate` |"))
    monkeypatch.setattr(config_reference, "PAGE", stale)
    monkeypatch.setattr(sys, "argv", ["config_reference.py", "--check"])
    monkeypatch.setattr(config_reference, "ROOT", tmp_path)
    assert config_reference.main() == 1
