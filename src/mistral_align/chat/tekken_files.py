"""Tekken tokenizer files for the versions mistral-common knows but does not ship a file for.

mistral-common 1.13 encodes v7, v11 and v13 conversations with tekken (the versions that the
2025 tekken models declare in their own `tekken.json`, as far as we know: v7 for
Mistral-Small-24B-Instruct-2501/2503, v11 for Mistral-Small-3.2-2506, v13 for Magistral-Small
2507/2509; not checkable offline), but its `data/` folder holds only two tekken files, both
version v3 (`tekken_240718.json`, Mistral-Nemo's; `tekken_240911.json`, Pixtral's). A file for a newer version is made here from `tekken_240718.json`: the same 150,000
vocabulary entries, the same pattern and sizes (131,072 ids, the first 1,000 reserved for special
tokens), `config.version` set to the new version and an explicit `special_tokens` list:

    ranks 0-19   the 20 tokens every tekken file has (`Tekkenizer.DEPRECATED_SPECIAL_TOKENS`:
                 <unk> <s> </s> [INST] [/INST] ... [SYSTEM_PROMPT] [/SYSTEM_PROMPT] [TOOL_CONTENT])
    ranks 32-33  [ARGS] [CALL_ID]        (v11 and v13: their tool-call encoders need them)
    ranks 34-35  [THINK] [/THINK]        (v13: reasoning models)
    other ranks  <SPECIAL_n> fillers, as mistral-common itself names them

This is the layout mistral-common's own test suite builds for these versions
(`tests/test_tekken.py::get_special_tokens`, plus the think pair). Nothing here changes how a
conversation without tools is laid out: that is decided by the instruct tokenizer class that
`MistralTokenizer.from_file` picks from `config.version`. The ids of ordinary text are those of
the Nemo vocabulary; a model whose own `tekken.json` has a different vocabulary needs that file.

Files are written once into a cache folder (`$MISTRAL_ALIGN_CACHE`, else
`~/.cache/mistral_align`), named by a digest of their recipe, atomically (safe for several ranks).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from mistral_align.files import write_text_atomic

SOURCE_FILE = "tekken_240718.json"  # Mistral-Nemo's tekken, shipped in mistral_common/data/

# our version name -> (mistral-common TokenizerVersion value, extra special tokens by rank)
DERIVED_VERSIONS: dict[str, tuple[str, dict[int, str]]] = {
    "v7-tekken": ("v7", {}),
    "v11": ("v11", {32: "[ARGS]", 33: "[CALL_ID]"}),
    "v13": ("v13", {32: "[ARGS]", 33: "[CALL_ID]", 34: "[THINK]", 35: "[/THINK]"}),
}


def special_tokens(version: str) -> list[dict]:
    """The `special_tokens` list written into the file for `version` (ranks 0 .. last defined)."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    _, extra = DERIVED_VERSIONS[version]
    tokens = [dict(t) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    for rank in range(len(tokens), max(extra, default=len(tokens) - 1) + 1):
        name = extra.get(rank, Tekkenizer.SPECIAL_TOKEN_TEMPLATE.format(id=rank))
        tokens.append({"rank": rank, "token_str": name, "is_control": True})
    for t in tokens:
        t["token_str"] = str(t["token_str"])  # SpecialTokens members are StrEnums: write plain strings
    return tokens


def _source_path() -> Path:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer._data_path() / SOURCE_FILE


def tekken_json(version: str) -> str:
    """The tekken file for `version`, as text (saved under a name that contains "tekken" and ends in
    .json, for mistral-common to recognise it)."""
    mc_version, _ = DERIVED_VERSIONS[version]
    data = json.loads(_source_path().read_text(encoding="utf-8"))
    data["config"]["version"] = mc_version
    data["special_tokens"] = special_tokens(version)
    return json.dumps(data, ensure_ascii=False)


def _cache_dir() -> Path:
    root = os.environ.get("MISTRAL_ALIGN_CACHE") or Path.home() / ".cache" / "mistral_align"
    return Path(root) / "tokenizers"


def derived_tekken_file(version: str) -> Path:
    """The cached tekken file for `version`, written on first use."""
    if version not in DERIVED_VERSIONS:
        raise ValueError(f"no derived tekken file for {version!r}")
    import mistral_common

    source = _source_path()
    recipe = json.dumps(
        [mistral_common.__version__, SOURCE_FILE, source.stat().st_size, DERIVED_VERSIONS[version][0], special_tokens(version)]
    )
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    name = f"tekken_{version}_{digest}.json"
    # An unwritable home (some clusters) falls back to a private folder in the temp directory.
    fallback = Path(tempfile.gettempdir()) / f"mistral_align-{os.getuid()}" / "tokenizers"
    for folder in (_cache_dir(), fallback):
        if (folder / name).is_file():
            return folder / name
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return write_text_atomic(folder / name, tekken_json(version))
        except OSError:
            if folder == fallback:
                raise
    raise AssertionError("unreachable")


