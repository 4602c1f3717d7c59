"""What every recipe does around its stages: open the run, then finish it.

    run = open_run(cfg, "sft", stages=("sft",))   # check the config, start the process group,
                                                   # log once, pick the run directory, take its
                                                   # lock, write config.yaml and the manifest's facts
    summary = run_stage(SFTStage(cfg, run))         # train/stage.py
    finish_run(run, summary, "SFT tiny-mistral")    # loss.png, summary.json, push, close the process group
"""

from __future__ import annotations

import atexit
import datetime as _dt
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list

from mistral_align.errors import HubError, RunDirError, UserError
from mistral_align.files import write_json
from mistral_align.hub.push import push_run
from mistral_align.rundir.drift import check_same_training
from mistral_align.rundir.layout import resolve_run_dir, write_resolved_config
from mistral_align.rundir.lock import acquire_lock, release_lock
from mistral_align.rundir.manifest import command_facts, git_commit, lift_stage_facts, versions, write_manifest
from mistral_align.train.metrics import plot_loss
from mistral_align.train.preflight import check_recipe
from mistral_align.train.process import check_machine_has_what_the_config_asks, init_state, setup_logging
from mistral_align.train.ranks import num_nodes, remember_run, run_hosts

log = logging.getLogger("mistral_align")


@dataclass
class Run:
    cfg: Any
    dir: Path
    state: Any  # accelerate.PartialState
    recipe: str
    stages: tuple[str, ...]
    t0: float = field(default_factory=time.time)

    def write_config(self) -> None:
        """(Re)write config.yaml (main process only): the resolved config of the stages this run trains."""
        if self.state.is_main_process:
            write_resolved_config(self.dir, self.cfg, self.stages)

    def record(self, facts: dict, section: str | None = None) -> None:
        """Merge `facts` into manifest.json (main process only), under `section` for one stage of a pipeline."""
        if self.state.is_main_process:
            write_manifest(self.dir, facts, section)

    def lift_stage_facts(self, section: str) -> None:
        """A pipeline: the model facts its `section` stage recorded, at the top of the manifest too,
        where a single-stage run keeps them (main process only)."""
        if self.state.is_main_process:
            lift_stage_facts(self.dir, section)


def open_checks(run_dir: Path, cfg: Any, stages: tuple[str, ...], recipe: str, state) -> None:
    """Main process: take the lock and compare configs; every rank raises the same RunDirError."""
    message = [None]
    if state.is_main_process:
        try:
            acquire_lock(run_dir)
            atexit.register(release_lock, run_dir)
            check_same_training(run_dir, cfg, stages, recipe)
        except RunDirError as e:
            if not str(e).startswith(f"{run_dir} is in use"):
                release_lock(run_dir)
            message = [str(e)]
    if state.num_processes > 1:
        broadcast_object_list(message, from_process=0)
    if message[0]:
        raise RunDirError(message[0])


def base_manifest(stage: str, state) -> dict[str, Any]:
    """The parts of the manifest every stage shares: versions, git, world, command, start time."""
    import torch

    return {
        "stage": stage,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        **command_facts(),
        "versions": versions(),
        "git": git_commit(),
        "world_size": state.num_processes,
        "num_nodes": num_nodes(),
        "hosts": run_hosts(),
        "distributed_type": str(state.distributed_type).split(".")[-1],
        "device": str(state.device),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cpu_threads": torch.get_num_threads(),  # CPU results depend on it (run.cpu_threads)
        "host": platform.node(),
    }


def set_cpu_threads(wanted: int | None) -> None:
    """run.cpu_threads: torch's CPU thread count, at most the cores this process may run on."""
    if wanted is None:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if wanted > cores:
        log.warning("run.cpu_threads=%d, but this process may use %d core(s): using %d, so CPU results will "
                    "differ slightly from a %d-thread run", wanted, cores, cores, wanted)
    torch.set_num_threads(min(wanted, cores))


def open_run(cfg, recipe: str, stages: tuple[str, ...]) -> Run:
    """Check the config and the data files, start this process, and open the run directory every rank shares."""
    check_recipe(cfg, recipe, stages)  # the recipe has done it before importing this module; it is quick
    check_machine_has_what_the_config_asks(cfg, stages)
    state = init_state(cfg.run.dist_timeout_s)
    setup_logging(state)
    set_cpu_threads(cfg.run.cpu_threads)
    run_dir = resolve_run_dir(cfg.run, state)
    remember_run(run_dir, state, cfg.run.dist_timeout_s)  # every rank's host, to name a lost one
    log.info("run directory: %s (world size %d, %d nodes)", run_dir, state.num_processes, num_nodes())
    # One launch per run directory; a rerun must train what the run directory started (rundir/drift.py).
    open_checks(run_dir, cfg, stages, recipe, state)
    run = Run(cfg, run_dir, state, recipe, stages)
    run.write_config()
    run.record(base_manifest(recipe, state))
    return run


def finish_run(run: Run, summary: dict, title: str) -> dict:
    """Loss plot and summary.json (main process), then close the process group cleanly."""
    if run.state.is_main_process:
        plot_loss(run.dir / "metrics.jsonl", run.dir / "loss.png", title=title)
        summary["wall_seconds"] = round(time.time() - run.t0, 1)
        write_json(run.dir / "summary.json", summary)
    run.record({"summary": "summary.json", "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    log.info("done in %.0fs: %s", time.time() - run.t0, run.dir)
    if run.cfg.hub.push and run.state.is_main_process:
        push_finished_run(run)
    run.state.wait_for_everyone()
    # Without this, a rank can abort at interpreter exit ("terminate called without an active
    # exception") while gloo's threads are still up, and the launcher reports the run as failed.
    run.state.destroy_process_group()
    if run.state.is_main_process:
        release_lock(run.dir)
    return summary


def push_finished_run(run: Run) -> None:
    """hub.push=true: the final adapter of the last stage, as `mistral-align push` would send it."""
    h = run.cfg.hub
    try:
        result = push_run(run.dir, h.repo_id, private=h.private, revision=h.revision, license=h.license)
    except UserError as e:
        raise HubError(f"training finished in {run.dir}, but the push failed: {e} (push again with: "
                       f"mistral-align push {run.dir} --repo-id {h.repo_id})") from None
    log.info("pushed %d files to %s", len(result.files), result.commit_url or h.repo_id)
