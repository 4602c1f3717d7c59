"""What every recipe (recipes/*.py) does at its edges: turn mistakes into one line and an exit code.

    @hydra.main(config_path="../configs", config_name="sft", version_base="1.3")
    @exit_on_user_error
    def main(cfg):
        check_recipe(cfg, "sft", stages=("sft",))   # train/preflight.py: before the heavy imports
        ...

    if __name__ == "__main__":
        run_hydra_recipe(main, "sft")

Exit codes (errors.py): 2 a user mistake (one `error: ...` line), 3 a clean stop on a signal (one
`stopped: ...` line, rerun to resume), 4 another rank lost or hung (one line on each survivor).
"""

from __future__ import annotations

import functools
import os
import re
import sys
import time

from mistral_align.errors import EXIT_STOPPED, EXIT_USER_ERROR, Stopped, UserError
from mistral_align.names import RECIPE_STAGES, STAGES
from mistral_align.schema.recipe import RecipeConfig, refuse_overrides_of_other_stages
from mistral_align.schema.suggest import unknown_key_message, unknown_option_message
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


def _prints_config(argv: list[str]) -> bool:
    return any(a in ("--cfg", "-c") or a.startswith("--cfg=") for a in argv)


def run_hydra_recipe(main, recipe: str | None = None) -> None:
    """Call a `@hydra.main` entry point so that every mistake Hydra finds on the command line (an
    unknown key or group option, a value of the wrong type, an override it cannot parse) is one line,
    `error: ...` with a did-you-mean (schema/suggest.py), and exit code 2 like ours, instead of
    Hydra's own lines. Once the task function has started, a failure is the task's own.

    `recipe` ("sft", "dpo", "sft_dpo"): `--cfg job` then prints only the stages it runs."""
    global _task_started
    _task_started = False
    argv = list(sys.argv)
    # Hydra prints its errors and exits 1 unless HYDRA_FULL_ERROR is set; set, it raises them, and the
    # one line is ours. A user who set it asked for Hydra's full trace, and keeps it.
    wants_trace = "HYDRA_FULL_ERROR" in os.environ
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        if recipe is not None and _prints_config(argv[1:]):
            # The composed config without the stages this recipe does not run (Hydra's delete
            # override), after refusing an override of one, as a run would.
            stages = RECIPE_STAGES[recipe]
            overrides = [i for i, a in enumerate(argv) if i and "=" in a and not a.startswith("-")]
            refuse_overrides_of_other_stages(stages, recipe, [argv[i] for i in overrides])
            at = overrides[0] if overrides else len(argv)  # beside the others: argparse takes them as one run
            sys.argv = [*argv[:at], *(f"~{s}" for s in STAGES if s not in stages), *argv[at:]]
        main()
    except SystemExit as e:
        if e.code == 1 and not _task_started:
            sys.exit(EXIT_USER_ERROR)
        raise
    except UserError as e:  # found on the command line, before the task started
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except BrokenPipeError:  # `recipes/sft.py --cfg job | head` closed the pipe early
        if _task_started:  # a training run's output cut off is no success
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except Exception as e:
        line = None if _task_started or wants_trace else hydra_mistake(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    finally:
        sys.argv = argv
        if not wants_trace:
            os.environ.pop("HYDRA_FULL_ERROR", None)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def hydra_mistake(e: BaseException) -> str | None:
    """The one line for an error Hydra raised while composing the config from the command line, or
    None for anything else."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(e, MissingConfigException):
        group, _, name = (e.missing_cfg_file or "").rpartition("/")
        if group and e.options:
            return unknown_option_message(group, name, list(e.options))
        return _first_line(e)
    if isinstance(e, OverrideParseException):
        why = [line for line in str(e).splitlines() if line.strip() and not line.startswith(("Error parsing", "See http"))]
        return (f"{e.override}: Hydra cannot read this override{f' ({why[0]})' if why else ''}; write KEY=VALUE, "
                "e.g. sft.train.lr=1e-4 (quote values with spaces or brackets for the shell)")
    if not isinstance(e, ConfigCompositionException):
        return None
    cause = e.__cause__
    if not isinstance(cause, OmegaConfBaseException):
        return _first_line(e)
    key = getattr(cause, "full_key", None) or ""
    written = re.search(r"override '?([^' =]+)", str(e))
    if written:
        target = written.group(1).lstrip("+~")
        if target.startswith(key):  # the node that lacks it is higher up: name the whole key written
            key = target
        elif not key.startswith(target):  # a field of a list's element, named alone: `ignore_field`
            key = f"{target}.{key}"
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        return unknown_key_message(key, RecipeConfig)
    return f"{key}: {_first_line(cause)}"
