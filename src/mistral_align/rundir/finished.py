"""Reading a finished run directory (or a merged model folder) for push, merge, export and chat.

    src = resolve_source("runs/demo", stage=None)   # RunSource: adapter dir, base, quant, version
    src = resolve_source("merged/")                 # a plain transformers folder: adapter_dir None

A single-stage run holds `adapter/`; a pipeline run `sft/adapter/` and `dpo/adapter/` (the last
stage, dpo, unless `stage` says otherwise). The base is what `adapter_config.json` names
(`base_model_name_or_path`: a Hub id, or the run's own `base/` folder for an inline model).
A full fine-tune (peft=none) holds `model/` (or `sft/model/`, `dpo/model/`) instead: the whole
trained model (`model_dir`), with no adapter; its `base` is what it was fine-tuned from, for the card.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mistral_align.chat.hf_tokenizer import native_file
from mistral_align.errors import RunDirError
from mistral_align.model.trust import require_safetensors
from mistral_align.names import ADAPTER_FOLDER, FULL_MODEL_FOLDER, STAGES
from mistral_align.rundir.layout import trained_folder


@dataclass
class RunSource:
    path: Path  # the run dir or merged folder given
    kind: str  # "run" | "merged"
    adapter_dir: Optional[Path] = None  # a LoRA run's adapter folder
    model_dir: Optional[Path] = None  # a full fine-tune's whole model folder (instead of an adapter)
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
    def is_full(self) -> bool:
        """A full fine-tune: the trained weights are a whole model, not an adapter on a base."""
        return self.model_dir is not None

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
    if src.is_full:
        require_safetensors(src.model_dir, "model", src.allow_pickle, "--allow-pickle")
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
    if (p / "config.json").is_file() and not _trained(p) and not any(_trained(p / s) for s in STAGES):
        if stage is not None:
            raise RunDirError(f"{p}: a merged model folder has no stages; drop --stage")
        version = _tokenizer_version(p)
        return RunSource(path=p, kind="merged", tokenizer_version=version, tokenizer_file=_tokenizer_file(version, p))

    stages = [s for s in STAGES if _trained(p / s)]
    trained = _trained(p)
    if trained is not None:
        config = read_config(p)
        run_stage = next((s for s in reversed(STAGES) if s in config), None)
        if stage is not None and stage != run_stage:
            raise RunDirError(f"{p}: a single-stage {run_stage or 'run'} directory has no {stage} stage")
        chosen, stage_dir = run_stage, p
    elif stages:
        chosen = stage or stages[-1]
        if chosen not in stages:
            raise RunDirError(f"{p}: no {chosen}/adapter or {chosen}/model (stages here: {', '.join(stages)})")
        trained, stage_dir = _trained(p / chosen), p / chosen
        config = read_config(p) or read_config(stage_dir)
    else:
        if any((p / f).exists() for f in (ADAPTER_FOLDER, FULL_MODEL_FOLDER)) or (p / "config.yaml").is_file():
            raise RunDirError(f"{p}: no finished adapter or model (adapter/adapter_config.json or model/config.json "
                              "missing; did the run finish?)")
        raise RunDirError(f"{p}: neither a run directory (adapter/ or model/) nor a merged model folder (config.json)")
    model_node: dict[str, Any] = config.get("model") or {}
    version = model_node.get("tokenizer_version") or _tokenizer_version(trained) or _tokenizer_version(p / "tokenizer")
    found = dict(path=p, kind="run", stage=chosen, quant=config.get("quant") or {}, config=config,
                 tokenizer_version=version, stage_dir=stage_dir,
                 tokenizer_file=_tokenizer_file(version, trained, stage_dir / "tokenizer", p / "tokenizer"))
    if trained.name == FULL_MODEL_FOLDER:
        # What it was fine-tuned from, for the card: the Hub id, the inline base, or DPO's init_from.
        started = model_node.get("hub_id") or ((p / "base") if (p / "base" / "config.json").is_file() else None)
        started = started or (config.get("dpo") or {}).get("init_from")
        return RunSource(model_dir=trained, base=str(started) if started else None, revision=model_node.get("revision"),
                         **found)

    adapter = trained
    acfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    base = acfg.get("base_model_name_or_path") or None
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
    return RunSource(adapter_dir=adapter, base=base, revision=acfg.get("revision") or model_node.get("revision"), **found)


def _trained(stage_dir: Path) -> Optional[Path]:
    """The finished adapter/ (adapter_config.json) or model/ (config.json) of a stage directory, or None."""
    folder = trained_folder(stage_dir)
    if folder is None:
        return None
    marker = "adapter_config.json" if folder.name == ADAPTER_FOLDER else "config.json"
    return folder if (folder / marker).is_file() else None


def _tokenizer_file(version: Optional[str], *folders: Path) -> Optional[Path]:
    """The first of `folders` that holds the tokenizer file of `version`, as the run saved it."""
    if version is None:
        return None
    return next((f for f in (native_file(d, version) for d in folders if d.is_dir()) if f is not None), None)
