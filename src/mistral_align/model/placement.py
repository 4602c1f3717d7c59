"""Where a process puts its model: its whole copy on its own device, or wherever FSDP / DeepSpeed say.

Under `accelerate launch` every rank loads its own copy onto its own device (`device_map={"": device}`);
under FSDP / DeepSpeed ZeRO-3 the device map is left to them (None).
"""

from __future__ import annotations

import os
from typing import Any


def default_device_map() -> dict[str, Any] | None:
    """Each process's whole model on its own device; None under FSDP / DeepSpeed (they place it)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return None
    from accelerate import PartialState

    return {"": PartialState().device}
