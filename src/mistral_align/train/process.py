"""This process: is the launch possible on this machine, the process group, logging once.

    init_state(cfg.run.dist_timeout_s)   # accelerate's PartialState; CPU DDP over gloo when asked
    setup_logging(state)                 # the main process logs, the other ranks only warn
"""

from __future__ import annotations

import logging
import os

from mistral_align.errors import LaunchError
from mistral_align.train.ranks import process_group_kwargs


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
    collective waits for a lost or hung rank (train/ranks.py).
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
