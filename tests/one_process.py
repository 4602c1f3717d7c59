"""Recipes and CLI commands one after another in one fresh interpreter, for a test that needs a fresh
process (an environment libraries read when imported: HOME, HF_HOME, proxies) but not one per command.

    python tests/one_process.py STEPS.json RESULTS.json

STEPS: [["recipe", "sft.py", ARG...], ["cli", "push", ARG...], ...]; RESULTS: one {"returncode",
"stdout", "stderr"} per step, in order, each as the command would have printed it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runfixtures import run_recipe_script  # noqa: E402


def cli(*argv: str) -> dict:
    from mistral_align.entry.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = e.code
    return {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def main(steps_file: str, results_file: str) -> None:
    results, environ = [], dict(os.environ)
    for kind, *argv in json.loads(Path(steps_file).read_text()):
        os.environ.clear()  # each command starts from the environment the process was given
        os.environ.update(environ)
        if kind == "recipe":
            ran = run_recipe_script(*argv)
            results.append({"returncode": ran.returncode, "stdout": ran.stdout, "stderr": ran.stderr})
        else:
            results.append(cli(*argv))
        Path(results_file).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
