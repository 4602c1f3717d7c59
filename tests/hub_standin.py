"""Stand-ins for a Hub model repository, with no network: a model's own tekken.json (one whose ids
differ from the derived file's, so a test can tell which was used), a local folder holding it, and a
Hugging Face cache laid out as huggingface_hub writes one (read with HF_HUB_OFFLINE)."""

from __future__ import annotations

import json
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def own_tekken(path: Path, version: str) -> Path:
    """A tekken.json of `version` unlike the derived one: 1,024 ids reserved for special tokens
    instead of 1,000, so every text id is 24 higher (a layout real tekken files may have)."""
    from mistral_align.chat.encoder import tokenizer_file

    data = json.loads(tokenizer_file(version).read_text(encoding="utf-8"))
    data["config"]["default_num_special_tokens"] = 1024
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def hub_cache(cache: Path, repo_id: str, files: dict[str, Path | str]) -> Path:
    """A huggingface_hub cache holding `files` of `repo_id` at COMMIT, which refs/main points to."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for name, content in files.items():
        target = snapshot / name
        if isinstance(content, Path):
            target.write_bytes(content.read_bytes())
        else:
            target.write_text(content)
    return snapshot
