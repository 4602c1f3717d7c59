"""Writes docs/config.md, the reference of every config key, from the typed schema itself
(src/mistral_align/schema/): each dataclass field's type, default and the comment written beside
it. One source for both, so the page cannot drift: tests/test_docs.py fails when it is stale.

    .venv/bin/python scripts/config_reference.py            # rewrite docs/config.md
    .venv/bin/python scripts/config_reference.py --check    # exit 1 if docs/config.md is stale
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import typing
from pathlib import Path

from mistral_align.schema.recipe import RecipeConfig

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "config.md"

HEAD = """\
# Config keys

Generated from the typed schema (`src/mistral_align/schema/`) by `scripts/config_reference.py`;
do not edit by hand. Every node is closed: a misspelt key is refused at start, with a "did you
mean" when one is close (TRL's own names, such as `learning_rate`, map to ours).

The defaults below are the schema's; the config groups in `configs/` (`train/sft.yaml`,
`train/dpo.yaml`, `model/*.yaml`, `data/*.yaml`, ...) and `experiment=...` set many of them
again for their purpose. `recipes/X.py --cfg job` prints the resolved config a command will run.
Set a key on the command line as `node.key=value` (`sft.train.lr=1e-4`), pick a group file as
`group=name` (`model=mistral-7b-v0.3`, `data@sft.data=ultrachat`).
"""


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment: the `#` lines right above it, then the one trailing it (fields a
    parent class defines carry the parent's comments)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            comments.update(own_field_comments(klass))
    return comments


def own_field_comments(cls: type) -> dict[str, str]:
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        above = []
        i = node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            above.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        line = lines[node.lineno - 1]
        trailing = line.split("  # ", 1)[1].strip() if "  # " in line else ""
        comments[node.target.id] = " ".join(part for part in (*above, trailing) if part)
    return comments


def type_name(tp: typing.Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        inner = [type_name(a) for a in args if a is not type(None)]
        return " | ".join(inner) + (" | null" if type(None) in args else "")
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def default_of(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return "(node)"
    else:
        return ""
    if value is None:
        return "null"
    if value == "???":
        return "required"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`"


def node_dataclass(tp: typing.Any) -> type | None:
    for candidate in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def sections(cls: type, prefix: str) -> list[tuple[str, type]]:
    """(dotted node name, its dataclass), in the schema's order, the node before its children."""
    out = [(prefix, cls)]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        child = node_dataclass(hints[f.name])
        if child is not None:
            out += sections(child, f"{prefix}.{f.name}" if prefix else f.name)
        elif typing.get_origin(hints[f.name]) is list and node_dataclass(typing.get_args(hints[f.name])[0]):
            out += sections(typing.get_args(hints[f.name])[0], f"{prefix}.{f.name}[]")
    return out


def render() -> str:
    parts = [HEAD]
    printed: dict[type, str] = {}
    for name, cls in sections(RecipeConfig, "")[1:]:
        if cls in printed:
            parts.append(f"## `{name}`\n\nThe same keys as `{printed[cls]}`.\n")
            continue
        printed[cls] = name
        hints = typing.get_type_hints(cls)
        comments = field_comments(cls)
        rows = []
        for f in dataclasses.fields(cls):
            if node_dataclass(hints[f.name]) is not None:
                continue  # a child node: it has its own section
            text = comments.get(f.name, "").replace("|", "\\|")
            kind = type_name(hints[f.name]).replace("|", "\\|")
            rows.append(f"| `{f.name}` | {kind} | {default_of(f)} | {text} |")
        # A dataclass without a docstring gets its signature as __doc__: not worth printing.
        doc = cls.__doc__ if "__doc__" in vars(cls) and not cls.__doc__.startswith(cls.__name__ + "(") else ""
        parts.append(f"## `{name}`\n")
        if doc:
            parts.append(" ".join(doc.split()) + "\n")
        if rows:
            parts.append("| key | type | default | what it does |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/config.md differs from the schema")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not PAGE.is_file() or PAGE.read_text() != text:
            print(f"{PAGE.relative_to(ROOT)} is stale: run .venv/bin/python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(exist_ok=True)
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
