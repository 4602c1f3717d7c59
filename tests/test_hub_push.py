"""push: the dry-run folder, the model card, and the exact huggingface_hub calls (Hub mocked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from runfixtures import HELD_OUT, copy_run, load_trained

pytestmark = pytest.mark.slow

TOKEN = "hf_FAKEtokenVALUE0123456789abcdefXYZ"
EXPECTED = ["README.md", "adapter_config.json", "adapter_model.safetensors", "config.yaml", "loss.png",
            "summary.json", "tokenizer.model.v3", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    r = copy_run(tiny_run, tmp_path_factory.mktemp("push") / "run")  # the session's run, changed here
    cfg = (r / "config.yaml").read_text()
    (r / "config.yaml").write_text(cfg.replace("report_to: none", f"report_to: none\n  hf_token: {TOKEN}"))
    (r / "adapter" / "training_args.bin").write_bytes(b"pickle")  # must never be uploaded
    return r


@pytest.fixture(scope="module")
def pipeline(tiny_pipeline_run):
    return tiny_pipeline_run


def _front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def test_dry_run_folder_and_card(run, tmp_path, capsys):
    from mistral_align.entry.cli import main

    out = tmp_path / "dry"
    assert main(["push", str(run), "--repo-id", "me/tiny-qlora", "--dry-run", str(out)]) == 0
    assert "nothing uploaded" in capsys.readouterr().out
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == EXPECTED
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == str(run / "base")  # inline base: the run's base/ folder
    readme = (out / "README.md").read_text()
    fm = _front_matter(readme)
    assert fm["base_model"] == str(run / "base") and fm["library_name"] == "peft"
    assert fm["license"] == "apache-2.0" and fm["pipeline_tag"] == "text-generation"
    assert fm["datasets"] == ["HuggingFaceH4/ultrachat_200k"]
    assert {"trl", "sft", "qlora", "mistral-align"} <= set(fm["tags"])
    assert "| `sft.final_loss` |" in readme and "[1, 3, " in readme and "PeftModel.from_pretrained" in readme
    for p in out.rglob("*"):
        assert TOKEN.encode() not in p.read_bytes(), p
    assert "hf_token: <redacted>" in (out / "config.yaml").read_text()


def test_dry_run_folder_loads_with_plain_peft_in_a_fresh_process(run, tmp_path):
    from mistral_align.chat.encoder import get_encoder
    from mistral_align.chat.schema import Message
    from mistral_align.hub.push import push_run

    out = tmp_path / "dry"
    push_run(run, "me/tiny", dry_run=out)
    enc = get_encoder("v3")
    prompts = [enc.encode_prompt([Message("user", p)]) for p in HELD_OUT]
    trained = load_trained(run / "base", run / "adapter", "none")  # full-precision base, like a plain user
    ours = []
    with torch.no_grad():
        for p in prompts:
            g = trained.generate(input_ids=torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=2)
            ours.append(g[0, len(p):].tolist())
    code = textwrap.dedent(f"""
        import json, sys, torch
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoTokenizer
        m = AutoPeftModelForCausalLM.from_pretrained({str(out)!r}).eval()
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        outs = []
        for text in {HELD_OUT!r}:
            ids = tok.apply_chat_template([{{"role": "user", "content": text}}], add_generation_prompt=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            g = m.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=2)
            outs.append([ids, g[0, len(ids):].tolist()])
        assert not any(k.startswith("mistral_align") for k in sys.modules)
        print(json.dumps(outs))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert [g[0] for g in got] == prompts
    assert [g[1] for g in got] == ours


class FakeApi:
    """Stands in for huggingface_hub.HfApi: records each call and the files handed over."""

    fail_uploads = 0
    calls: list = []

    def __init__(self, *a, **kw):
        assert not a and not kw  # the token is read by huggingface_hub itself, never passed by us

    def create_repo(self, **kw):
        FakeApi.calls.append(("create_repo", kw))
        return f"https://huggingface.co/{kw['repo_id']}"

    def create_branch(self, **kw):
        FakeApi.calls.append(("create_branch", kw))

    def upload_folder(self, **kw):
        folder = Path(kw["folder_path"])
        files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        FakeApi.calls.append(("upload_folder", {**kw, "files": files}))
        if FakeApi.fail_uploads:
            FakeApi.fail_uploads -= 1
            import httpx
            from huggingface_hub.errors import HfHubHTTPError

            resp = httpx.Response(503, request=httpx.Request("POST", "https://huggingface.co/api/x"))
            raise HfHubHTTPError("503 Service Unavailable", response=resp)
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kw['repo_id']}/commit/abc"})()


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeApi.calls, FakeApi.fail_uploads = [], 0
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr("mistral_align.hub.push.time.sleep", lambda s: None)
    return FakeApi


def test_push_calls_create_repo_then_upload_folder_and_retries(run, fake_hub, capsys):
    from mistral_align.entry.cli import main

    fake_hub.fail_uploads = 1
    argv = ["push", str(run), "--repo-id", "me/tiny", "--private", "--revision", "exp"]
    assert main(argv) == 0
    names = [c[0] for c in fake_hub.calls]
    assert names == ["create_repo", "create_branch", "upload_folder", "upload_folder"]  # one failure, one retry
    assert fake_hub.calls[0][1] == {"repo_id": "me/tiny", "repo_type": "model", "private": True, "exist_ok": True}
    assert fake_hub.calls[1][1] == {"repo_id": "me/tiny", "branch": "exp", "repo_type": "model", "exist_ok": True}
    up = fake_hub.calls[-1][1]
    assert up["repo_id"] == "me/tiny" and up["revision"] == "exp" and up["repo_type"] == "model"
    assert sorted(up["files"]) == EXPECTED
    assert all(TOKEN.encode() not in b for b in up["files"].values())
    assert "pushed 8 files" in capsys.readouterr().out
    # A second push of the same run: same calls again (exist_ok), a new commit, no new repo name.
    fake_hub.calls.clear()
    assert main(argv) == 0
    assert [c[0] for c in fake_hub.calls] == ["create_repo", "create_branch", "upload_folder"]


def test_push_failure_names_the_step_and_exits_2(run, fake_hub, capsys):
    from mistral_align.entry.cli import main

    fake_hub.fail_uploads = 5
    assert main(["push", str(run), "--repo-id", "me/tiny"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "upload_folder to me/tiny failed after 3 tries" in err and "rerun" in err
    assert TOKEN not in err


def test_push_without_token_or_bad_repo_id(run, monkeypatch, tmp_path, capsys):
    from mistral_align.entry.cli import main

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    monkeypatch.setattr("mistral_align.hub.push._token_value", lambda: None)
    assert main(["push", str(run), "--repo-id", "me/tiny"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    assert main(["push", str(run), "--repo-id", "not a repo", "--dry-run", str(tmp_path / "d")]) == 2
    assert "OWNER/NAME" in capsys.readouterr().err


def test_pipeline_push_stage_choice(pipeline, tmp_path):
    from mistral_align.hub.push import push_run

    dpo = push_run(pipeline, "me/p", dry_run=tmp_path / "dpo")
    sft = push_run(pipeline, "me/p", stage="sft", dry_run=tmp_path / "sft")
    fm_dpo = _front_matter((tmp_path / "dpo" / "README.md").read_text())
    fm_sft = _front_matter((tmp_path / "sft" / "README.md").read_text())
    assert "dpo" in fm_dpo["tags"] and "lora" in fm_dpo["tags"] and "dpo" not in fm_sft["tags"]
    a = (tmp_path / "dpo" / "adapter_model.safetensors").read_bytes()
    assert a == (pipeline / "dpo" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "sft" / "adapter_model.safetensors").read_bytes() == (pipeline / "sft" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert dpo.files == sft.files


def test_hub_base_is_named_by_its_id(run, tmp_path):
    import shutil

    from mistral_align.hub.push import push_run

    hub_run = tmp_path / "hubrun"
    shutil.copytree(run, hub_run, ignore=shutil.ignore_patterns("base"))
    acfg = json.loads((hub_run / "adapter" / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = "mistralai/Mistral-7B-v0.3"
    (hub_run / "adapter" / "adapter_config.json").write_text(json.dumps(acfg))
    cfg = (hub_run / "config.yaml").read_text().replace("hub_id: null", "hub_id: mistralai/Mistral-7B-v0.3")
    (hub_run / "config.yaml").write_text(cfg)
    push_run(hub_run, "me/m7", dry_run=tmp_path / "dry")
    assert json.loads((tmp_path / "dry" / "adapter_config.json").read_text())["base_model_name_or_path"] == "mistralai/Mistral-7B-v0.3"
    readme = (tmp_path / "dry" / "README.md").read_text()
    assert _front_matter(readme)["base_model"] == "mistralai/Mistral-7B-v0.3"
    assert "from_pretrained('mistralai/Mistral-7B-v0.3'" in readme and "inline" not in readme


def test_hub_push_at_the_end_of_a_run_sends_what_the_cli_sends(run, fake_hub, monkeypatch):
    """hub.push=true: finish_run pushes the final adapter (main process), the same files as the CLI."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from mistral_align.errors import HubError
    from mistral_align.schema.recipe import RecipeConfig
    from mistral_align.train.run import Run, push_finished_run

    cfg = OmegaConf.structured(RecipeConfig)
    cfg.hub.push, cfg.hub.repo_id = True, "me/from-recipe"
    done = Run(cfg, run, SimpleNamespace(is_main_process=True), "sft", ("sft",))
    push_finished_run(done)
    assert [c[0] for c in fake_hub.calls] == ["create_repo", "upload_folder"]
    assert sorted(fake_hub.calls[-1][1]["files"]) == EXPECTED
    fake_hub.calls.clear()
    fake_hub.fail_uploads = 5
    with pytest.raises(HubError, match=r"training finished in .*push again with: mistral-align push .* --repo-id me/from-recipe"):
        push_finished_run(done)
