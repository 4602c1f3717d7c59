"""Which tokenizer file a run encodes with: the model repository's own, where there is one.

    source = resolve_tokenizer_file(cfg.model)        # TokenizerSource: path, sha256, where from
    encoder = get_encoder(cfg.model.tokenizer_version, source.path)

- `model.tokenizer_file` set: that file.
- A Hub model (`model.hub_id` a repository id): the repository's own tokenizer file (`tekken.json`,
  `tokenizer.model.v3`, ...), chosen and fetched by mistral-common's own
  `download_tokenizer_from_hf_hub` (huggingface_hub's cache; HF_TOKEN or the stored login for
  gated repositories; HF_HUB_OFFLINE=1 reads the cache only). A `hub_id` that is a local model
  folder: the tokenizer file in it, chosen by the same rule.
- An inline model, or a Hub model whose file cannot be had (offline and not cached, no such file,
  no access): the file mistral-common ships for the version, or the one derived from it
  (chat/tekken_files.py); for a Hub model that fallback is said in one warning line, because the
  ids of ordinary text may then differ from the model's own vocabulary.

A file of another version than `model.tokenizer_version` is refused in one line naming both.

This lives in model/ because the file belongs to the model repository (like its config.json and
weights, which model/load.py fetches); chat/ only encodes with the file it is given and never
talks to the Hub.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from mistral_align.chat.encoder import TokenizerFileError, load_mistral_tokenizer, tokenizer_file
from mistral_align.errors import ConfigError

log = logging.getLogger("mistral_align")


@dataclass(frozen=True)
class TokenizerSource:
    path: Path
    sha256: str
    origin: str  # "hub:OWNER/NAME@REVISION", "folder:PATH", "file:PATH", "mistral-common", "derived"
    fallback: bool = False  # a Hub model's own file could not be had
    note: str | None = None  # why not, as the one warning line resolve_tokenizer_file says

    @property
    def own_file(self) -> bool:
        """Whether this is the model's own file (not mistral-common's shipped or derived one)."""
        return self.origin.split(":", 1)[0] in ("hub", "folder", "file")

    def facts(self) -> dict[str, Any]:
        """For manifest.json."""
        return {"file": self.path.name, "sha256": self.sha256, "origin": self.origin, "fallback": self.fallback}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _builtin(version: str) -> TokenizerSource:
    from mistral_align.names import DERIVED_TOKENIZER_VERSIONS

    path = tokenizer_file(version)
    return TokenizerSource(path, _sha256(path), "derived" if version in DERIVED_TOKENIZER_VERSIONS else "mistral-common")


def _in_folder(folder: Path) -> Path:
    from mistral_common.tokens.tokenizers.utils import get_one_valid_tokenizer_file

    return folder / get_one_valid_tokenizer_file(sorted(os.listdir(folder)))


def _download(repo_id: str, revision: str | None) -> Path:
    # Imported here: huggingface_hub is only needed for a Hub model, and chat/ never imports it.
    from mistral_common.tokens.tokenizers.utils import download_tokenizer_from_hf_hub

    return Path(download_tokenizer_from_hf_hub(repo_id, revision=revision))


def _checked(source: TokenizerSource, version: str) -> TokenizerSource:
    try:
        load_mistral_tokenizer(version, source.path)
    except TokenizerFileError as e:
        hint = "set model.tokenizer_version to the file's version" if "is a tokenizer" in str(e) else \
            "set model.tokenizer_file to a tekken.json or tokenizer.model.vN file"
        raise ConfigError(f"model.tokenizer_version: {e} ({source.origin}); {hint}") from None
    return source


_warned: set[TokenizerSource] = set()


def resolve_tokenizer_file(model_cfg: Any, warn: bool = True) -> TokenizerSource:
    """The tokenizer file for the model node (see the module docstring); cached, so a pipeline's
    second stage neither fetches nor warns again. `warn`: say a fallback (the main process does;
    the other ranks find the same and stay quiet, so a run says it once)."""
    source = _resolve(str(model_cfg.tokenizer_version), getattr(model_cfg, "tokenizer_file", None),
                      model_cfg.hub_id if model_cfg.architecture is None else None, model_cfg.revision)
    if source.note and warn and source not in _warned:
        _warned.add(source)
        log.warning("%s", source.note)
    return source


@lru_cache(maxsize=None)
def _resolve(version: str, explicit: str | None, hub_id: str | None, revision: str | None) -> TokenizerSource:
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.tokenizer_file: {explicit}: no such file")
        return _checked(TokenizerSource(path.absolute(), _sha256(path), f"file:{path.absolute()}"), version)
    if hub_id is None:
        return _builtin(version)
    folder = Path(hub_id).expanduser()
    try:
        if folder.is_dir():
            path, origin = _in_folder(folder), f"folder:{folder.absolute()}"
        else:
            path, origin = _download(hub_id, revision), f"hub:{hub_id}@{revision or 'main'}"
    except _unavailable() as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        builtin = _builtin(version)
        described = ("mistral-common's own" if builtin.origin == "mistral-common"
                     else "the one derived from mistral-common's Nemo tekken file for")
        note = (f"model: {hub_id}'s own tokenizer file could not be had ({reason}); encoding with {described} "
                f"{version} file ({builtin.path.name}) instead, whose ids of ordinary text may differ from the "
                "model's (model.tokenizer_file names a local copy)")
        return replace(builtin, fallback=True, note=note)
    return _checked(TokenizerSource(path.absolute(), _sha256(path), origin), version)


def _unavailable() -> tuple[type[BaseException], ...]:
    """What fetching a repository's tokenizer file raises when it cannot be had: offline and not
    cached, no such repository or file, no access (a gated repository without a token)."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import httpx
    from mistral_common.exceptions import MistralCommonException

    return OSError, ValueError, MistralCommonException, HfHubHTTPError, httpx.HTTPError
