"""What every recipe does around its stages: open the run, then finish it.

    run = open_run(cfg, "sft", stages=("sft",))   # check the config, start the process group,
                                                   # log once, pick the run directory, write
                                                   # config.yaml and the manifest's shared facts
    summary = run_stage(SFTStage(cfg, run))         # train/stage.py
    finish_run(run, summary, "SFT tiny-mistral")    # loss.png, summary.json, close the process group
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mistral_align.config import STAGES, check_config
from mistral_align.errors import ConfigError, LaunchError
from mistral_align.train.callbacks import plot_loss
from mistral_align.train.distributed import num_nodes, process_group_kwargs, remember_run
from mistral_align.train.faults import open_checks, release_lock
from mistral_align.train.run_dir import base_manifest, resolve_run_dir, write_json, write_manifest, write_resolved_config

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
        """(Re)write config.yaml: the resolved config of the stages this run trains."""
        write_resolved_config(self.dir, self.cfg, self.stages)

    def record(self, facts: dict, section: str | None = None) -> None:
        """Merge `facts` into manifest.json (main process only), under `section` for one stage of a pipeline."""
        write_manifest(self.dir, facts, section)


def _gpu_only_launch(environ=os.environ) -> str | None:
    """What in this `accelerate launch` asks for GPUs, read from the environment its config file
    sets, or None. cpu_ddp.yaml is MULTI_GPU too (that is how accelerate starts DDP over gloo), but
    without mixed precision; the GPU configs (multi_gpu, multi_node) ask for bf16, which on the CPU
    the trainer would not use anyway."""
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "distributed_type FSDP"
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "distributed_type DEEPSPEED"
    precision = environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if int(environ.get("WORLD_SIZE", "1")) > 1 and precision in ("bf16", "fp16"):
        return f"multi-GPU DDP with mixed_precision {precision}"
    return None


def check_launch_fits_machine() -> None:
    """Refuse, in one line printed once, an accelerate config that needs GPUs on a machine without
    any: otherwise every one of its processes (8 in multi_gpu.yaml) loads data and a model and then
    fails with its own traceback."""
    import torch

    asks = _gpu_only_launch()
    if asks and not torch.cuda.is_available():
        raise LaunchError(
            f"this accelerate config asks for GPUs ({asks}), but torch finds no CUDA GPU on this machine; "
            "on the CPU, launch with --config_file configs/accelerate/cpu_ddp.yaml (DDP over gloo) or cpu.yaml"
        )


def check_machine_has_what_the_config_asks(cfg, stages: tuple[str, ...]) -> None:
    """Refuse, before anything loads, a setting this machine cannot run: Liger's kernels are Triton
    kernels for CUDA, in an optional package."""
    import importlib.util

    import torch

    for stage in stages:
        if not cfg[stage].train.use_liger_kernel:
            continue
        key = f"{stage}.train.use_liger_kernel"
        if importlib.util.find_spec("liger_kernel") is None:
            raise LaunchError(f"{key}: liger-kernel is not installed (pip install '.[gpu]' on a CUDA machine)")
        if not torch.cuda.is_available():
            raise LaunchError(f"{key}: Liger's kernels need a CUDA GPU, and torch finds none on this machine")


def init_state(dist_timeout_s: float | None = None):
    """accelerate's PartialState for this process (starts torch.distributed under `accelerate launch`).

    `accelerate launch --multi_gpu` (configs/accelerate/cpu_ddp.yaml) on a machine without GPUs starts
    N processes with torchrun, but accelerate only picks the CPU backend (MULTI_CPU over gloo) when told
    the run is on the CPU; without that every process would train alone. So: no CUDA and a
    WORLD_SIZE > 1 means CPU DDP (once check_launch_fits_machine has refused the GPU-only configs).

    The process group is created here, once, before the trainers' own Accelerator (which reuses it and
    ignores TrainingArguments.ddp_timeout): `dist_timeout_s` (run.dist_timeout_s) is the longest any
    collective waits for a lost or hung rank (train/distributed.py).
    """
    import torch
    from accelerate import PartialState

    check_launch_fits_machine()
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if cpu:
        os.environ["ACCELERATE_USE_CPU"] = "true"
    return PartialState(cpu=cpu, **process_group_kwargs(dist_timeout_s))


def setup_logging(state, level: int = logging.INFO) -> None:
    """Log once: the main process at `level`; other ranks only warnings (and silence HF libraries there)."""
    import warnings

    main = state.is_main_process
    # transformers 5 renamed gradient checkpointing to activation checkpointing; peft and TRL still
    # call the old names on every step, which would bury the run's own messages.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*gradient_checkpointing.*deprecated")
    logging.basicConfig(
        level=level if main else logging.WARNING,
        format=f"%(asctime)s [rank {state.process_index}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    if not main:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # "Loading weights" on every node's first process
        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()


def refuse_overrides_of_other_stages(stages: tuple[str, ...], recipe: str) -> None:
    """`dpo.beta=0.3` given to recipes/sft.py would silently do nothing: refuse it, naming the recipe."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):  # not launched through @hydra.main
        return
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        package = key.split("@", 1)[1] if "@" in key else key  # data@dpo.data=... targets dpo.data
        stage = package.split(".", 1)[0]
        if stage in STAGES and stage not in stages:
            runs = [f"recipes/{r}.py" for r in ("sft", "dpo", "sft_dpo") if stage in r.split("_")]
            raise ConfigError(
                f"{package}: recipes/{recipe}.py runs no {stage.upper()} stage; {' or '.join(runs)} does"
            )


def open_run(cfg, recipe: str, stages: tuple[str, ...]) -> Run:
    """Check the config, start this process, and open the run directory every rank shares."""
    refuse_overrides_of_other_stages(stages, recipe)
    check_config(cfg, stages)
    check_machine_has_what_the_config_asks(cfg, stages)
    state = init_state(cfg.run.dist_timeout_s)
    setup_logging(state)
    run_dir = resolve_run_dir(cfg.run, state)
    remember_run(run_dir, state, cfg.run.dist_timeout_s)  # every rank's host, to name a lost one
    log.info("run directory: %s (world size %d, %d nodes)", run_dir, state.num_processes, num_nodes())
    # One launch per run directory; a rerun must train what the run directory started (train/faults.py).
    open_checks(run_dir, cfg, stages, recipe, state)
    run = Run(cfg, run_dir, state, recipe, stages)
    run.write_config()
    write_manifest(run_dir, base_manifest(recipe, state))
    return run


def finish_run(run: Run, summary: dict, title: str) -> dict:
    """Loss plot and summary.json (main process), then close the process group cleanly."""
    if run.state.is_main_process:
        plot_loss(run.dir / "metrics.jsonl", run.dir / "loss.png", title=title)
        summary["wall_seconds"] = round(time.time() - run.t0, 1)
        write_json(run.dir / "summary.json", summary)
    write_manifest(run.dir, {"summary": "summary.json", "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
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
    from mistral_align.errors import HubError, UserError
    from mistral_align.hub.push import push_run

    h = run.cfg.hub
    try:
        result = push_run(run.dir, h.repo_id, private=h.private, revision=h.revision, license=h.license)
    except UserError as e:
        raise HubError(f"training finished in {run.dir}, but the push failed: {e} (push again with: "
                       f"mistral-align push {run.dir} --repo-id {h.repo_id})") from None
    log.info("pushed %d files to %s", len(result.files), result.commit_url or h.repo_id)


WANDB_DEFAULT_URL = "https://api.wandb.ai"
# How long the main process waits to learn whether the wandb server answers. Without this check a
# run with WANDB_API_KEY set and no network hangs about 90 s in wandb.init and then fails with a
# CommError traceback, after the model has loaded.
WANDB_PROBE_SECONDS = 3.0
_wandb_fallback_warned = False


def _probe_target(base_url: str) -> tuple[str, int]:
    """(host, port) that wandb's first connection goes to: the proxy for the URL's scheme when one
    is set and the host is not in NO_PROXY, else the server itself."""
    import urllib.parse
    import urllib.request

    url = urllib.parse.urlsplit(base_url)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return p.hostname or "", p.port or (443 if p.scheme == "https" else 80)
    return host, port


def wandb_unreachable(base_url: str, timeout: float = WANDB_PROBE_SECONDS) -> str | None:
    """Why the wandb server at `base_url` cannot be reached within `timeout` seconds, or None.

    One TCP connect, in a thread so that a slow DNS lookup is bounded by the same timeout."""
    import socket
    import threading

    host, port = _probe_target(base_url)
    if not host:
        return f"{base_url} names no host"
    result: list[str | None] = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{host}:{port}: {e.strerror or e}")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"{host}:{port}: no answer in {timeout:g} s"


def _wandb_mode(run_cfg: Any, is_main: bool) -> str:
    """auto: online with WANDB_API_KEY and a reachable server, else offline (one warning).
    online: refused at once, before the model loads, when the server cannot be reached."""
    global _wandb_fallback_warned
    mode = run_cfg.wandb_mode
    if mode == "offline" or (mode == "auto" and not os.environ.get("WANDB_API_KEY")):
        return "offline"
    if not is_main:  # only the main process reports to wandb; the others never connect
        return "online"
    base_url = os.environ.get("WANDB_BASE_URL") or WANDB_DEFAULT_URL
    problem = wandb_unreachable(base_url)
    if problem is None:
        return "online"
    if mode == "online":
        raise ConfigError(f"run.wandb_mode: 'online', but the wandb server {base_url} cannot be reached ({problem}); "
                          "use run.wandb_mode=offline (upload later with `wandb sync`) or auto")
    if not _wandb_fallback_warned:
        _wandb_fallback_warned = True
        log.warning("wandb: WANDB_API_KEY is set but %s cannot be reached (%s): logging offline into the run "
                    "directory instead; upload later with `wandb sync <run dir>/wandb/offline-run-*`", base_url, problem)
    return "offline"


def setup_tracking(run_cfg: Any, out_dir: Path, is_main: bool = True) -> list[str]:
    """Environment for the chosen tracker; returns TrainingArguments.report_to.

    wandb: online when WANDB_API_KEY is set and the server answers (or run.wandb_mode=online),
    otherwise offline into <out_dir>/wandb; run.wandb_mode=disabled or run.report_to=none turns it
    off. No key is ever written anywhere by this code.
    """
    if run_cfg.report_to == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(out_dir) / "tensorboard")
        return ["tensorboard"]
    if run_cfg.report_to == "wandb" and run_cfg.wandb_mode != "disabled":
        os.environ["WANDB_MODE"] = _wandb_mode(run_cfg, is_main)
        os.environ["WANDB_PROJECT"] = run_cfg.wandb_project
        os.environ["WANDB_DIR"] = str(out_dir)
        os.environ.setdefault("WANDB_SILENT", "true")
        if run_cfg.wandb_entity:
            os.environ["WANDB_ENTITY"] = run_cfg.wandb_entity
        return ["wandb"]
    if run_cfg.report_to == "wandb":
        os.environ["WANDB_MODE"] = "disabled"
    return ["none"]
