"""Full fine-tuning (peft=none quant=none) through every verb (issue 17, item 1): recipes/sft.py trains
the whole model into model/, recipes/dpo.py continues it from that SFT run against a frozen copy of
it, and push --dry-run, merge, chat and export-gguf take the run as they take an adapter run. The
pairings that cannot work stop in one line before anything loads. recipes/sft_dpo.py with peft=none
is a cell of tests/test_matrix.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from runfixtures import run_card_snippet, run_recipe
from safetensors.torch import load_file, save_file

from mistral_align.entry.cli import main as cli

COMMON = ["experiment=test_tiny", "quant=none", "sft.train.gradient_checkpointing=false",
          "dpo.train.gradient_checkpointing=false"]  # fmt: skip


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """An SFT run trained in full, then a DPO run from it (peft left at the DPO recipe's default, lora:
    the SFT run's own, none, is followed), the DPO trainer kept to look at its reference."""
    from mistral_align.train.dpo import DPOStage

    tmp = tmp_path_factory.mktemp("full")
    sft = run_recipe("sft", [*COMMON, "peft=none", f"run.output_dir={tmp}", f"run.dir={tmp / 'sft'}"])
    trainers = []
    build = DPOStage.build_trainer

    def keep(self, *args, **kwargs):  # calls through; keeps the trainer
        trainers.append(build(self, *args, **kwargs))
        return trainers[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DPOStage, "build_trainer", keep)
        dpo = run_recipe("dpo", [*COMMON, f"dpo.init_from={tmp / 'sft'}", f"run.output_dir={tmp}", f"run.dir={tmp / 'dpo'}"])
    return {"tmp": tmp, "sft": sft, "dpo": dpo, "trainer": trainers[0]}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_sft_trains_the_whole_model_into_model_folder(full):
    sft = full["tmp"] / "sft"
    assert not (sft / "adapter").exists() and (sft / "model" / "model.safetensors").is_file()
    config = json.loads((sft / "model" / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"] and config["use_cache"] is True  # as stock transformers serves it
    manifest = json.loads((sft / "manifest.json").read_text())
    assert manifest["trained_model"] == "model" and "adapter" not in manifest
    assert manifest["model"]["trainable_params"] == manifest["model"]["total_params"] > 0
    s = full["sft"]["sft"]
    print(f"\nfull SFT held-out loss {s['before']['loss']:.4f} -> {s['after']['loss']:.4f}")
    assert s["after"]["loss"] < s["before"]["loss"]


@pytest.mark.slow
def test_dpo_continues_the_sft_model_against_a_frozen_copy_of_it(full):
    tmp, trainer = full["tmp"], full["trainer"]
    dpo = tmp / "dpo"
    manifest = json.loads((dpo / "manifest.json").read_text())
    assert manifest["init_from"] == str(tmp / "sft" / "model")
    assert manifest["reference"] == "frozen copy of the SFT model"
    assert "method: none" in (dpo / "config.yaml").read_text()  # the SFT run's peft, followed
    d = full["dpo"]["dpo"]
    print(f"\nfull DPO held-out margin {d['before']['reward_margin']:.4f} -> {d['after']['reward_margin']:.4f}, "
          f"accuracy {d['before']['reward_accuracy']:.2f} -> {d['after']['reward_accuracy']:.2f}")
    assert d["before"]["reward_margin"] == 0.0  # policy and reference are the same model at step 0
    assert d["after"]["reward_margin"] > 0.0 and d["after"]["loss"] < d["before"]["loss"]

    # The reference is the SFT model, unchanged by training, outside the optimizer, without gradients.
    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    assert ref is not trainer.accelerator.unwrap_model(trainer.model)
    sft_weights, dpo_weights = _weights(tmp / "sft" / "model"), _weights(dpo / "model")
    for name, p in ref.named_parameters():
        assert not p.requires_grad and torch.equal(p.detach(), sft_weights[name]), name
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimized and not optimized & {id(p) for p in ref.parameters()}
    assert any(not torch.equal(sft_weights[k], dpo_weights[k]) for k in sft_weights)  # the policy trained


@pytest.mark.slow
def test_push_dry_run_uploads_the_whole_model_and_its_card_loads_it(full, tmp_path, capsys):
    dpo = full["tmp"] / "dpo"
    out = tmp_path / "push"
    assert cli(["push", str(dpo), "--repo-id", "me/tiny-full", "--dry-run", str(out)]) == 0
    files = {p.name for p in out.iterdir()}
    assert files == {"README.md", "config.json", "config.yaml", "generation_config.json", "loss.png",
                     "model.safetensors", "summary.json", "tokenizer.model.v3", "tokenizer_config.json"}  # fmt: skip
    card = (out / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "library_name: transformers\n" in front and '"full"' in front and "peft" not in front
    # The card's own snippet, run as written (the repository read from the folder): the trained model.
    model = run_card_snippet(out, "me/tiny-full")["model"]
    assert type(model).__name__ == "MistralForCausalLM"
    trained = _weights(dpo / "model")
    for name, p in model.state_dict().items():
        assert torch.equal(p, trained[name].to(p.dtype)), name


@pytest.mark.slow
def test_merge_writes_the_model_as_trained_and_chat_and_gguf_take_the_run(full, tmp_path, capsys):
    import gguf

    dpo = full["tmp"] / "dpo"
    merged = tmp_path / "merged"
    assert cli(["merge", str(dpo), "--out", str(merged), "--dtype", "fp32"]) == 0
    assert json.loads((merged / "mistral_align_merge.json").read_text())["base_kind"].startswith("none (a full fine-tune")
    trained, written = _weights(dpo / "model"), _weights(merged)
    assert trained.keys() == written.keys() and all(torch.equal(trained[k], written[k]) for k in trained)

    replies = []
    for source in (dpo, merged):
        capsys.readouterr()
        assert cli(["chat", str(source), "--prompt", "copy: red green", "--temperature", "0",
                    "--max-new-tokens", "6", "--no-stream"]) == 0  # fmt: skip
        replies.append(capsys.readouterr().out)
    assert replies[0].strip() and replies[0] == replies[1]

    assert cli(["export-gguf", str(dpo), "--out", str(tmp_path / "full.f16.gguf")]) == 0
    reader = gguf.GGUFReader(str(tmp_path / "full.f16.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 9 * 2  # embeddings, final norm, head; 9 per layer
    embed = torch.from_numpy(tensors["token_embd.weight"].data.copy()).float()
    assert torch.equal(embed, trained["model.embed_tokens.weight"].half().float())


# -- what full fine-tuning cannot continue: one line, before anything loads ----------------------


def _folder(path: Path, config_name: str, config: dict) -> Path:
    path.mkdir(parents=True)
    (path / config_name).write_text(json.dumps(config))
    weights = "adapter_model.safetensors" if config_name == "adapter_config.json" else "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(path / weights))
    return path


@pytest.mark.parametrize("peft, init_from, line", [
    ("none", "adapter", r"^error: peft.method: 'none' \(full fine-tuning\) continues a whole model, but dpo.init_from: "
                        r"\S+/adapter is a LoRA adapter; merge it first \(mistral-align merge RUN --out DIR\)"),
    ("none", "me/sft-adapter", r"^error: peft.method: 'none' .* dpo.init_from: a Hub id is read as an adapter"),
    ("lora", "model", r"^error: dpo.init_from: \S+/model is a whole model \(a full fine-tune\), not an adapter; "
                      r"DPO continues it with peft=none"),
])  # fmt: skip
def test_dpo_refuses_what_its_peft_method_cannot_continue(tmp_path, capsys, peft, init_from, line):
    _folder(tmp_path / "adapter", "adapter_config.json", {"peft_type": "LORA", "r": 2})
    _folder(tmp_path / "model", "config.json", {"model_type": "mistral"})
    source = str(tmp_path / init_from) if init_from in ("adapter", "model") else init_from
    with pytest.raises(SystemExit) as e:
        run_recipe("dpo", ["experiment=test_tiny", "quant=none", f"peft={peft}", f"dpo.init_from={source}",
                           f"run.dir={tmp_path / 'run'}"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert re.search(line, err), err
    assert not (tmp_path / "run").exists()  # refused before the run directory was opened


@pytest.mark.slow
@pytest.mark.parametrize("objective, data", [("kto", "kto_example"), ("simpo", "dpo_example")])
def test_the_other_objectives_continue_a_full_sft_run(full, objective, data):
    """KTO keeps a frozen copy of the SFT model as its reference, as DPO does; SimPO has none."""
    from mistral_align.train.dpo import DPOStage

    tmp = full["tmp"]
    trainers = []
    build = DPOStage.build_trainer

    def keep(self, *args, **kwargs):
        trainers.append(build(self, *args, **kwargs))
        return trainers[-1]

    root = Path(__file__).resolve().parents[1]
    run_dir = tmp / objective
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DPOStage, "build_trainer", keep)
        summary = run_recipe("dpo", [*COMMON, f"dpo.objective={objective}", f"dpo.init_from={tmp / 'sft'}",
                                     f"dpo.data.train=[{{path: {root / 'examples' / 'data' / (data + '.jsonl')}}}]",
                                     "dpo.synthetic.enabled=false", "dpo.data.eval_fraction=0.3", "dpo.train.max_steps=3", f"run.output_dir={tmp}",
                                     f"run.dir={run_dir}"])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    trainer = trainers[0]
    ref = getattr(trainer, "ref_model", None)
    if objective == "kto":
        assert manifest["reference"] == "frozen copy of the SFT model"
        assert ref is not None and all(not p.requires_grad for p in ref.parameters())
    else:
        assert manifest["reference"].startswith("none") and ref is None
    sft_weights, trained = _weights(tmp / "sft" / "model"), _weights(run_dir / "model")
    assert any(not torch.equal(sft_weights[k], trained[k]) for k in sft_weights)  # the whole model trained on
    assert summary["dpo"]["after"]["loss"] < summary["dpo"]["before"]["loss"]
