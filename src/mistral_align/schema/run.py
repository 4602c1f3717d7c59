"""The shared nodes about the run itself: `run` (where, seed, trackers, resuming) and `hub` (push)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from mistral_align.errors import ConfigError
from mistral_align.names import REPO_ID
from mistral_align.schema.rules import at_least, choice

REPORT_TO = ("none", "wandb", "tensorboard")
WANDB_MODES = ("auto", "online", "offline", "disabled")


@dataclass
class RunConfig:
    # The folder new run directories are made in, and a relative run.dir is taken under.
    output_dir: str = "runs"
    # The start of a new run directory's name: <output_dir>/<name>-<YYYYmmdd-HHMMSS>.
    name: str = "run"
    # A fixed run directory (absolute, or under output_dir); None = <output_dir>/<name>-<timestamp>.
    dir: Optional[str] = None
    # Seeds the trainer (TrainingArguments seed: data order, dropout) and an inline model's random weights.
    # A rerun into a started run directory must keep it; dpo.init_from an SFT run directory takes that run's.
    seed: int = 42
    report_to: str = "none"  # none | wandb | tensorboard
    wandb_project: str = "mistral-align"  # report_to=wandb: the project (WANDB_PROJECT)
    wandb_entity: Optional[str] = None  # report_to=wandb: the team or user (WANDB_ENTITY); None: the login's default
    # auto: online when WANDB_API_KEY is set and the wandb server answers (3 s), offline otherwise (a
    # warning says so when a key is set); online: refused at start when the server cannot be reached.
    wandb_mode: str = "auto"
    # Rerunning with the same run.dir: auto = continue from the newest complete checkpoint of the
    # unfinished stage; never = start the stage from step 0; or the path of a checkpoint to resume.
    resume: str = "auto"
    # Continue a run directory even though settings that change training differ from its config.yaml.
    allow_config_change: bool = False
    # Seconds any collective (all-reduce, barrier, broadcast) may wait for the other ranks before the
    # run ends with `error: lost contact with rank N ...` (a node died or hangs), instead of waiting
    # for torch's default (30 minutes on gloo). It also bounds how long one rank may work alone while
    # the others wait (rank 0 tokenising a large data set, generating for the eval): raise it for those.
    dist_timeout_s: int = 600
    # Threads torch computes with on the CPU (per process); None: torch's default (one per core). A
    # float sum split among another number of threads rounds differently, so a CPU run trains slightly
    # different weights on a machine with another core count: a fixed count makes it repeat exactly
    # (given the same torch and CPU kind). Capped, with a warning, at the cores the process may use.
    cpu_threads: Optional[int] = None


def check_run(r: Any) -> None:
    choice(r.report_to, "run.report_to", REPORT_TO)
    choice(r.wandb_mode, "run.wandb_mode", WANDB_MODES)
    at_least(r.dist_timeout_s, "run.dist_timeout_s", 0, strict=True)
    if r.cpu_threads is not None:
        at_least(r.cpu_threads, "run.cpu_threads", 1)
    if r.resume not in ("auto", "never") and not os.path.isdir(os.path.expanduser(r.resume)):
        raise ConfigError(f"run.resume: must be auto, never or a checkpoint folder; {r.resume} is none of these")


@dataclass
class HubConfig:
    """Push the final adapter to the Hugging Face Hub when the run finishes (main process only).
    The token comes from HF_TOKEN or the stored login and is written nowhere. The same push, by hand:
    `mistral-align push RUN_DIR --repo-id OWNER/NAME`."""

    # Push the last stage's adapter (peft=none: its model) to repo_id when training has finished; needs repo_id.
    push: bool = False
    repo_id: Optional[str] = None  # OWNER/NAME
    private: bool = False  # create the repository private (one that exists keeps its visibility)
    revision: Optional[str] = None  # a branch, created if missing
    license: str = "apache-2.0"  # the model card's `license:` (a Hub license id, written as given)


def check_hub(h: Any) -> None:
    if h.push and not REPO_ID.fullmatch(h.repo_id or ""):
        raise ConfigError(f"hub.repo_id: hub.push=true needs OWNER/NAME, got {h.repo_id!r}")
