"""What every recipe (recipes/*.py) does at its edges: turn mistakes into one line and an exit code.

    @hydra.main(config_path="../configs", config_name="sft", version_base="1.3")
    @exit_on_user_error
    def main(cfg): ...

    if __name__ == "__main__":
        run_hydra_recipe(main)

Exit codes (errors.py): 2 a user mistake (one `error: ...` line), 3 a clean stop on a signal (one
`stopped: ...` line, rerun to resume), 4 another rank lost or hung (one line on each survivor).
"""

from __future__ import annotations

import functools
import os
import sys
import time

from mistral_align.errors import EXIT_STOPPED, EXIT_USER_ERROR, Stopped, UserError
from mistral_align.train.ranks import exit_if_peer_lost

_task_started = False
# How long another rank waits for rank 0 to print an error every rank found (see below).
RANK_0_GRACE_SECONDS = 60.0


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _let_rank_0_say_it() -> None:
    """The launcher (torchrun) stops every process as soon as one exits: were this rank to exit
    first, rank 0 could be stopped before it printed the one line. So wait until rank 0 has
    exited and the launcher stops this process too (or, if that never comes, a minute)."""
    time.sleep(RANK_0_GRACE_SECONDS)


def exit_on_user_error(fn):
    """A UserError ends the process with its message and exit code 2, not a traceback; a clean stop
    (Stopped) with one line on the main process and exit code 3; a lost or hung rank
    (train/ranks.py) with one line on every other rank and exit code 4."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _task_started
        _task_started = True
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if getattr(e, "same_on_every_rank", False) and _rank() != 0:
                _let_rank_0_say_it()
            else:
                print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        except Stopped as e:
            if _rank() == 0:
                print(f"stopped: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_STOPPED)
        except Exception as e:
            exit_if_peer_lost(e)  # a lost or hung rank: one line and EXIT_PEER_LOST, no traceback
            raise

    return wrapper


def run_hydra_recipe(main) -> None:
    """Call a `@hydra.main` entry point so that Hydra's own user errors (an unknown key or group
    option on the command line, a bad override) exit 2 like ours. Hydra ends those with exit code 1
    before our task function starts; once it has started, an exit code 1 is a real failure and stays."""
    try:
        main()
    except SystemExit as e:
        if e.code == 1 and not _task_started:
            sys.exit(EXIT_USER_ERROR)
        raise
