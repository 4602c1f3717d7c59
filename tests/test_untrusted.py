"""Secrets are never written and untrusted files never run code (issue 10 item 7).

- Credentials: with a fake HF_TOKEN and WANDB_API_KEY in the environment, a whole SFT -> DPO run
  (wandb offline, checkpoints), a tensorboard run, `push --dry-run`, `merge` and `export-gguf` write
  neither value into any file (every byte under the test's folder, HOME and caches included, is
  searched); a credential given on the command line (`+sft.train.extra.hub_token=...`) is refused
  naming the key, never echoing the value.
- Pickles: weights are loaded from safetensors only; an adapter, base or merged folder whose weights
  are only pickles is refused with a clear message unless allowed (`--allow-pickle`,
  `model.allow_pickle=true`). (Resume checkpoints hold the trainer's own optimizer.pt / rng_state.pth
  pickles, loaded by transformers when resuming; they are ours, written in the run directory.)
- Remote code: config.json `auto_map` is never followed; every load passes trust_remote_code=False
  (training: model.trust_remote_code, off by default).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mistral_align.errors import ConfigError, UntrustedFileError

ROOT = Path(__file__).resolve().parents[1]
HF_SECRET = "hf_FAKEtoken123456789"
WANDB_SECRET = "fa4e0c0ffee0d15ea5e0b1a5ed0fa4eba5eba11a"  # 40 characters, like a real key
assert len(WANDB_SECRET) == 40


# -- credentials on the command line -----------------------------------------------------------------


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    from mistral_align.schema.recipe import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("sft_dpo", overrides=["experiment=test_tiny", *overrides])


@pytest.mark.parametrize("override, key", [
    (f"+sft.train.extra.hub_token={HF_SECRET}", "sft.train.extra.hub_token"),
    (f"+dpo.train.extra.model_init_kwargs.token={HF_SECRET}", "dpo.train.extra.model_init_kwargs.token"),
    (f"+sft.train.extra.wandb_api_key={WANDB_SECRET}", "sft.train.extra.wandb_api_key"),
])  # fmt: skip
def test_a_credential_in_the_config_is_refused_naming_the_key_not_the_value(override, key):
    from mistral_align.schema.recipe import check_config

    with pytest.raises(ConfigError) as e:
        check_config(_compose(override))
    assert str(e.value).startswith(f"{key}: credentials are not taken from the config")
    assert HF_SECRET not in str(e.value) and WANDB_SECRET not in str(e.value)
    check_config(_compose("+sft.train.extra.pad_token='</s>'"))  # TRL's tokenizer tokens are no credential


# -- weights from safetensors only ---------------------------------------------------------------------


def _tiny_model():
    from transformers import AutoModelForCausalLM

    from runfixtures import model_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model_config("mistral-small"))


def _model_folder(folder: Path, pickled: bool) -> Path:
    """A plain transformers model folder with the v3 tokenizer; its weights as safetensors, or only as
    a pickled pytorch_model.bin (as older checkpoints are)."""
    from mistral_align.chat.hf_tokenizer import save_hf_tokenizer

    model = _tiny_model()
    model.save_pretrained(folder)
    if pickled:
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    save_hf_tokenizer("v3", folder)
    return folder


def _run_dir(root: Path, pickled_adapter: bool, pickled_base: bool) -> Path:
    """A run directory (config.yaml, base/, adapter/) whose adapter and base are pickled or not."""
    from peft import LoraConfig, get_peft_model

    root.mkdir(parents=True)
    base = _model_folder(root / "base", pickled_base)
    (root / "config.yaml").write_text("model:\n  tokenizer_version: v3\nquant:\n  mode: none\nsft: {}\n")
    model = get_peft_model(_tiny_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(root / "adapter")
    cfg = root / "adapter" / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "base_model_name_or_path": str(base)}))
    if pickled_adapter:
        from safetensors.torch import load_file

        weights = root / "adapter" / "adapter_model.safetensors"
        torch.save(load_file(str(weights)), root / "adapter" / "adapter_model.bin")
        weights.unlink()
    return root


def test_pickle_only_weights_are_refused_unless_allowed(tmp_path):
    from mistral_align.inference.load import load_for_chat
    from mistral_align.rundir.finished import resolve_source
    from mistral_align.train.dpo import safe_adapter

    adapter_pickled = _run_dir(tmp_path / "a", pickled_adapter=True, pickled_base=False)
    with pytest.raises(UntrustedFileError, match=r"adapter weights are only pickles \(adapter_model.bin\), which can "
                                                 r"run code when loaded; .* or pass --allow-pickle"):  # fmt: skip
        resolve_source(adapter_pickled)
    assert resolve_source(adapter_pickled, allow_pickle=True).adapter_dir == adapter_pickled / "adapter"
    # dpo.init_from: the same refusal, with the config's switch named.
    with pytest.raises(UntrustedFileError, match=r"dpo.init_from adapter weights .* model.allow_pickle=true"):
        safe_adapter(str(adapter_pickled / "adapter"))

    base_pickled = _run_dir(tmp_path / "b", pickled_adapter=False, pickled_base=True)
    with pytest.raises(UntrustedFileError, match=r"base model weights are only pickles \(pytorch_model.bin\)"):
        resolve_source(base_pickled)

    merged = _model_folder(tmp_path / "merged", pickled=True)
    with pytest.raises(UntrustedFileError, match=r"merged model weights are only pickles"):
        load_for_chat(merged)
    model, _ = load_for_chat(merged, allow_pickle=True)  # allowed: it loads, for real
    assert type(model).__name__ == "MistralForCausalLM"


def test_the_cli_refuses_a_pickled_run_in_one_line(tmp_path, capsys):
    from mistral_align.entry.cli import main

    run = _run_dir(tmp_path / "run", pickled_adapter=True, pickled_base=False)
    assert main(["merge", str(run), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("mistral-align merge: error: ")]
    assert "only pickles (adapter_model.bin)" in line and "--allow-pickle" in line
    assert not (tmp_path / "m").exists()


# -- no remote code --------------------------------------------------------------------------------------


def _evil_folder(folder: Path, model_type: str) -> Path:
    """A model folder whose config.json names its own Python classes; importing them leaves a marker."""
    _model_folder(folder, pickled=False)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(folder / 'RAN')!r}, 'w').write('remote code ran')\n")
    return folder


def test_remote_code_is_never_run(tmp_path, monkeypatch):
    import transformers

    from mistral_align.inference.load import load_for_chat
    from mistral_align.model.load import build_model, load_pretrained
    from mistral_align.schema.model import ModelConfig, QuantConfig

    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained
        monkeypatch.setattr(cls, "from_pretrained",
                            lambda *a, _o=original, **k: (seen.append(k.get("trust_remote_code")), _o(*a, **k))[1])

    # A config naming code of its own for an unknown model type: refused in one line, nothing imported.
    evil = _evil_folder(tmp_path / "evil", "evil_mistral")
    with pytest.raises(UntrustedFileError, match=r"asks to run the repository's own Python code \(auto_map\)"):
        load_pretrained(str(evil))
    with pytest.raises(UntrustedFileError, match="auto_map"):
        load_for_chat(evil)
    cfg = ModelConfig(name="evil", hub_id=str(evil), tokenizer_version="v3", dtype="float32")
    with pytest.raises(UntrustedFileError, match=r"model.trust_remote_code=true"):
        build_model(cfg, QuantConfig(), vocab_size=32768, device_map=None)
    # A Mistral config with an auto_map: the stock class loads, the folder's code is never imported.
    known = _evil_folder(tmp_path / "known", "mistral")
    assert type(load_pretrained(str(known))).__name__ == "MistralForCausalLM"
    assert type(load_for_chat(known)[0]).__name__ == "MistralForCausalLM"
    assert not (evil / "RAN").exists() and not (known / "RAN").exists()
    assert seen and set(seen) == {False}  # every config and model load said so explicitly


# -- the sweep: no secret in any file written ------------------------------------------------------------


@pytest.mark.slow
def test_no_secret_lands_in_any_file_written(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT / "src"), "HF_TOKEN": HF_SECRET, "HUGGING_FACE_HUB_TOKEN": HF_SECRET,
           "WANDB_API_KEY": WANDB_SECRET,
           # Everything a run or a library writes lands under tmp_path, so the sweep sees it all.
           "HOME": str(home), "HF_HOME": str(home / "hf"), "XDG_CACHE_HOME": str(home / "cache"),
           "XDG_CONFIG_HOME": str(home / "config"), "MPLCONFIGDIR": str(home / "mpl"),
           "WANDB_CONFIG_DIR": str(home / "wandb_config"), "WANDB_CACHE_DIR": str(home / "wandb_cache"),
           "WANDB_DATA_DIR": str(home / "wandb_data"),
           # Nothing may go online: a proxy nobody listens on makes any attempt fail at once.
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "WANDB_BASE_URL": "http://127.0.0.1:9"}  # fmt: skip
    for key in ("MISTRAL_ALIGN_RUN_DIR", "WANDB_MODE", "WANDB_DIR", "NO_PROXY", "no_proxy", "TENSORBOARD_LOGGING_DIR"):
        env.pop(key, None)
    pipeline, tb, refused = tmp_path / "pipeline", tmp_path / "tb", tmp_path / "refused"
    short = ("sft.train.max_steps=2", "dpo.train.max_steps=2", "sft.eval.loss_before=false")
    try:
        import gguf  # noqa: F401  (a default dependency)
    except ImportError:
        has_gguf = False
    else:
        has_gguf = True
    # One fresh process (the environment above is read by the libraries as they are imported) runs
    # every command in turn, as a user would run them one after another (tests/one_process.py).
    steps = [
        ["recipe", "sft_dpo.py", "experiment=test_tiny", f"run.dir={pipeline}", "run.report_to=wandb",
         "run.wandb_mode=offline", *short],
        ["recipe", "sft.py", "experiment=test_tiny", f"run.dir={tb}", "run.report_to=tensorboard", short[0], short[2]],
        ["recipe", "sft.py", "experiment=test_tiny", f"run.dir={refused}", f"+sft.train.extra.hub_token={HF_SECRET}"],
        ["cli", "push", str(pipeline), "--repo-id", "someone/tiny", "--dry-run", str(tmp_path / "upload")],
        ["cli", "merge", str(pipeline), "--out", str(tmp_path / "merged"), "--dtype", "fp32"],
        *([["cli", "export-gguf", str(tmp_path / "merged"), "--out", str(tmp_path / "model.gguf")]] if has_gguf else []),
    ]  # fmt: skip
    expected = [0, 0, 2, 0, 0, 0][: len(steps)]
    driver = tmp_path.parent / f"{tmp_path.name}-steps"  # beside the swept folder: the driver's own files
    driver.mkdir()
    (driver / "steps.json").write_text(json.dumps(steps))
    process = subprocess.run([sys.executable, str(ROOT / "tests/one_process.py"), str(driver / "steps.json"),
                              str(driver / "results.json")], capture_output=True, text=True, timeout=900,
                             cwd=tmp_path, env=env)  # fmt: skip
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]
    results = json.loads((driver / "results.json").read_text())
    for step, result, code in zip(steps, results, expected, strict=True):
        assert result["returncode"] == code, (step, result["stdout"][-3000:] + result["stderr"][-5000:])
    assert "error: sft.train.extra.hub_token: credentials are not taken from the config" in results[2]["stderr"]
    assert not refused.exists()
    outputs = [process.stdout + process.stderr, *(r["stdout"] + r["stderr"] for r in results)]

    # What was written: the runs (checkpoints with their pickled trainer state), wandb's offline run,
    # tensorboard events, the upload folder, the merged model, the GGUF file, every cache.
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
    assert list(pipeline.rglob("offline-run-*/run-*.wandb")), "wandb wrote no offline run"
    assert list((tb / "tensorboard").glob("events.out.tfevents.*")) and (tmp_path / "upload" / "README.md").is_file()
    assert list((pipeline / "sft" / "checkpoints").glob("checkpoint-*/training_args.bin"))
    assert (tmp_path / "model.gguf").is_file() or not has_gguf
    for path in files:
        data = path.read_bytes()
        for secret in (HF_SECRET, WANDB_SECRET):
            assert secret.encode() not in data, f"{secret[:6]}... found in {path}"
    for text in outputs:
        assert HF_SECRET not in text and WANDB_SECRET not in text
