"""The choices a user makes, end to end (issue 17): model family x tokenizer family x peft x quant.

Each training cell runs the real recipes/sft_dpo.py in this process (SFT 2 steps, DPO 1 step, on the
tiniest models: 2 layers, 64 wide; Mixtral with 4 experts), then the CLI's verbs on its run
directory: push --dry-run, merge, chat, export-gguf f16 (from the merged folder). A cell passes when
SFT's held-out loss falls, DPO changes what SFT trained, and every verb exits 0 with what it must
write (the files of an adapter or of a whole model; the stock Mixtral layout where experts were
trained; a GGUF with the vocabulary and, for Mixtral, the experts). The refusal cells prove the
choice stops at config check in one line, exit 2, before the run directory is made.

The cells cover every value and every pair of values (pairwise), peft=none only with quant=none
(the pairs with quantised weights are the refusals):

| cell | family  | tokenizer         | peft      | quant | outcome                                            |
|------|---------|-------------------|-----------|-------|----------------------------------------------------|
| 1    | Mixtral | tekken v3-tekken  | lora      | nf4   | SFT -> DPO -> push -> merge -> chat -> GGUF f16     |
| 2    | Mistral | sentencepiece v3  | lora      | int8  | SFT -> DPO -> push -> merge -> chat -> GGUF f16     |
| 3    | Mistral | sentencepiece v3  | lora      | none  | SFT -> DPO -> push -> merge -> chat -> GGUF f16     |
| 4    | Mistral | sentencepiece v3  | lora-attn | nf4   | SFT -> DPO -> push -> merge -> chat -> GGUF f16     |
| 5    | Mixtral | tekken v3-tekken  | lora-attn | int8  | SFT -> DPO -> push -> merge -> chat -> GGUF f16     |
| 6    | Mixtral | sentencepiece v1  | lora-attn | none  | SFT -> DPO -> push -> merge -> chat -> GGUF f16     |
| 7    | Mistral | tekken v3-tekken  | none      | none  | SFT -> DPO -> push -> merge -> chat -> GGUF f16     |
| 8    | Mixtral | sentencepiece v1  | none      | none  | SFT -> DPO -> push -> merge -> chat -> GGUF f16     |
| 9    | Mistral | sentencepiece v3  | none      | nf4   | refused at config check: `peft.method: 'none' ...` |
| 10   | Mixtral | tekken v3-tekken  | none      | int8  | refused at config check: `peft.method: 'none' ...` |

A tekken cell's GGUF is the byte-level BPE vocabulary llama.cpp reads (export/gguf.py); its ids
are checked against mistral-common's in tests/test_export_gguf_tekken.py.

    .venv/bin/python -m pytest -q tests/test_matrix.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from runfixtures import run_recipe
from safetensors.torch import load_file

from mistral_align.entry.cli import main as cli

SENTENCEPIECE, TEKKEN = "sentencepiece", "tekken"
VERSION = {("mistral", SENTENCEPIECE): "v3", ("mixtral", SENTENCEPIECE): "v1",
           ("mistral", TEKKEN): "v3-tekken", ("mixtral", TEKKEN): "v3-tekken"}  # fmt: skip

TRAINED = [  # family, tokenizer, peft, quant
    ("mixtral", TEKKEN, "lora", "nf4"),
    ("mistral", SENTENCEPIECE, "lora", "int8"),
    ("mistral", SENTENCEPIECE, "lora", "none"),
    ("mistral", SENTENCEPIECE, "lora-attn", "nf4"),
    ("mixtral", TEKKEN, "lora-attn", "int8"),
    ("mixtral", SENTENCEPIECE, "lora-attn", "none"),
    ("mistral", TEKKEN, "none", "none"),
    ("mixtral", SENTENCEPIECE, "none", "none"),
]
REFUSED = [("mistral", SENTENCEPIECE, "none", "nf4"), ("mixtral", TEKKEN, "none", "int8")]
VALUES = {"family": {"mistral", "mixtral"}, "tokenizer": {SENTENCEPIECE, TEKKEN},
          "peft": {"lora", "lora-attn", "none"}, "quant": {"nf4", "int8", "none"}}  # fmt: skip


def overrides(family: str, tokenizer: str, peft: str, quant: str, run_dir: Path) -> list[str]:
    return [
        "experiment=test_tiny", f"model=tiny-{family}", f"model.tokenizer_version={VERSION[family, tokenizer]}",
        f"peft={peft}", f"quant={quant}", f"run.dir={run_dir}", f"run.output_dir={run_dir.parent}",
        "sft.train.max_steps=2", "sft.train.lr=1e-2", "dpo.train.max_steps=1", "dpo.eval.loss_before=false",
        # Every step at the full rate: with warmup, a one-step stage would train at a rate of 0.
        "sft.train.lr_scheduler=constant", "sft.train.warmup_ratio=0", "dpo.train.lr_scheduler=constant",
        "dpo.train.warmup_ratio=0",
        "sft.synthetic.n_train=8", "sft.synthetic.n_eval=2", "dpo.synthetic.n_train=4", "dpo.synthetic.n_eval=2",
        "sft.train.save_steps=100", "dpo.train.save_steps=100",
        "sft.train.gradient_checkpointing=false", "dpo.train.gradient_checkpointing=false",
    ]  # fmt: skip


def test_the_cells_cover_every_value_and_every_pair():
    cells = TRAINED + REFUSED
    names = list(VALUES)
    for i, a in enumerate(names):
        assert {c[i] for c in cells} == VALUES[a]
        for j in range(i + 1, len(names)):
            b = names[j]
            pairs = {(c[i], c[j]) for c in cells}
            assert pairs == {(x, y) for x in VALUES[a] for y in VALUES[b]}, (a, b)


def _cell_id(cell) -> str:
    return "-".join(cell)


def _weights(folder: Path) -> dict:
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(str(folder / name))


@pytest.mark.slow
@pytest.mark.parametrize("cell", TRAINED, ids=_cell_id)
def test_a_cell_trains_and_every_verb_takes_its_run(cell, tmp_path, capsys):
    import gguf

    family, tokenizer, peft, quant = cell
    run = tmp_path / "run"
    summary = run_recipe("sft_dpo", overrides(*cell, run))
    s = summary["sft"]
    print(f"\n{_cell_id(cell)}: SFT held-out loss {s['before']['loss']:.4f} -> {s['after']['loss']:.4f}")
    assert s["after"]["loss"] < s["before"]["loss"]

    folder = "model" if peft == "none" else "adapter"
    sft, dpo = _weights(run / "sft" / folder), _weights(run / "dpo" / folder)
    assert sft.keys() == dpo.keys() and any((sft[k] != dpo[k]).any() for k in sft)  # DPO trained on SFT's
    facts = json.loads((run / "manifest.json").read_text())["dpo"]["model"]
    assert facts["model_type"] == family
    assert (facts["linear_4bit"] > 0) == (quant == "nf4") and (facts["linear_8bit"] > 0) == (quant == "int8")
    assert (facts["trainable_params"] == facts["total_params"]) == (peft == "none")

    pushed = tmp_path / "push"
    assert cli(["push", str(run), "--repo-id", "me/cell", "--dry-run", str(pushed)]) == 0
    card = (pushed / "README.md").read_text()
    if peft == "none":
        assert (pushed / "model.safetensors").is_file() and "library_name: transformers\n" in card
    else:
        config = json.loads((pushed / "adapter_config.json").read_text())
        experts = family == "mixtral" and peft == "lora"  # lora-attn leaves the experts alone
        assert bool(config.get("target_parameters")) == experts and "library_name: peft\n" in card

    merged = tmp_path / "merged"
    assert cli(["merge", str(run), "--out", str(merged), "--dtype", "fp32"]) == 0
    stock = {"mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}[family]
    assert json.loads((merged / "config.json").read_text())["architectures"] == [stock]

    replies = []
    for source in (run, merged):
        capsys.readouterr()
        assert cli(["chat", str(source), "--prompt", "copy: red green", "--temperature", "0", "--max-new-tokens", "4",
                    "--no-stream"]) == 0  # fmt: skip
        replies.append(capsys.readouterr().out)
    if quant == "none":  # the same model, run or merged; a quantised run's merge is its dequantised weights
        assert replies[0] == replies[1]

    gguf_file = tmp_path / "cell.f16.gguf"
    assert cli(["export-gguf", str(merged), "--out", str(gguf_file)]) == 0
    reader = gguf.GGUFReader(str(gguf_file))
    tensors = {t.name for t in reader.tensors}
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    assert vocab == json.loads((merged / "config.json").read_text())["vocab_size"]
    assert ("blk.0.ffn_gate_exps.weight" in tensors) == (family == "mixtral")


@pytest.mark.parametrize("cell", REFUSED, ids=_cell_id)
def test_a_refused_cell_stops_at_config_check_in_one_line(cell, tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run_recipe("sft_dpo", overrides(*cell, run))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == (
        "error: peft.method: 'none' (full fine-tune) cannot train quantised weights; use quant=none or peft=lora")
    assert not run.exists()
