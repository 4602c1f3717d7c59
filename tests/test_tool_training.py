"""SFT -> DPO on tool rows, end to end: the real recipe (recipes/sft_dpo.py, in process, composed by
Hydra) trains a tiny model on tool conversations (SFT) and call-versus-call pairs (DPO) for v3 and for
v13 (with thinking), and the trainers get exactly `check_row`'s ids. The v13 run's model is a local
folder standing in for a Hub repository, with its own tekken.json: that file is what the rows are
encoded with, what the manifest records, and what the run's tokenizer folders, the pushed folder and
the merged folder hold."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import datasets
import pytest
from hub_standin import own_tekken
from tool_rows import dpo_row, sft_row, write_jsonl

from mistral_align.chat.encoder import get_encoder
from mistral_align.data.encode import check_row

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CITIES = ["Paris", "Rome", "Oslo", "Lima"]
WRONG = dict(zip(CITIES, CITIES[1:] + CITIES[:1]))


def _standin_model(folder: Path, vocab_size: int) -> Path:
    """A tiny Mistral saved as a plain model folder, as a Hub repository holds one (init 0.1, as above)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                     initializer_range=0.1, tie_word_embeddings=False)).save_pretrained(folder)
    return folder


def _recipe():
    spec = importlib.util.spec_from_file_location("sft_dpo_recipe", ROOT / "recipes" / "sft_dpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _train(tmp: Path, version: str, model: list[str], monkeypatch) -> dict:
    """Run the pipeline on tool rows; returns what the trainers got, the files and the summary."""
    from hydra import compose, initialize_config_dir

    from mistral_align.train.dpo import DPOStage
    from mistral_align.train.sft import SFTStage

    thinking = version == "v13"
    files = {
        "sft": write_jsonl(tmp / "sft.jsonl", [sft_row(c, thinking) for c in CITIES] * 4),
        "sft_eval": write_jsonl(tmp / "sft_eval.jsonl", [sft_row(c, thinking) for c in CITIES[:2]]),
        # The right call over the wrong tool, and over the right tool with the wrong city.
        "dpo": write_jsonl(tmp / "dpo.jsonl", [dpo_row(c) for c in CITIES] * 2 + [dpo_row(c, WRONG[c]) for c in CITIES]),
        "dpo_eval": write_jsonl(tmp / "dpo_eval.jsonl", [dpo_row(c) for c in CITIES[:2]]),
    }
    seen: dict = {}
    for cls in (SFTStage, DPOStage):
        build = cls.build_trainer

        def spy(self, *args, _build=build, **kwargs):  # calls through: records what the trainer was given
            trainer = _build(self, *args, **kwargs)
            seen[self.name] = (self.encoder, trainer.train_dataset)
            return trainer

        monkeypatch.setattr(cls, "build_trainer", spy)
    overrides = [
        "experiment=test_tiny", "quant=none", f"model.tokenizer_version={version}", *model, f"run.dir={tmp / 'run'}",
        "sft.synthetic.enabled=false", "dpo.synthetic.enabled=false",
        f"sft.data.train=[{{path: {files['sft']}}}]", f"sft.data.eval=[{{path: {files['sft_eval']}}}]",
        f"dpo.data.train=[{{path: {files['dpo']}}}]", f"dpo.data.eval=[{{path: {files['dpo_eval']}}}]",
        "sft.data.tool_call_ids=regenerate", "dpo.data.tool_call_ids=regenerate",
        # A larger init than transformers' 0.02, so that a few LoRA steps visibly move a random model.
        "sft.train.max_steps=6", "sft.train.lr=2e-2", "sft.train.max_length=256", "dpo.train.max_steps=4",
        "sft.train.gradient_checkpointing=false", "dpo.train.gradient_checkpointing=false",
    ]  # fmt: skip
    recipe = _recipe()  # registers the typed schema, as launching it does
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("sft_dpo", overrides=overrides)
    summary = recipe.main(cfg)
    return {"seen": seen, "files": files, "summary": summary, "run": tmp / "run"}


def _expected(kind: str, path: Path, encoder) -> list[dict]:
    return [check_row(kind, line, encoder, tool_call_ids="regenerate").ids for line in path.read_text().splitlines()]


def _given(trainer_rows, kind: str) -> list[dict]:
    """The rows a trainer was given; SFT's are packed (sft.train.packing, TRL's bfd): each packed
    row is cut back into its conversations by TRL's own `seq_lengths`."""
    if kind == "dpo":
        return [{c: row[c] for c in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in trainer_rows]
    out = []
    for row in trainer_rows:
        start = 0
        for n in row["seq_lengths"]:
            out.append({"input_ids": row["input_ids"][start:start + n], "labels": row["labels"][start:start + n]})
            start += n
    return out


def _key(rows: list[dict]) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in rows)


def _check_trained(run: dict, encoder) -> str:
    for kind in ("sft", "dpo"):
        stage_encoder, rows = run["seen"][kind]
        assert (stage_encoder.version, stage_encoder.file_sha256) == (encoder.version, encoder.file_sha256)
        given, expected = _given(rows, kind), _expected(kind, run["files"][kind], encoder)
        assert (_key(given) if kind == "sft" else given) == (_key(expected) if kind == "sft" else expected)
    calls = encoder.raw.get_special_token("[TOOL_CALLS]")
    assert all(calls in r["labels"] for r in _given(run["seen"]["sft"][1], "sft"))  # every row trains its call
    s = run["summary"]
    figures = (f"{encoder.version}: SFT eval loss {s['sft']['before']['loss']:.3f} -> {s['sft']['after']['loss']:.3f}; "
               f"DPO reward margin {s['dpo']['before']['reward_margin']:.4f} -> "
               f"{s['dpo']['after']['reward_margin']:.4f}, accuracy {s['dpo']['after']['reward_accuracy']:.2f}")
    assert s["sft"]["after"]["loss"] < s["sft"]["before"]["loss"]  # learned something
    assert s["dpo"]["before"]["reward_margin"] == 0.0 < s["dpo"]["after"]["reward_margin"]
    manifest = json.loads((run["run"] / "manifest.json").read_text())
    for kind, rows in (("sft", 16 + 2), ("dpo", 12 + 2)):
        report = manifest[kind]["data"]["report"]
        assert report["tool_rows"] == rows and report["dropped_tool_calls"] == 0
    return figures


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def test_v3_tool_rows_train_through_both_stages(tmp_path, monkeypatch):
    run = _train(tmp_path, "v3", ["model.architecture.initializer_range=0.1"], monkeypatch)
    encoder = get_encoder("v3")
    print("\n" + _check_trained(run, encoder))
    manifest = json.loads((run["run"] / "manifest.json").read_text())
    assert manifest["tokenizer"] == {"file": encoder.file.name, "sha256": encoder.file_sha256,
                                     "origin": "mistral-common", "fallback": False}  # an inline model


def test_v13_thinking_and_tools_train_with_the_model_folders_own_tekken(tmp_path, monkeypatch, capsys):
    from mistral_align.entry.cli import main
    from mistral_align.hub.card import tool_format_section
    from mistral_align.inference.load import load_for_chat

    folder = _standin_model(tmp_path / "Magistral-standin", vocab_size=131072)
    own = own_tekken(folder / "tekken.json", "v13")
    run = _train(tmp_path, "v13", ["model.architecture=null", f"model.hub_id={folder}", "model.name=standin"],
                 monkeypatch)
    encoder = get_encoder("v13", own)
    figures = _check_trained(run, encoder)
    sft_rows = _given(run["seen"]["sft"][1], "sft")
    derived = _expected("sft", run["files"]["sft"], get_encoder("v13"))
    assert _key(sft_rows) != _key(derived)  # the folder's file, not the derived one
    think = encoder.raw.get_special_token("[THINK]")
    assert all(think in r["labels"] for r in sft_rows)  # thinking trained (the default)
    r = run["run"]
    manifest = json.loads((r / "manifest.json").read_text())
    for facts in (manifest["tokenizer"], manifest["sft"]["tokenizer"], manifest["dpo"]["tokenizer"]):
        assert facts == {"file": "tekken.json", "sha256": _sha(own), "origin": f"folder:{folder}", "fallback": False}
    for copy in ("sft/tokenizer", "sft/adapter", "dpo/tokenizer", "dpo/adapter"):
        assert _sha(r / copy / "tekken.json") == _sha(own), copy

    assert main(["push", str(r), "--repo-id", "me/standin-tools", "--dry-run", str(tmp_path / "push")]) == 0
    assert _sha(tmp_path / "push" / "tekken.json") == _sha(own)
    card = (tmp_path / "push" / "README.md").read_text()
    assert "## Tool calls" in card and tool_format_section("v13", own) in card
    assert main(["merge", str(r), "--out", str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    assert _sha(tmp_path / "merged" / "tekken.json") == _sha(own)
    capsys.readouterr()
    _, chat_encoder = load_for_chat(r)
    assert chat_encoder.file_sha256 == _sha(own) and chat_encoder.file == r / "dpo" / "adapter" / "tekken.json"
    with capsys.disabled():
        print("\n" + figures)
