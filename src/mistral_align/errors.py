"""The mistakes a user can make, as one family of exceptions, and the exit codes they end in.

Every layer raises these for anything the user can fix (a config value, a data row, a path, the
run directory, the Hub); the recipes and the CLI turn them into one line, `error: ...`, and exit
code 2 (entry/recipe.py, entry/cli.py). Anything else is a bug in mistral-align and keeps its
traceback. This module holds types only: it imports nothing of the package.
"""

from __future__ import annotations

EXIT_OK = 0
# `mistral-align validate` / `preview`: the data has bad rows.
EXIT_BAD_ROWS = 1
EXIT_USER_ERROR = 2
# A run stopped cleanly by SIGTERM / SIGUSR1 / Ctrl-C after saving a checkpoint (rerun it to resume).
EXIT_STOPPED = 3
# Another rank died or hung (a lost node): this rank stopped; rerun on every node to resume.
EXIT_PEER_LOST = 4


class UserError(Exception):
    """Something the user can fix; `str(e)` is the whole message, starting with what is wrong."""


class UsageError(UserError):
    """A mistake in how a command was called (a missing file, a bad option)."""


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
