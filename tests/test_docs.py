"""The reference pages cannot drift from the code: docs/config.md is generated from the typed
schema and must equal what the schema gives today."""

from __future__ import annotations

import re
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


def _config_files_block() -> str:
    text = (ROOT / "docs" / "training.md").read_text()
    start = text.index("```\nconfigs/\n")
    return text[start : text.index("```", start + 3)]


def test_the_config_tree_in_the_docs_names_every_shipped_config_file():
    """The listing in docs/training.md once left out six model configs; every file of every group is
    named there now, and a listed name that is no file fails too."""
    block = _config_files_block()
    for group in ("model", "quant", "peft", "data", "train", "experiment", "accelerate"):
        files = {p.stem for p in (ROOT / "configs" / group).glob("*.yaml")}
        (line_start,) = [m.start() for m in re.finditer(rf"^  {group}/", block, re.M)]
        following = block[line_start:].split("\n")
        listed_lines = [following[0]] + [x for x in following[1:] if x.startswith("    ")]
        listing = " ".join(listed_lines)
        missing = sorted(f for f in files if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", listing))
        assert not missing, f"docs/training.md's configs/{group}/ leaves out {missing}"


def test_the_front_page_names_every_tokenizer_version_and_stays_short():
    from mistral_align.names import TOKENIZER_VERSIONS

    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert all(f"{v}," in readme or f"{v})" in readme for v in TOKENIZER_VERSIONS), TOKENIZER_VERSIONS
    # Every page the front page links to is there.
    for link in re.findall(r"\]\((docs/[\w.-]+\.md)", readme):
        assert (ROOT / link).is_file(), link
