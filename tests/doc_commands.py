"""The commands shown in README.md and docs/*.md, read the way a user would copy them.

Only `bash` code blocks hold commands. A line ending in a backslash continues on the next; a `#`
starts a comment (shlex's rules, so a `#` inside quotes is text); a line that is only a comment, or
shell syntax around a command (`for ...; do`, `done; wait`), is no command. A comment naming `GPU`
or `Hub` marks a command that cannot run here: tests/test_doc_commands.py checks its config or
arguments instead of running it. A test that runs commands gets them with `doc_commands(needle)`,
and that call is how tests/test_doc_commands.py knows each unmarked command is run by some test.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_SYNTAX = re.compile(r"^(for |done\b|do\b|while |if |fi\b|then\b)")
MARKS = ("GPU", "Hub")


@dataclass(frozen=True)
class DocCommand:
    where: str  # "docs/data.md:12"
    text: str  # the command as written, continuation lines joined, comment left out
    comment: str
    argv: tuple[str, ...]

    @property
    def marks(self) -> set[str]:
        return {m for m in MARKS if re.search(rf"\b{m}\b", self.comment)}

    @property
    def exit_code(self) -> int:
        """The exit code the docs promise (`# exit 1`), else 0."""
        found = re.search(r"\bexit (\d+)", self.comment)
        return int(found.group(1)) if found else 0


def _split_comment(line: str) -> tuple[str, str]:
    """The code and the comment of a line: the first `#` outside quotes that starts a word."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def all_doc_commands(pages: list[Path] | None = None, root: Path = ROOT) -> list[DocCommand]:
    """The commands of `pages` (default: README.md and docs/*.md), each named by its place under `root`."""
    found = []
    for path in DOCS if pages is None else pages:
        lines = path.read_text(encoding="utf-8").splitlines()
        in_bash = False
        pending: list[str] = []
        comments: list[str] = []
        start = 0
        for number, line in enumerate(lines, 1):
            if line.startswith("```"):
                in_bash = not in_bash and line.strip() in ("```bash", "```sh")
                continue
            if not in_bash:
                continue
            code, comment = _split_comment(line.strip())
            if not code and not pending:
                continue  # a comment line about the commands below, not a mark of one
            if not pending:
                start = number
            if comment:
                comments.append(comment)
            if code.endswith("\\"):
                pending.append(code[:-1].strip())
                continue
            text = " ".join([*pending, code]).strip()
            pending = []
            if text and not SHELL_SYNTAX.match(text):
                text = text.removesuffix("&").strip()
                where = f"{path.relative_to(root)}:{start}"
                found.append(DocCommand(where, text, " ".join(comments), tuple(shlex.split(text))))
            comments = []
    return found


def doc_commands(needle: str) -> list[DocCommand]:
    """The commands (README.md, docs/*.md) that contain `needle`; at least one, or the test fails."""
    found = [c for c in all_doc_commands() if needle in c.text]
    assert found, f"no command in README.md or docs/*.md contains {needle!r}"
    return found


def as_run_here(command: DocCommand, **values: str) -> list[str]:
    """The command's argv as a test runs it: `.venv/bin/X` is this environment's X, paths of the
    repository are absolute (the test runs elsewhere), and `$NAME` words take `values[NAME]`."""
    import sys

    argv = []
    for word in command.argv:
        if word.startswith(".venv/bin/"):
            word = str(Path(sys.executable).parent / word.removeprefix(".venv/bin/"))
        elif word.startswith("$"):
            word = values[word[1:]]
        elif "/" in word and "=" not in word and (ROOT / word).exists():
            word = str(ROOT / word)
        argv.append(word)
    return argv
