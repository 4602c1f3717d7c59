"""Runs for tests: run directories built in code (no recipe is run), and recipes run in this process.

    run = make_run(tmp_path / "run", arch="mistral", quant="nf4")

writes, like a finished single-stage run of an inline model:

    base/                 plain transformers model (config.json + model.safetensors, float32)
    adapter/              peft LoRA trained a few steps against the (NF4-)quantised base, safetensors,
                          base_model_name_or_path = absolute path of base/; tokenizer files
    tokenizer/            save_hf_tokenizer(version)   (v3 unless `version=` says otherwise)
    config.yaml manifest.json metrics.jsonl loss.png summary.json

`pipeline=True` writes sft/adapter and dpo/adapter (the dpo adapter trained a few steps more).
The LoRA is trained on a tiny copy task so that it changes the model's greedy outputs.

    out = run_recipe_script("sft.py", "experiment=test_tiny", f"run.dir={run_dir}", cwd=tmp_path)

runs recipes/sft.py as `python recipes/sft.py ...` would, in this process (out.returncode, out.stdout,
out.stderr); a subprocess is for what one process cannot show: signals that end it, several ranks,
a fresh interpreter.

    summary = run_recipe("sft", ["experiment=test_tiny", f"run.dir={run_dir}"])

calls recipes/sft.py's `main` on the composed config and returns its summary (a user mistake raises
SystemExit(2)): for a test that reads the summary rather than the command line's output.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# llama.cpp's own runtime (llama-cpp-python builds from source for ~20 minutes, so CI leaves it out).
needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed (pip install '.[gguf]')")

VERSION = "v3"
VOCAB = 32768  # tokenizer v3

ARCH = {
    "mistral": dict(
        type="mistral", hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, initializer_range=0.05,
    ),
    "mistral-small": dict(
        type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, initializer_range=0.05,
    ),
    "mixtral": dict(
        type="mixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, initializer_range=0.05, num_local_experts=4, num_experts_per_tok=2,
        router_aux_loss_coef=0.02,
    ),
}

PROMPTS = ["copy: red green blue", "copy: one two three four", "copy: the cat sat", "copy: alpha beta", "copy: seven nine"]
HELD_OUT = ["copy: sun moon star", "copy: left right", "copy: apple pear plum", "copy: up down"]


def save_tiny_mistral(out_dir: Path, vocab_size: int, max_position_embeddings: int, seed: int = 0) -> Path:
    """A random-init 2 x 64 Mistral (transformers' own init) as a plain model folder, for trainer tests."""
    from transformers import MistralConfig, MistralForCausalLM

    arch = MistralConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    MistralForCausalLM(arch).save_pretrained(out_dir)
    return Path(out_dir)


WORDS = "the cat sat on a mat while seven blue birds sang about rain and old maps".split()


def random_pairs(encoder, rng, n: int, prompt: tuple[int, ...], chosen: tuple[int, ...],
                 rejected: tuple[int, ...]) -> list[dict]:  # fmt: skip
    """`n` preference pairs of random words, each part's word count drawn from its tuple (very
    different lengths, so a padded batch is mostly padding), encoded: {prompt_ids, chosen_ids,
    rejected_ids}."""
    from mistral_align.chat.schema import parse_preference

    text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    rows = []
    for _ in range(n):
        pair = parse_preference({"prompt": text(rng.choice(prompt)), "chosen": text(rng.choice(chosen)),
                                 "rejected": text(rng.choice(rejected))})  # fmt: skip
        rows.append(pair_ids(encoder.encode_dpo(pair)))
    return rows


def pair_ids(encoding) -> dict:
    """A DpoEncoding's ids as a preference row: {prompt_ids, chosen_ids, rejected_ids}."""
    return {"prompt_ids": encoding.prompt_ids, "chosen_ids": encoding.chosen_ids, "rejected_ids": encoding.rejected_ids}


def adapter_max_diff(a: Path, b: Path) -> float:
    """Max |difference| between two saved adapters (folders), which must hold the same tensors."""
    from safetensors.torch import load_file

    ta, tb = (load_file(str(Path(d) / "adapter_model.safetensors")) for d in (a, b))
    assert ta.keys() == tb.keys(), sorted(set(ta) ^ set(tb))[:5]
    return max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta)


def model_config(arch: str, vocab_size: int = VOCAB):
    from types import SimpleNamespace

    from mistral_align.model.inline import inline_config

    a = dict(ARCH[arch])
    if a["type"] == "mistral":
        a.update(num_local_experts=0, num_experts_per_tok=0, router_aux_loss_coef=0.0)
    return inline_config(SimpleNamespace(architecture=SimpleNamespace(**a)), vocab_size)


def _bnb(quant: str):
    from transformers import BitsAndBytesConfig

    if quant == "none":
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["lm_head"],
    )


def load_trained(base_dir: Path, adapter_dir: Path, quant: str):
    """The model as training left it: the (quantised) base with the adapter, eval mode."""
    from peft import PeftModel

    from mistral_align.model.bnb_cpu import disable_cpu_inference_repacking
    from mistral_align.model.load import load_pretrained

    base = load_pretrained(str(base_dir), dtype=torch.float32, quantization_config=_bnb(quant))
    disable_cpu_inference_repacking(base)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def _examples(encoder, prompts):
    from mistral_align.chat.schema import Message

    rows = []
    for p in prompts:
        reply = p.split(": ", 1)[1]
        enc = encoder.encode_sft([Message("user", p), Message("assistant", reply)])
        rows.append(enc)
    return rows


def _train(model, encoder, steps: int, lr: float, seed: int):
    torch.manual_seed(seed)
    rows = _examples(encoder, PROMPTS)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        enc = rows[step % len(rows)]
        ids = torch.tensor([enc.input_ids])
        labels = torch.tensor([enc.labels])
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))
    model.eval()
    return losses


def _config_yaml(arch: str, quant: str, stages: list[str], run_dir: Path, version: str = VERSION) -> str:
    from omegaconf import OmegaConf

    a = dict(ARCH[arch])
    cfg = {
        "model": {"name": f"tiny-{arch}", "hub_id": None, "revision": None, "architecture": a,
                  "tokenizer_version": version, "dtype": "float32", "attn_implementation": "sdpa"},
        "quant": {"mode": quant, "double_quant": True, "compute_dtype": "float32", "storage_dtype": "uint8",
                  "skip_modules": ["lm_head"]},
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["all-linear"]},
        "run": {"dir": str(run_dir), "seed": 0, "report_to": "none"},
    }
    for s in stages:
        cfg[s] = {"data": {"train": [{"path": "HuggingFaceH4/ultrachat_200k" if s == "sft" else "data/prefs.jsonl",
                                      "split": "train_sft"}], "max_length": 512},
                  "train": {"lr": 2e-3, "max_steps": 40}}
    if "dpo" in cfg:
        cfg["dpo"]["beta"] = 0.1
    return OmegaConf.to_yaml(OmegaConf.create(cfg))


def make_run(run_dir: Path, arch: str = "mistral", quant: str = "nf4", pipeline: bool = False,
             steps: int = 40, lr: float = 2e-3, seed: int = 0, version: str = VERSION) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mistral_align.chat.encoder import get_encoder
    from mistral_align.chat.hf_tokenizer import save_hf_tokenizer
    from mistral_align.model.bnb_cpu import disable_cpu_inference_repacking
    from mistral_align.model.load import load_pretrained, model_class
    from mistral_align.model.lora import linear_module_names

    run_dir = Path(run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    encoder = get_encoder(version)
    torch.manual_seed(seed)
    config = model_config(arch, encoder.vocab_size)
    cls = model_class(config)  # what training uses: Mixtral with per-expert linears
    base = (cls.from_config if cls is AutoModelForCausalLM else cls._from_config)(config, dtype=torch.float32)
    base.save_pretrained(run_dir / "base")
    base_dir = run_dir / "base"

    model = load_pretrained(str(base_dir), dtype=torch.float32, quantization_config=_bnb(quant))
    disable_cpu_inference_repacking(model)
    if quant != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = linear_module_names(model)
    lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    stages = ["sft", "dpo"] if pipeline else ["sft"]
    summary: dict = {}
    metrics = []
    for i, stage in enumerate(stages):
        losses = _train(model, encoder, steps if i == 0 else steps // 4, lr, seed + i)
        out = run_dir / stage / "adapter" if pipeline else run_dir / "adapter"
        model.save_pretrained(str(out), safe_serialization=True)
        cfg_file = out / "adapter_config.json"
        c = json.loads(cfg_file.read_text())
        c["base_model_name_or_path"] = str(base_dir)
        cfg_file.write_text(json.dumps(c, indent=2))
        save_hf_tokenizer(version, out)
        save_hf_tokenizer(version, out.parent / "tokenizer")
        stage_summary = {"train_loss": sum(losses) / len(losses), "steps": len(losses), "final_loss": losses[-1]}
        summary[stage] = stage_summary
        if pipeline:
            (run_dir / stage / "summary.json").write_text(json.dumps({stage: stage_summary}, indent=2))
        metrics += [{"stage": stage, "step": j + 1, "loss": l} for j, l in enumerate(losses)]
    summary["eval"] = {"exact_match": {"before": 0.0, "after": 0.5}}
    (run_dir / "config.yaml").write_text(_config_yaml(arch, quant, stages, run_dir, version))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "manifest.json").write_text(json.dumps({"versions": {"torch": torch.__version__}, "world_size": 1}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    _tiny_png(run_dir / "loss.png")
    return run_dir


def _tiny_png(path: Path) -> None:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"\x00\xff\xff\xff"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def processes_of(pid: int) -> list[int]:
    """`pid` and all its descendants (torchrun starts each rank in a session of its own)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [pid], [pid]
    while todo:
        parent = todo.pop()
        kids = [c for c, p in parents.items() if p == parent]
        found += kids
        todo += kids
    return found


def copy_run(run: Path, to: Path) -> Path:
    """A copy of a run directory (a shared session run, for a test that changes it), as if it had been
    made at `to`: the paths its config and adapter configs name are rewritten to the copy's."""
    import shutil

    run, to = Path(run).absolute(), Path(to).absolute()
    shutil.copytree(run, to)
    for path in [*to.rglob("*.json"), *to.rglob("*.yaml")]:
        text = path.read_text()
        if str(run) in text:
            path.write_text(text.replace(str(run), str(to)))
    return to


@dataclass
class Ran:
    """What a recipe run in this process left: its exit code and what it printed."""

    returncode: int
    stdout: str
    stderr: str


def run_recipe_script(recipe: str, *argv: str, cwd: Path | None = None) -> Ran:
    """Run recipes/RECIPE as `python recipes/RECIPE ARGV...` would (runpy, through the same
    `run_hydra_recipe` its __main__ calls, sys.argv as a shell gives it), in this process and in `cwd`.
    What our code registers with atexit (the run directory's lock release) runs when the recipe ends,
    as it would when its process exits; a Hydra the test initialised (the compose API) is set aside
    meanwhile, as the recipe's own process would have none. An exception that is no SystemExit is a traceback the user
    would have seen: it propagates, with what the run had printed."""
    import atexit
    import contextlib
    import io
    import os
    import runpy
    import sys

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    path = ROOT / "recipes" / recipe
    tests_hydra, job_config = GlobalHydra.instance().hydra, HydraConfig.instance().cfg
    GlobalHydra.instance().clear()
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd, register = sys.argv, os.getcwd(), atexit.register
    at_exit = []

    def ours_at_recipe_end(func, *args, **kwargs):
        if getattr(func, "__module__", "").startswith("mistral_align"):
            at_exit.append((func, args, kwargs))
            return func
        return register(func, *args, **kwargs)

    sys.argv, atexit.register = [str(path), *argv], ours_at_recipe_end
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        sys.stderr.write(err.getvalue()[-5000:])
        raise
    finally:
        sys.argv, atexit.register = saved_argv, register
        os.chdir(saved_cwd)
        GlobalHydra.instance().hydra = tests_hydra
        # The job's config outlives @hydra.main; a recipe's `main(cfg)` called later in this process
        # (runfixtures.run_recipe) would read this job's command line as its own (train/preflight.py).
        HydraConfig.instance().cfg = job_config
        for func, args, kwargs in reversed(at_exit):
            func(*args, **kwargs)
    return Ran(code, out.getvalue(), err.getvalue())


def run_recipe(name: str, overrides: list[str]) -> dict:
    """recipes/NAME.py's `main`, in this process, on the config Hydra composes from `overrides` (as
    launching it would, without a process per run); returns its summary. A user mistake ends in
    SystemExit(2), as on the command line."""
    from mistral_align.entry.estimate_command import compose_config

    spec = importlib.util.spec_from_file_location(f"{name}_recipe", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # registers the typed schema, as launching it does
    return module.main(compose_config(name, overrides))


def plain_gguf_reader() -> type:
    """gguf.GGUFReader slicing the file's mapping as a plain numpy array: the reader slices its
    np.memmap once per string, and a memmap slice costs several times a plain one (a tekken
    vocabulary's 131,072 tokens and merges: 26 s read as it comes, 6 s this way, loaded machine).
    The same bytes, fields and tensors; the file is still mapped, not read into memory."""
    import gguf
    import numpy as np

    class PlainGGUFReader(gguf.GGUFReader):
        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, mapped):  # the np.memmap GGUFReader.__init__ assigns, before it parses
            self._plain = mapped.view(np.ndarray)

    return PlainGGUFReader


def read_gguf(path: Path):
    """The GGUF file at `path`, read (plain_gguf_reader)."""
    return plain_gguf_reader()(str(path))


def card_snippet(folder: Path, repo_id: str) -> str:
    """The Python block of the model card's Usage section in a pushed (dry-run) `folder`, reading the
    repository `repo_id` from that folder instead of the Hub."""
    usage = (Path(folder) / "README.md").read_text(encoding="utf-8").split("\n## Usage", 1)[1]
    code = usage.split("```python\n", 1)[1].split("```", 1)[0]
    assert repr(repo_id) in code, code
    return code.replace(repr(repo_id), repr(str(folder)))


def run_card_snippet(folder: Path, repo_id: str) -> dict:
    """Execute the card's own snippet in this process; returns its variables (`model`, `ids`, `out` ...)."""
    namespace: dict = {}
    exec(compile(card_snippet(folder, repo_id), str(Path(folder) / "README.md"), "exec"), namespace)  # noqa: S102
    return namespace
