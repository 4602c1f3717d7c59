"""Credentials never leave the process: which keys name one, and blanking their values out.

Keys such as `hub_token`, `api_key`, `WANDB_API_KEY`, `password` name credentials; TRL's
`pad_token` / `eos_token` name tokenizer tokens and are not. Configs refuse credential keys
(schema/train.py); whatever is written (config.yaml, manifest.json, model cards, pushed folders)
goes through `redact` first.
"""

from __future__ import annotations

import re
from typing import Any

CREDENTIAL_KEY = re.compile(r"(^|[_-])(token|secret|password|passwd|api[_-]?key|auth)$", re.I)
TOKENIZER_TOKEN_KEYS = ("pad_token", "eos_token", "bos_token", "unk_token")
REDACTED = "<redacted>"


def is_credential_key(name: str) -> bool:
    return bool(CREDENTIAL_KEY.search(str(name))) and str(name) not in TOKENIZER_TOKEN_KEYS


def redact(obj: Any) -> Any:
    """Blank out values under keys that look like credentials (token, secret, password, api_key)."""
    if isinstance(obj, dict):
        return {k: (REDACTED if CREDENTIAL_KEY.search(str(k)) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj
