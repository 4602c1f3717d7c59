"""Every command shown in README.md and docs/*.md is run by a test, or is marked as needing a GPU or
the Hub and then checked as far as this machine can: its config composed and checked, its
arguments parsed. Also: the data commands run here, as written, with the exit code the docs give."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from doc_commands import ROOT, all_doc_commands, doc_commands

from mistral_align.entry.cli import build_parser, main
from mistral_align.entry.estimate_command import compose_config
from mistral_align.schema.recipe import check_config

CLAIM = re.compile(r"""doc_commands\(\s*(["'])(.+?)\1""")
STAGES = {"sft": ("sft",), "dpo": ("dpo",), "sft_dpo": ("sft", "dpo")}


def claimed_needles() -> dict[str, str]:
    """Each needle given to doc_commands in the tests, with the file that runs its commands."""
    needles = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for match in CLAIM.finditer(path.read_text(encoding="utf-8")):
            needles[match.group(2)] = path.name
    return needles


def test_every_command_in_the_docs_is_run_by_a_test_or_marked():
    needles = claimed_needles()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    unclaimed = []
    for command in all_doc_commands():
        if command.marks or any(n in command.text for n in needles):
            continue
        if command.text == "make test" and "make test" in ci:
            continue  # CI runs it, on a clean clone
        unclaimed.append(f"{command.where}: {command.text}")
    assert not unclaimed, "commands no test runs and not marked # GPU or # Hub:\n" + "\n".join(unclaimed)
    # A needle that matches nothing is a test that runs nothing.
    texts = [c.text for c in all_doc_commands()]
    assert all(any(n in t for t in texts) for n in needles), [n for n in needles if not any(n in t for t in texts)]


def test_the_check_catches_an_unmarked_command_no_test_runs():
    (extra,) = _commands_in_text("```bash\n.venv/bin/mistral-align merge RUN --out elsewhere/ \\\n    --dtype bf16   # a note\n```\n")
    assert extra.text == ".venv/bin/mistral-align merge RUN --out elsewhere/ --dtype bf16" and extra.comment == "a note"
    assert not extra.marks and not any(n in extra.text for n in claimed_needles())


def _commands_in(page: Path):
    import doc_commands as docs

    saved, saved_root = docs.DOCS, docs.ROOT
    docs.DOCS, docs.ROOT = [page], page.parent
    try:
        return docs.all_doc_commands()
    finally:
        docs.DOCS, docs.ROOT = saved, saved_root


def _recipe_overrides(argv: tuple[str, ...]) -> tuple[str, list[str]]:
    (i,) = [k for k, a in enumerate(argv) if a.startswith("recipes/")]
    return Path(argv[i]).stem, list(argv[i + 1 :])


@pytest.mark.parametrize("command", [c for c in all_doc_commands() if c.marks], ids=lambda c: c.where)
def test_a_command_marked_gpu_or_hub_composes_and_parses(command):
    """What can be checked without the GPU or the Hub: the recipe's config composes and passes every
    check that needs no data file; a CLI command's arguments parse; a script is bash."""
    if any(a.startswith("recipes/") for a in command.argv):
        recipe, overrides = _recipe_overrides(command.argv)
        cfg = compose_config(recipe, overrides)
        check_config(cfg, STAGES[recipe], need_data=False)
    elif command.argv[0] == "bash":  # a script: there, and bash reads it without a syntax error
        subprocess.run(["bash", "-n", str(ROOT / command.argv[1])], check=True)
    else:
        assert Path(command.argv[0]).name == "mistral-align", command.text
        build_parser().parse_args(list(command.argv[1:]))


@pytest.mark.parametrize(
    "command",
    [c for c in all_doc_commands() if c.argv[1:2] in (("validate",), ("preview",))],
    ids=lambda c: c.where,
)
def test_the_data_commands_in_the_docs_run_as_written(command, capsys, monkeypatch):
    assert doc_commands("mistral-align validate") and doc_commands("mistral-align preview")
    monkeypatch.chdir(ROOT)
    assert main(list(command.argv[1:])) == command.exit_code, command.text
    out = capsys.readouterr().out
    assert out.strip(), command.text


def test_a_comment_is_split_off_only_outside_quotes():
    (command,) = _commands_in_text("```bash\nmistral-align chat RUN --prompt 'a # b'   # Hub, exit 2\n```\n")
    assert command.argv[-1] == "a # b" and command.marks == {"Hub"} and command.exit_code == 2
    assert shlex.join(command.argv) == "mistral-align chat RUN --prompt 'a # b'"


def _commands_in_text(text: str):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "page.md"
        page.write_text(text)
        return _commands_in(page)


@pytest.mark.slow
def test_make_demo_runs_the_demo_recipe_end_to_end_on_a_short_schedule(tmp_path):
    """`make demo` (README.md) is the Makefile's demo line, `recipes/sft_dpo.py experiment=demo`: run
    here as written with a schedule cut to a few steps (the whole demo takes minutes; its figures are
    measured by running it, see README.md). It goes through both stages and reports every skill,
    tool_call included, before SFT, after SFT and after DPO."""
    from runfixtures import run_recipe_script

    (make,) = doc_commands("make demo")
    assert make.argv == ("make", "demo")
    (line,) = [x.strip() for x in (ROOT / "Makefile").read_text().split("\ndemo:")[1].splitlines()[1:2]]
    recipe, *overrides = shlex.split(line)[1:]
    assert (recipe, overrides) == ("recipes/sft_dpo.py", ["experiment=demo"])
    short = ["sft.synthetic.n_train=40", "sft.synthetic.n_eval=10", "sft.train.max_steps=3", "sft.eval.max_prompts=10",
             "sft.eval.max_new_tokens=4", "dpo.synthetic.n_train=16", "dpo.synthetic.n_eval=10", "dpo.train.max_steps=2",
             "dpo.eval.max_prompts=10", "dpo.eval.max_new_tokens=4", f"run.dir={tmp_path / 'demo'}"]  # fmt: skip
    ran = run_recipe_script(Path(recipe).name, *overrides, *short, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-4000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    by_skill = summary["eval"]["by_skill"]
    assert set(by_skill) == {"before", "after_sft", "after_dpo"}
    assert all(set(s) == {"copy", "reverse", "add", "upper", "tool_call"} for s in by_skill.values()), by_skill
    assert summary["sft"]["after"]["loss"] < summary["sft"]["before"]["loss"]
    assert "tool_call" in ran.stdout + ran.stderr
