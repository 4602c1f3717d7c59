"""The mistakes a user can make, as one family of exceptions.

Every layer raises these for anything the user can fix (a config value, a data row, a path, the
run directory, the Hub); the recipes and the CLI turn them into one line, `error: ...`, and exit
code 2 (`exit_on_user_error`). Anything else is a bug in mistral-align and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from os import environ as _environ

EXIT_USER_ERROR = 2
# A run stopped cleanly by SIGTERM / SIGUSR1 / Ctrl-C after saving a checkpoint (rerun it to resume).
EXIT_STOPPED = 3
# Another rank died or hung (a lost node): this rank stopped; rerun on every node to resume.
EXIT_PEER_LOST = 4


class UserError(Exception):
    """Something the user can fix; `str(e)` is the whole message, starting with what is wrong."""


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work; the message starts with the key (`sft.train.lr: ...`)."""


class DataError(UserError):
    """Bad training data; `problems` lists the bad rows as `FILE:LINE: reason`."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        super().__init__(message)


class RunDirError(UserError):
    """The run directory cannot be used (held by another launch, made by a different config, ...)."""


class LaunchError(UserError):
    """The launch cannot work on this machine (an accelerate config that needs GPUs, and none here).
    Every rank finds the same, so only the main process prints it."""

    same_on_every_rank = True


class NonFiniteError(UserError):
    """A training step's loss or gradients were NaN / Inf (`train.on_nonfinite=stop`): the message names
    the step, its rows and the newest complete checkpoint. Every rank raises it at the same step, so
    only rank 0 prints it."""

    same_on_every_rank = True


class UntrustedFileError(UserError):
    """A model folder that would run code when loaded: weights only as pickles (`pytorch_model.bin`,
    `adapter_model.bin`, ...; allowed by `model.allow_pickle=true` / `--allow-pickle`), or a config.json
    naming the repository's own Python classes (`auto_map`; allowed by `model.trust_remote_code=true`)."""


class Stopped(Exception):
    """Training stopped on a signal after saving a checkpoint; `str(e)` says how to resume."""


class HubError(UserError):
    """The Hugging Face Hub refused or failed a request (login, permissions, network)."""


def print_user_error(e: UserError, prefix: str = "error") -> None:
    print(f"{prefix}: {e}", file=sys.stderr, flush=True)


_task_started = False
# How long another rank waits for rank 0 to print an error every rank found (see below).
RANK_0_GRACE_SECONDS = 60.0


def _let_rank_0_say_it() -> None:
    """The launcher (torchrun) stops every process as soon as one exits: were this rank to exit
    first, rank 0 could be stopped before it printed the one line. So wait until rank 0 has
    exited and the launcher stops this process too (or, if that never comes, a minute)."""
    import time

    time.sleep(RANK_0_GRACE_SECONDS)


def exit_on_user_error(fn):
    """Entry points: a UserError ends the process with its message and exit code 2, not a traceback;
    a clean stop (Stopped) with one line on the main process and exit code 3; a lost or hung rank
    (train/distributed.py) with one line on every other rank and exit code 4."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _task_started
        _task_started = True
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if getattr(e, "same_on_every_rank", False) and int(_environ.get("RANK", "0")) != 0:
                _let_rank_0_say_it()
            else:
                print_user_error(e)
            sys.exit(EXIT_USER_ERROR)
        except Stopped as e:
            if int(_environ.get("RANK", "0")) == 0:
                print(f"stopped: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_STOPPED)
        except Exception as e:
            from mistral_align.train.distributed import exit_if_peer_lost

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
