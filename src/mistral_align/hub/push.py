"""Push a run's adapter (or fully fine-tuned model) to the Hugging Face Hub (or write exactly that folder: dry run).

    push_run("runs/demo", "me/demo-adapter")                      # create_repo(exist_ok) + upload_folder
    push_run("runs/demo", "me/demo-adapter", dry_run="out/")      # the folder only, no network

The folder: adapter_model.safetensors, adapter_config.json (base_model_name_or_path = the base's
Hub id), the exact tokenizer (save_hf_tokenizer), config.yaml (credentials scrubbed), loss.png,
summary.json, README.md (model card). A Mixtral adapter is uploaded in stock transformers' layout
(`write_stock_adapter`: the fused experts through peft `target_parameters`, rank 2r, the same
function), because the per-expert one it was trained as does not attach to stock
`MixtralForCausalLM`. A full fine-tune (peft=none) uploads the whole model instead: its safetensors,
config.json and generation_config.json, with a card saying `library_name: transformers`.
Nothing pickled is ever included, and the token (HF_TOKEN or the stored login, read by
huggingface_hub itself) is written nowhere; the folder is checked for its value before anything
is uploaded.

Re-running a push makes a new commit in the same repository (create_repo(exist_ok=True)); a
transient failure is retried, and a final failure names the step that failed.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import OmegaConf

from mistral_align.chat.hf_tokenizer import save_hf_tokenizer
from mistral_align.errors import HubError, RunDirError
from mistral_align.hub.card import render_card
from mistral_align.model.mixtral_unfused import has_per_expert_lora, write_stock_adapter
from mistral_align.names import PICKLE_SUFFIXES, REPO_ID
from mistral_align.redaction import redact
from mistral_align.rundir.finished import RunSource, resolve_source

log = logging.getLogger("mistral_align")


@dataclass
class PushResult:
    repo_id: str
    folder: Path
    files: list[str]
    commit_url: Optional[str] = None
    dry_run: bool = False


def hub_base_id(src: RunSource) -> str:
    """What adapter_config.json should name: the Hub id of the base (a local folder for an inline model)."""
    hub_id = (src.config.get("model") or {}).get("hub_id")
    if src.base and not Path(src.base).is_absolute():
        return src.base
    if hub_id:
        return hub_id
    return str(src.base)


# A full fine-tune's model folder, as uploaded: the weights (one file or shards and their index) and configs.
MODEL_FILES = ("*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json")


def _copy_model(model_dir: Path, out: Path) -> None:
    """A full fine-tune: the whole model's files."""
    if not any(model_dir.glob("*.safetensors")):
        raise RunDirError(f"{model_dir}: no *.safetensors weights; re-save the model as safetensors")
    for pattern in MODEL_FILES:
        for f in model_dir.glob(pattern):
            shutil.copyfile(f, out / f.name)


def _copy_adapter(src: RunSource, out: Path, base_id: str) -> int | None:
    """The adapter, naming the base by its Hub id; a per-expert Mixtral adapter in stock transformers'
    layout. Returns the uploaded rank when the adapter was converted, else None."""
    adapter = src.adapter_dir
    assert adapter is not None
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        if (adapter / "adapter_model.bin").is_file():
            raise RunDirError(f"{adapter}: only a pickled adapter_model.bin; re-save it as safetensors")
        raise RunDirError(f"{weights}: missing")
    with tempfile.TemporaryDirectory(prefix="mistral_align_stock_") as tmp:
        converted = has_per_expert_lora(adapter)
        if converted:
            adapter = write_stock_adapter(adapter, Path(tmp) / "stock")
        shutil.copyfile(adapter / "adapter_model.safetensors", out / "adapter_model.safetensors")
        acfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    acfg["base_model_name_or_path"] = base_id
    if src.revision:
        acfg["revision"] = src.revision
    (out / "adapter_config.json").write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return int(acfg["r"]) if converted else None


def build_folder(src: RunSource, repo_id: str, out: Path, license: str = "apache-2.0") -> list[str]:
    """Write the upload folder into `out` (created, must be empty); returns its files, sorted."""
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise RunDirError(f"{out}: exists and is not empty")
    base_id = hub_base_id(src)
    stock_rank = None
    if src.is_full:
        _copy_model(src.model_dir, out)
    else:
        stock_rank = _copy_adapter(src, out, base_id)
    save_hf_tokenizer(src.tokenizer_version, out, source=src.tokenizer_file)
    if src.config:
        (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(redact(src.config))), encoding="utf-8")
    for name in ("loss.png",):
        if (src.path / name).is_file():
            shutil.copyfile(src.path / name, out / name)
    summary = (src.stage_dir or src.path) / "summary.json"
    if not summary.is_file():
        summary = src.path / "summary.json"
    if summary.is_file():
        shutil.copyfile(summary, out / "summary.json")
    (out / "README.md").write_text(render_card(src, repo_id, base_id, license, stock_rank), encoding="utf-8")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    bad = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if bad:
        raise RunDirError(f"refusing to upload pickled files: {', '.join(bad)}")
    return files


def _token_value() -> Optional[str]:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # pragma: no cover - an old huggingface_hub
        return None


def check_no_token(folder: Path, token: Optional[str]) -> None:
    if not token:
        return
    needle = token.encode()
    for p in folder.rglob("*"):
        if p.is_file() and needle in p.read_bytes():
            raise HubError(f"{p.name} contains the Hub token; refusing to upload")


# What huggingface_hub's own backoff retries (utils/_http.py): a timeout, rate limiting, the server's errors.
RETRIED_STATUS = (408, 429, 500, 502, 503, 504)


def connection_errors() -> tuple[type[BaseException], ...]:
    """What a refused, reset, dropped or timed-out connection raises in the HTTP client huggingface_hub
    uses: httpx2 (huggingface_hub 2.x), httpx (1.x), requests (0.x). From each client's own hierarchy,
    the classes huggingface_hub's backoff retries (a timeout, a network error, a server that hung
    up), not every error it has: an unsupported URL is not a blip."""
    import importlib

    found: list[type[BaseException]] = [TimeoutError, ConnectionError]
    for client in ("httpx2", "httpx"):
        try:
            mod = importlib.import_module(client)
        except ImportError:
            continue
        found += [mod.TimeoutException, mod.NetworkError, mod.RemoteProtocolError]
    try:
        import requests
    except ImportError:
        pass
    else:
        found += [requests.ConnectionError, requests.Timeout]
    return tuple(found)


def _with_retries(what: str, fn: Callable[[], Any], tries: int, wait_s: float) -> Any:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    transient = connection_errors()
    last: BaseException | None = None
    for attempt in range(1, tries + 1):
        try:
            return fn()
        except RepositoryNotFoundError as e:  # wrong owner / no access: retrying will not help
            raise HubError(f"{what} failed: {_one_line(e)}") from None
        except OfflineModeIsEnabled:  # a ConnectionError, but a setting: retrying will not help
            raise HubError(f"{what}: HF_HUB_OFFLINE is set, and pushing needs the network; unset it") from None
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status in (401, 403):
                raise HubError(f"{what} failed: not authorised ({status}); check HF_TOKEN or `hf auth login`") from None
            if status is not None and status not in RETRIED_STATUS:  # 400, 404, 409...: the same again
                raise HubError(f"{what} failed: {_one_line(e)}") from None
            last = e
        except transient as e:  # a network blip: refused, reset, dropped or timed out
            last = e
        except OSError as e:  # not the network (a file that went away...): one line, no retry
            raise HubError(f"{what} failed: {_one_line(e)}") from None
        if attempt < tries:
            log.warning("%s failed (try %d of %d): %s; retrying", what, attempt, tries, _one_line(last))
            time.sleep(wait_s * attempt)
    raise HubError(f"{what} failed after {tries} tries: {_one_line(last)}; nothing partial is kept, rerun the same command")


def _one_line(e: BaseException | None) -> str:
    return " ".join(str(e).split())[:300] if e else "unknown error"


def push_run(
    run_dir: str | Path,
    repo_id: str,
    *,
    stage: str | None = None,
    private: bool = False,
    revision: str | None = None,
    dry_run: str | Path | None = None,
    license: str = "apache-2.0",
    commit_message: str | None = None,
    api: Any = None,
    tries: int = 3,
    retry_wait_s: float = 2.0,
) -> PushResult:
    """Push (or, with dry_run=DIR, only write) a run's adapter (or full model) folder. Main process only."""
    if not REPO_ID.fullmatch(repo_id or ""):
        raise RunDirError(f"--repo-id must look like OWNER/NAME, got {repo_id!r}")
    src = resolve_source(run_dir, stage)
    if src.kind != "run":
        raise RunDirError(f"{src.path}: a merged model folder; push takes a run directory")
    if not src.tokenizer_version:
        raise RunDirError(f"{src.path}: cannot tell the tokenizer version (config.yaml model.tokenizer_version)")
    if dry_run is not None:
        folder = Path(dry_run)
        files = build_folder(src, repo_id, folder, license)
        return PushResult(repo_id, folder, files, dry_run=True)

    from huggingface_hub import HfApi

    token = _token_value()
    if api is None:
        if not token:
            raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
        api = HfApi()  # reads HF_TOKEN / the stored login itself; the value is never passed around here
    tmp = Path(tempfile.mkdtemp(prefix="mistral_align_push_"))
    try:
        folder = tmp / "upload"
        files = build_folder(src, repo_id, folder, license)
        check_no_token(folder, token)
        _with_retries(f"create_repo {repo_id}", lambda: api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True), tries, retry_wait_s)
        if revision:
            _with_retries(f"create_branch {revision} of {repo_id}", lambda: api.create_branch(repo_id=repo_id, branch=revision, repo_type="model", exist_ok=True), tries, retry_wait_s)
        what = "model (full fine-tune)" if src.is_full else "adapter"
        message = commit_message or f"mistral-align: {src.stage + ' ' if src.stage else ''}{what} from {src.path.name}"
        info = _with_retries(
            f"upload_folder to {repo_id}" + (f"@{revision}" if revision else ""),
            lambda: api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision, commit_message=message),
            tries, retry_wait_s,
        )
        url = getattr(info, "commit_url", None) or (str(info) if info is not None else None)
        return PushResult(repo_id, folder, files, commit_url=url)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
