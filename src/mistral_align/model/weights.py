"""Weight files checked before a model loads: a copy cut short is named, not loaded.

    safetensors_problem(path)   why a .safetensors file cannot load (truncated, not safetensors), or None
    adapter_problem(folder)     the same for a peft adapter folder (adapter_config.json + weights)
    model_problem(folder)       the same for a model folder (config.json + *.safetensors: a full fine-tune)

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON header naming every
tensor's [begin, end) offsets in the data that follows, then the data. Reading the header alone is
enough to tell a copy cut short from a whole one, without loading anything.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

# safetensors refuses headers larger than this (its MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000


def _data_end(header: dict) -> int | None:
    """The end of the data the header describes, or None when the header is not a safetensors one."""
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return None
        end = max(end, offsets[1])
    return end


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not a whole safetensors file (a reason to show after its name), or None."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        return f"only {size} bytes: not a safetensors file (truncated?)"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        start = f.read(1)  # a header is a JSON object: anything else is another kind of file
        if not 2 <= n <= MAX_HEADER_BYTES or start not in (b"{", b""):
            return "not a safetensors file (it does not start with a safetensors header)"
        if 8 + n > size:
            return f"truncated: {size} bytes, but its header alone needs {8 + n}"
        try:
            header = json.loads(start + f.read(n - 1))
        except (ValueError, UnicodeDecodeError):
            return "not a safetensors file (its header is not valid JSON)"
    end = _data_end(header) if isinstance(header, dict) else None
    if end is None:
        return "not a safetensors file (its header names no tensor offsets)"
    expected = 8 + n + end
    if size < expected:
        return f"truncated: {size} bytes, but its header describes {expected}"
    if size > expected:
        return f"corrupt: {size} bytes, {size - expected} more than its header describes"
    return None


def _json_object_problem(config: Path) -> tuple[Path, str] | None:
    try:
        if not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
            return config, "not a JSON object"
    except (OSError, ValueError) as e:
        return config, f"cannot be read as JSON ({e})"
    return None


def adapter_problem(folder: str | os.PathLike) -> tuple[Path, str] | None:
    """(the bad file, why) for a local peft adapter folder that cannot load, or None."""
    folder = Path(folder)
    bad = _json_object_problem(folder / "adapter_config.json")
    if bad:
        return bad
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            return None  # an old pickled adapter: peft reads it, and we cannot check it cheaply
        return weights, "is missing (the adapter folder holds no weights)"
    problem = safetensors_problem(weights)
    return (weights, problem) if problem else None


def model_problem(folder: str | os.PathLike) -> tuple[Path, str] | None:
    """(the bad file, why) for a local model folder (config.json, safetensors weights) that cannot load,
    or None. A folder whose weights are only pickles is left to `trust.require_safetensors`."""
    folder = Path(folder)
    bad = _json_object_problem(folder / "config.json")
    if bad:
        return bad
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not any(folder.glob("*.bin")):
        return folder, "holds no weights (no *.safetensors)"
    for path in weights:
        problem = safetensors_problem(path)
        if problem:
            return path, problem
    return None
