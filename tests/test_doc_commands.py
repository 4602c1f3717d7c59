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
from doc_commands import ROOT, DocCommand, all_doc_commands, doc_commands

from mistral_align.entry.cli import build_parser, main
from mistral_align.entry.estimate_command import compose_config
from mistral_align.schema.recipe import check_config

CLAIM = re.compile(r"""doc_commands\(\s*(["'])(.+?)\1""")
STAGES = {"sft": ("sft",), "dpo": ("dpo",), "sft_dpo": ("sft", "dpo")}


def claimed_needles() -> set[str]:
    """Each needle given to doc_commands in the tests: the commands it matches are run there."""
    return {m.group(2) for path in (ROOT / "tests").glob("test_*.py") for m in CLAIM.finditer(path.read_text(encoding="utf-8"))}


def unclaimed(commands: list[DocCommand]) -> list[str]:
    """The commands no test runs and no `# GPU` / `# Hub` marks (`make test`: CI runs it)."""
    needles, ci = claimed_needles(), (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    return [f"{c.where}: {c.text}" for c in commands
            if not (c.marks or any(n in c.text for n in needles) or (c.text == "make test" and c.text in ci))]  # fmt: skip


def test_every_command_in_the_docs_is_run_by_a_test_or_marked():
    commands = all_doc_commands()
    missing = unclaimed(commands)
    assert not missing, "commands no test runs and not marked # GPU or # Hub:\n" + "\n".join(missing)
    # A needle that matches nothing is a test that runs nothing.
    idle = [n for n in claimed_needles() if not any(n in c.text for c in commands)]
    assert not idle, idle


def test_the_check_catches_an_unmarked_command_no_test_runs(tmp_path):
    page = "```bash\n.venv/bin/mistral-align merge RUN --out elsewhere/ \\\n    --dtype bf16   # a note\n```\n"
    (extra,) = _commands_in_text(page, tmp_path)
    assert extra.text == ".venv/bin/mistral-align merge RUN --out elsewhere/ --dtype bf16" and extra.comment == "a note"
    assert unclaimed([extra]) == ["page.md:2: .venv/bin/mistral-align merge RUN --out elsewhere/ --dtype bf16"]
    (marked,) = _commands_in_text(page.replace("# a note", "# GPU"), tmp_path)
    assert unclaimed([marked]) == []


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
    "command", [*doc_commands("mistral-align validate"), *doc_commands("mistral-align preview")], ids=lambda c: c.where
)
def test_the_data_commands_in_the_docs_run_as_written(command, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(list(command.argv[1:])) == command.exit_code, command.text
    out = capsys.readouterr().out
    assert out.strip(), command.text


def test_a_comment_is_split_off_only_outside_quotes(tmp_path):
    (command,) = _commands_in_text("```bash\nmistral-align chat RUN --prompt 'a # b'   # Hub, exit 2\n```\n", tmp_path)
    assert command.argv[-1] == "a # b" and command.marks == {"Hub"} and command.exit_code == 2
    assert shlex.join(command.argv) == "mistral-align chat RUN --prompt 'a # b'"


def _commands_in_text(text: str, tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text(text)
    return all_doc_commands([page], root=tmp_path)


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
