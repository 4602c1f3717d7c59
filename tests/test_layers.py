"""The package's layers hold and no module imports itself in a circle (imports inside functions
count): the two import-linter contracts in pyproject.toml, run in this process. A copy of the
package with a circle added on purpose proves each contract can fail."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import grimp
import importlinter.api  # noqa: F401  (configures import-linter, as its `lint-imports` command does)
import pytest
from importlinter.application.use_cases import lint_imports

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def kept(config: Path, contract: str) -> bool:
    return lint_imports(config_filename=str(config), limit_to_contracts=(contract,), cache_dir=None, no_logo=True)


def copy_with_a_late_import(tmp_path: Path, module: str, statement: str) -> str:
    """A renamed copy of the package (the real one is already imported here) in which `module` ends
    with a function holding `statement`; its name."""
    probe = "mistral_align_circle_probe"
    shutil.copytree(ROOT / "src" / "mistral_align", tmp_path / probe, ignore=shutil.ignore_patterns("__pycache__"))
    for path in (tmp_path / probe).rglob("*.py"):
        path.write_text(path.read_text().replace("mistral_align", probe))
    target = tmp_path / probe / module
    late = statement.format(probe=probe)
    target.write_text(target.read_text() + f"\n\ndef _later():\n    {late}  # noqa: F401\n")
    return probe


def circles_through_a_package(root: Path, package: str) -> list[tuple[str, str]]:
    """(module, package) where the module runs `from PACKAGE import name` on a package above it whose
    __init__ imports the module back: a circle import-linter does not see (grimp reads that import
    as one of the submodule `name` when there is one, but Python runs the package's __init__ first)."""
    graph = grimp.build_graph(package, cache_dir=None)
    found = []
    for path in sorted((root / package).rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            above = isinstance(node, ast.ImportFrom) and not node.level and module.startswith(f"{node.module}.")
            if above and graph.chain_exists(importer=node.module, imported=module):
                found.append((module, node.module))
    return found


def test_no_module_imports_the_package_that_imports_it():
    assert circles_through_a_package(ROOT / "src", "mistral_align") == []


def test_a_module_importing_its_own_package_is_found(tmp_path, monkeypatch):
    # chat/encoder.py once did this to reach chat/to_mistral.py, and chat/__init__.py imports encoder.
    probe = copy_with_a_late_import(tmp_path, "chat/encoder.py", "from {probe}.chat import to_mistral")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert circles_through_a_package(tmp_path, probe) == [(f"{probe}.chat.encoder", f"{probe}.chat")]


@pytest.mark.parametrize("contract", ["layers", "no-circle"])
def test_the_package_keeps_the_contract(contract):
    assert kept(PYPROJECT, contract)


@pytest.mark.parametrize("contract, module", [
    ("layers", "errors.py"),          # ground would import the runtime
    ("no-circle", "train/ranks.py"),  # inside one layer: train/stage.py imports train/ranks.py
])  # fmt: skip
def test_a_circle_added_on_purpose_breaks_the_contract(tmp_path, monkeypatch, contract, module):
    # Inside a function, where imports were once moved to dodge a circle: it still counts.
    probe = copy_with_a_late_import(tmp_path, module, "import {probe}.train.stage")
    config = tmp_path / "pyproject.toml"
    config.write_text(PYPROJECT.read_text().replace('"mistral_align"', f'"{probe}"'))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert kept(config, contract) is False
    assert kept(config, "no-circle" if contract == "layers" else "layers") is (contract == "no-circle")
