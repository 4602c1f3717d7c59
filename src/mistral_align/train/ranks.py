"""What many processes (and many nodes) need beyond what accelerate and the Trainer do.

    PartialState(**process_group_kwargs(cfg.run.dist_timeout_s))   # train/process.py: collectives time out
    remember_run(run_dir, state, cfg.run.dist_timeout_s)           # open_run: every rank's host
    num_nodes(), run_hosts()                                       # the manifest
    exit_if_peer_lost(exc)          # entry points: a lost or hung rank ends the others in one line
    check_ranks_agree(trainer)      # after training: one model, not one per rank

On GPUs the timeout reaches NCCL too, but there NCCL's watchdog ends the process itself (with its own
message) when a collective times out; the one-line message is what gloo (the CPU) and the rendezvous
store get.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import sys
from typing import Any

from mistral_align.errors import EXIT_PEER_LOST
from mistral_align.rundir.lock import release_lock

# -- how long a collective may wait -----------------------------------------------------------------


def process_group_kwargs(timeout_s: float | None) -> dict[str, Any]:
    """Keywords for torch.distributed.init_process_group (through accelerate's PartialState): the
    timeout after which a collective whose peer is gone or hung raises instead of waiting (gloo's
    default is 30 minutes). Only the first creation of the process group counts."""
    return {"timeout": _dt.timedelta(seconds=float(timeout_s))} if timeout_s else {}


# -- who is where ----------------------------------------------------------------------------------


def num_nodes() -> int:
    """Nodes in this run: torchrun's (hence `accelerate launch --num_machines N`'s) count of node
    agents, GROUP_WORLD_SIZE; else what a scheduler says (NUM_NODES, SLURM_NNODES); else 1."""
    for name in ("GROUP_WORLD_SIZE", "NUM_NODES", "SLURM_NNODES"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


# What a rank needs to say, in one line, which peer it lost and how to resume; set by open_run.
_RUN: dict[str, Any] = {}


def remember_run(run_dir, state, timeout_s: float | None = None) -> None:
    """Record the run directory and every rank's host (one all-gather at start), for the manifest and
    for lost_peer_message."""
    hosts = [platform.node()]
    if state.num_processes > 1:
        import torch.distributed as dist

        hosts = [None] * state.num_processes
        dist.all_gather_object(hosts, platform.node())
    _RUN.update(dir=str(run_dir), hosts=hosts, rank=state.process_index, world=state.num_processes,
                timeout_s=timeout_s)


def run_hosts() -> dict[str, list[int]]:
    """{host: [its ranks]} as gathered by remember_run (this process alone before it)."""
    out: dict[str, list[int]] = {}
    for rank, host in enumerate(_RUN.get("hosts") or [platform.node()]):
        out.setdefault(host, []).append(rank)
    return out


# -- a lost or hung rank ends the others in one line -----------------------------------------------

# What torch.distributed's backends say when a peer is gone (its sockets closed: killed, crashed, node
# down) or silent past the timeout (hung, stopped, partitioned). gloo raises a plain RuntimeError,
# often from inside backward (DDP's all-reduce); NCCL and the rendezvous store raise DistError types.
_PEER_GONE = re.compile(r"Connection (reset|closed) by peer|Broken pipe|Connection refused|communicator was aborted")
_PEER_SILENT = re.compile(r"timed out|Socket Timeout|collective operation timeout", re.I)
_BACKEND = re.compile(r"gloo|nccl|ProcessGroup|c10d|TCPStore", re.I)


def _distributed_error(exc: BaseException) -> BaseException | None:
    """`exc`, or an exception it was raised from, that a collective raised because a peer is lost."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    seen = exc
    while seen is not None:
        text = str(seen)
        if isinstance(seen, (dist.DistNetworkError, dist.DistStoreError)):
            return seen  # the rendezvous store (on node 0) is gone or silent
        if isinstance(seen, RuntimeError) and _BACKEND.search(text) and (_PEER_GONE.search(text)
                                                                         or _PEER_SILENT.search(text)):
            return seen  # a collective (DistBackendError is a RuntimeError too)
        seen = seen.__cause__ or seen.__context__
    return None


def _backend_said(exc: BaseException) -> str:
    """The backend's own words, short: its first line without the source position and advice."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", text)
    return text.split(" This is typically caused")[0].rstrip(". ")[:240]


def lost_peer_message(exc: BaseException) -> str | None:
    """One line naming the rank (and host) that this rank lost and how to resume, when `exc` is a
    collective failing because a peer died or hung; None for any other exception."""
    import platform

    err = _distributed_error(exc)
    if err is None:
        return None
    hosts, rank, world = _RUN.get("hosts") or [], _RUN.get("rank"), _RUN.get("world", 0)
    me = f"rank {rank} on {platform.node()}" if rank is not None else f"this rank on {platform.node()}"
    if world == 2 and rank in (0, 1) and len(hosts) == 2:
        peer = f"rank {1 - rank} on {hosts[1 - rank]}"  # two ranks: the lost one is the other
    else:
        peer = "another rank"  # the backend's message below names its address
    said = _backend_said(err)
    if _PEER_SILENT.search(str(err)) and not _PEER_GONE.search(str(err)):
        limit = _RUN.get("timeout_s")
        lost = f"{peer} did not answer {me} within run.dist_timeout_s={limit:g} s (hung, stopped or unreachable)" \
            if limit else f"{peer} did not answer {me} in time (hung, stopped or unreachable)"
    else:
        lost = f"{me} lost contact with {peer} (its process or node is gone)"
    resume = (f"to resume from the newest complete checkpoint, run the same command again on every node with "
              f"run.dir={_RUN['dir']}") if _RUN.get("dir") else "rerun the same command on every node"
    return f"{lost}: {said}. The run stopped; {resume}"


def exit_if_peer_lost(exc: BaseException) -> None:
    """Entry points: end this process in one line (`error: ...`, exit EXIT_PEER_LOST) when `exc` means
    another rank is gone or hung; return (and let the caller re-raise) otherwise.

    os._exit, not sys.exit: with a peer gone, interpreter shutdown can block in the process group's
    teardown, which is the hang this is here to avoid. So the run lock is released here first."""
    message = lost_peer_message(exc)
    if message is None:
        return
    # On a line of its own: a progress bar may have left the cursor mid-line.
    print(f"\nerror: {message}", file=sys.stderr, flush=True)
    if _RUN.get("dir") and _RUN.get("rank") == 0:
        release_lock(_RUN["dir"])
    sys.stdout.flush()
    os._exit(EXIT_PEER_LOST)


# -- after training: every rank holds the same model -------------------------------------------------


def trainable_checksum(model) -> float:
    """A float64 sum over every trainable value: equal on ranks that hold the same weights."""
    return float(sum(p.detach().double().sum() for p in model.parameters() if p.requires_grad))


def check_ranks_agree(trainer) -> None:
    """After training under DDP, every rank must hold the same trainable weights: the check that
    catches any route to ranks that each trained alone (an evaluation before training once left the
    model unwrapped: no DDP, each rank trained its own copy)."""
    import torch

    accelerator = trainer.accelerator
    # Under FSDP or DeepSpeed each rank holds a shard, so checksums differ by design.
    if accelerator.num_processes <= 1 or accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
        return
    mine = torch.tensor([trainable_checksum(accelerator.unwrap_model(trainer.model))], dtype=torch.float64,
                        device=accelerator.device)  # fmt: skip
    every = accelerator.gather(mine).tolist()
    if any(abs(x - every[0]) > 1e-9 * max(1.0, abs(every[0])) for x in every):
        raise RuntimeError(
            f"the {accelerator.num_processes} processes ended with different trainable weights "
            f"(checksums {every}): they did not train as one data-parallel model"
        )
