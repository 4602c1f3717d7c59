"""What may run when weights load: safetensors only unless pickles are allowed, and never a
repository's own Python code unless `trust_remote_code` is asked for."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mistral_align.errors import UntrustedFileError
from mistral_align.names import PICKLE_SUFFIXES


def require_safetensors(folder: str | os.PathLike, what: str, allow_pickle: bool = False,
                        how_to_allow: str = "model.allow_pickle=true") -> None:
    """A local weights folder must hold safetensors: one whose weights are only pickles is refused
    (UntrustedFileError) unless `allow_pickle`. Not a folder (a Hub id): nothing to look at here."""
    folder = Path(folder)
    if allow_pickle or not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UntrustedFileError(
            f"{folder}: the {what} weights are only pickles ({', '.join(pickles)}), which can run code when loaded; "
            f"re-save them as safetensors, or pass {how_to_allow} if you trust where they came from"
        )


def weights_kwargs(allow_pickle: bool = False) -> dict[str, Any]:
    """from_pretrained keywords: safetensors only unless pickles are allowed, and never the repository's
    own Python code (a config.json with `auto_map` would otherwise import it)."""
    return {"use_safetensors": None if allow_pickle else True, "trust_remote_code": False}


def load_config(source: str, revision: str | None = None, trust_remote_code: bool = False,
                how_to_allow: str = "mistral-align loads the stock Mistral / Mixtral classes only"):
    """AutoConfig for `source`; one whose config.json names the repository's own code (`auto_map`) is
    refused (UntrustedFileError) unless `trust_remote_code`: that code would run on loading."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if trust_remote_code or "trust_remote_code" not in str(e):
            raise
        raise UntrustedFileError(
            f"{source}: its config.json asks to run the repository's own Python code (auto_map); {how_to_allow}"
        ) from None
