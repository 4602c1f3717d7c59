"""Reading a finished run directory (or a merged model folder) for push, merge, export and chat.

    src = resolve_source("runs/demo", stage=None)   # RunSource: adapter dir, base, quant, version
    src = resolve_source("merged/")                 # a plain transformers folder: adapter_dir None

A single-stage run holds `adapter/`; a pipeline run `sft/adapter/` and `dpo/adapter/` (the last
stage, dpo, unless `stage` says otherwise). The base is what `adapter_config.json` names
(`base_model_name_or_path`: a Hub id, or the run's own `base/` folder for an inline model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mistral_align.chat.hf_tokenizer import native_file
from mistral_align.errors import RunDirError
from mistral_align.model.trust import require_safetensors
from mistral_align.names import STAGES


@dataclass
class RunSource:
    path: Path  # the run dir or merged folder given
    kind: str  # "run" | "merged"
    adapter_dir: Optional[Path] = None
    stage: Optional[str] = None  # "sft" | "dpo" | None (single-stage run: the config's stage)
    base: Optional[str] = None  # Hub id or absolute folder
    revision: Optional[str] = None
    quant: dict = field(default_factory=dict)  # the run's quant node ({} for merged)
    config: dict = field(default_factory=dict)  # the run's resolved config ({} for merged)
    tokenizer_version: Optional[str] = None
    # The tokenizer file the run encoded with (the adapter's copy, else the run's tokenizer/; a merged
    # folder's own); None where there is none (then mistral-common's own file for the version).
    tokenizer_file: Optional[Path] = None
    stage_dir: Optional[Path] = None  # where this stage's summary.json lives
    allow_pickle: bool = False  # weights may be loaded from pickles (--allow-pickle); else safetensors only

    @property
    def quant_mode(self) -> str:
        return str(self.quant.get("mode", "none")) if self.quant else "none"

    @property
    def is_inline(self) -> bool:
        return self.base is not None and Path(self.base).is_dir()


def read_config(run_dir: Path) -> dict:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def _tokenizer_version(folder: Path) -> Optional[str]:
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        v = json.loads(cfg.read_text(encoding="utf-8")).get("mistral_tokenizer_version")
        if v:
            return v
    return None


def resolve_source(path: str | Path, stage: str | None = None, allow_pickle: bool = False) -> RunSource:
    """The run (adapter + base) or merged folder at `path`. Weights must be safetensors: a folder whose
    adapter, base or model weights are only pickles is refused (UntrustedFileError) unless `allow_pickle`."""
    src = _resolve(path, stage)
    src.allow_pickle = allow_pickle
    _check_weights(src)
    return src


def _check_weights(src: RunSource) -> None:
    if src.kind == "merged":
        require_safetensors(src.path, "merged model", src.allow_pickle, "--allow-pickle")
        return
    require_safetensors(src.adapter_dir, "adapter", src.allow_pickle, "--allow-pickle")
    if src.base and Path(src.base).is_dir():
        require_safetensors(src.base, "base model", src.allow_pickle, "--allow-pickle")


def _resolve(path: str | Path, stage: str | None) -> RunSource:
    p = Path(path)
    if not p.exists():
        raise RunDirError(f"{p}: no such directory")
    if not p.is_dir():
        raise RunDirError(f"{p}: not a directory (expected a run directory or a merged model folder)")
    p = p.absolute()
    if stage is not None and stage not in STAGES:
        raise RunDirError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}")

    # A merged (plain transformers) folder.
    if (p / "config.json").is_file() and not (p / "adapter").exists() and not any((p / s / "adapter").exists() for s in STAGES):
        if stage is not None:
            raise RunDirError(f"{p}: a merged model folder has no stages; drop --stage")
        version = _tokenizer_version(p)
        return RunSource(path=p, kind="merged", tokenizer_version=version, tokenizer_file=_tokenizer_file(version, p))

    stages = [s for s in STAGES if (p / s / "adapter" / "adapter_config.json").is_file()]
    if (p / "adapter" / "adapter_config.json").is_file():
        config = read_config(p)
        run_stage = next((s for s in reversed(STAGES) if s in config), None)
        if stage is not None and stage != run_stage:
            raise RunDirError(f"{p}: a single-stage {run_stage or 'run'} directory has no {stage} stage")
        adapter, chosen, stage_dir = p / "adapter", run_stage, p
    elif stages:
        chosen = stage or stages[-1]
        if chosen not in stages:
            raise RunDirError(f"{p}: no {chosen}/adapter (stages here: {', '.join(stages)})")
        adapter, stage_dir = p / chosen / "adapter", p / chosen
        config = read_config(p) or read_config(stage_dir)
    else:
        if (p / "adapter").exists() or (p / "config.yaml").is_file():
            raise RunDirError(f"{p}: no finished adapter (adapter/adapter_config.json missing; did the run finish?)")
        raise RunDirError(f"{p}: neither a run directory (adapter/) nor a merged model folder (config.json)")

    acfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    base = acfg.get("base_model_name_or_path") or None
    model_node: dict[str, Any] = config.get("model") or {}
    if not base:
        # Adapters written before inline bases were kept name no base; the run's base/ still may.
        if (p / "base" / "config.json").is_file():
            base = str(p / "base")
        elif model_node.get("hub_id"):
            base = model_node["hub_id"]
        else:
            raise RunDirError(f"{adapter}/adapter_config.json names no base model and the run has no base/ folder")
    elif not Path(base).is_absolute() and (p / base / "config.json").is_file():
        base = str(p / base)
    version = model_node.get("tokenizer_version") or _tokenizer_version(adapter) or _tokenizer_version(p / "tokenizer")
    return RunSource(
        path=p, kind="run", adapter_dir=adapter, stage=chosen, base=base, revision=acfg.get("revision") or model_node.get("revision"),
        quant=config.get("quant") or {}, config=config, tokenizer_version=version, stage_dir=stage_dir,
        tokenizer_file=_tokenizer_file(version, adapter, stage_dir / "tokenizer", p / "tokenizer"),
    )


def _tokenizer_file(version: Optional[str], *folders: Path) -> Optional[Path]:
    """The first of `folders` that holds the tokenizer file of `version`, as the run saved it."""
    if version is None:
        return None
    return next((f for f in (native_file(d, version) for d in folders if d.is_dir()) if f is not None), None)
