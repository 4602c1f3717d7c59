"""The package's layers hold and no module imports itself in a circle (imports inside functions
count): the two import-linter contracts in pyproject.toml, run in this process. A copy of the
package with a circle added on purpose proves each contract can fail."""

from __future__ import annotations

import shutil
from pathlib import Path

import importlinter.api  # noqa: F401  (configures import-linter, as its `lint-imports` command does)
import pytest
from importlinter.application.use_cases import lint_imports

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def kept(config: Path, contract: str) -> bool:
    return lint_imports(config_filename=str(config), limit_to_contracts=(contract,), cache_dir=None, no_logo=True)


@pytest.mark.parametrize("contract", ["layers", "no-circle"])
def test_the_package_keeps_the_contract(contract):
    assert kept(PYPROJECT, contract)


@pytest.mark.parametrize("contract, module", [
    ("layers", "errors.py"),          # ground would import the runtime
    ("no-circle", "train/ranks.py"),  # inside one layer: train/stage.py imports train/ranks.py
])  # fmt: skip
def test_a_circle_added_on_purpose_breaks_the_contract(tmp_path, monkeypatch, contract, module):
    probe = "mistral_align_circle_probe"  # a renamed copy: the real package is already imported here
    shutil.copytree(ROOT / "src" / "mistral_align", tmp_path / probe, ignore=shutil.ignore_patterns("__pycache__"))
    for path in (tmp_path / probe).rglob("*.py"):
        path.write_text(path.read_text().replace("mistral_align", probe))
    target = tmp_path / probe / module
    # Inside a function, where imports were once moved to dodge a circle: it still counts.
    target.write_text(target.read_text() + f"\n\ndef _later():\n    import {probe}.train.stage  # noqa: F401\n")
    config = tmp_path / "pyproject.toml"
    config.write_text(PYPROJECT.read_text().replace('"mistral_align"', f'"{probe}"'))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert kept(config, contract) is False
    assert kept(config, "no-circle" if contract == "layers" else "layers") is (contract == "no-circle")
