"""`mistral-align` command line: one subcommand per verb, each in the module of its kind.

    entry/data_commands.py      validate, preview
    entry/estimate_command.py   estimate
    entry/run_commands.py       push, merge, export-gguf, chat

Adding a subcommand: write `add_NAME(subparsers)` that registers its arguments and sets
`func=_cmd_NAME`, and `_cmd_NAME(args) -> int` (the exit code); list it in `SUBCOMMANDS`.

Exit codes: 0 success, 1 the data has bad rows, 2 a usage error (missing file, bad option).
User mistakes end with a one-line message on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from mistral_align.entry.data_commands import add_preview, add_validate
from mistral_align.entry.estimate_command import add_estimate
from mistral_align.entry.run_commands import add_chat, add_export_gguf, add_merge, add_push
from mistral_align.errors import EXIT_OK, EXIT_USER_ERROR, UserError


def _quiet_libraries() -> None:
    # Progress bars are for people watching a terminal; in a log or a pipe they are noise.
    if not sys.stderr.isatty():
        import datasets

        datasets.disable_progress_bars()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


SUBCOMMANDS = (add_validate, add_preview, add_estimate, add_chat, add_merge, add_export_gguf, add_push)


# Training is not a subcommand: it is a recipe, launched as a script (python or accelerate launch).
TRAINING = """training (the recipes in the repository's recipes/, with Hydra overrides):
  .venv/bin/python recipes/sft.py 'sft.data.train=[{path: chat.jsonl}]' sft.train.lr=1e-4
  .venv/bin/python recipes/dpo.py dpo.init_from=runs/sft-... 'dpo.data.train=[{path: prefs.jsonl}]'
  .venv/bin/python recipes/sft_dpo.py experiment=demo      # SFT then DPO in one run directory
  .venv/bin/accelerate launch --config_file configs/accelerate/cpu_ddp.yaml recipes/sft.py ...
  make demo                                               # SFT -> DPO on a tiny model, offline, CPU
A recipe's --cfg job prints its whole config; --help lists the config groups (model=, quant=, ...).
Check your data first: mistral-align validate --kind sft --data chat.jsonl"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mistral-align",
        description="SFT then DPO for Mistral models, with tokens byte-identical to mistral-common.",
        epilog=TRAINING,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Hydra overrides after an option (`estimate --stage dpo dpo.train.max_length=2048`): argparse
    # takes a positional list only before the first option.
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _quiet_libraries()
    try:
        return args.func(args)
    except UserError as e:  # usage, config, data, run directory or Hub: one line, never a traceback
        print(f"mistral-align {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # `mistral-align preview ... | head` closes the pipe early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
