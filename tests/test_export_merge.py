"""merge: dequantized vs original base against the trained QLoRA model; the folder loads without us."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from runfixtures import HELD_OUT, load_trained

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def qlora_run(tiny_run):
    return tiny_run  # conftest.py: make_run(arch="mistral-small", quant="nf4", steps=24), shared


def _rows(version="v3"):
    from mistral_align.chat.encoder import get_encoder
    from mistral_align.chat.schema import Message

    enc = get_encoder(version)
    return enc, [enc.encode_sft([Message("user", p), Message("assistant", p.split(": ")[1])]).input_ids for p in HELD_OUT]


def _logits(model, rows):
    with torch.no_grad():
        return [model(input_ids=torch.tensor([r])).logits[0] for r in rows]


def test_dequantized_merge_is_the_trained_model_original_is_not(qlora_run):
    from mistral_align.export.merge import load_merged
    from mistral_align.rundir.finished import resolve_source

    _, rows = _rows()
    ref = _logits(load_trained(qlora_run / "base", qlora_run / "adapter", "nf4"), rows)
    src = resolve_source(qlora_run)
    deq = _logits(load_merged(src, torch.float32, "dequantized"), rows)
    orig = _logits(load_merged(src, torch.float32, "original"), rows)
    d_deq = max(float((a - b).abs().max()) for a, b in zip(deq, ref))
    d_orig = max(float((a - b).abs().max()) for a, b in zip(orig, ref))
    assert d_deq < 1e-3, d_deq
    assert d_orig > 10 * d_deq, (d_orig, d_deq)


def test_merge_cli_writes_a_plain_transformers_folder(qlora_run, tmp_path):
    from mistral_align.chat.encoder import get_encoder
    from mistral_align.chat.schema import Message
    from mistral_align.entry.cli import main

    out = tmp_path / "merged"
    assert main(["merge", str(qlora_run), "--out", str(out), "--dtype", "fp32"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "config.json" in names and "generation_config.json" in names and "tokenizer_config.json" in names
    assert any(n.endswith(".safetensors") for n in names)
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "mistral"

    # Our own greedy outputs (the trained QLoRA model) on the held-out prompts.
    enc = get_encoder("v3")
    prompts = [enc.encode_prompt([Message("user", p)]) for p in HELD_OUT]
    trained = load_trained(qlora_run / "base", qlora_run / "adapter", "nf4")
    ours = []
    with torch.no_grad():
        for p in prompts:
            g = trained.generate(input_ids=torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=2)
            ours.append(g[0, len(p):].tolist())

    code = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        outs, tmpl = [], []
        for text in {HELD_OUT!r}:
            ids = tok.apply_chat_template([{{"role": "user", "content": text}}], add_generation_prompt=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            tmpl.append(list(ids))
            g = m.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=2)
            outs.append(g[0, len(ids):].tolist())
        assert not any(k.startswith("mistral_align") for k in sys.modules)
        print(json.dumps({{"outs": outs, "tmpl": tmpl}}))
    """)
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["tmpl"] == prompts
    assert got["outs"] == ours


def test_mixtral_merge_equals_the_adapter_model(tiny_mixtral_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mistral_align.entry.cli import main

    run = tiny_mixtral_run  # conftest: the session's Mixtral run (LoRA on every expert)
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(out), "--dtype", "fp32"]) == 0
    _, rows = _rows()
    from mistral_align.model.load import load_pretrained

    ref = PeftModel.from_pretrained(load_pretrained(str(run / "base")), str(run / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()  # stock transformers, fused experts
    assert type(merged).__name__ == "MixtralForCausalLM"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    for a, b in zip(_logits(merged, rows), _logits(ref, rows)):
        assert float((a - b).abs().max()) < 1e-4


def test_merge_user_mistakes_are_one_line_exit_2(qlora_run, tmp_path, capsys):
    from mistral_align.entry.cli import main

    assert main(["merge", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "no such directory" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert main(["merge", str(qlora_run), "--out", str(busy)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert main(["merge", str(qlora_run), "--out", str(tmp_path / "o2"), "--stage", "dpo"]) == 2
    assert "no dpo stage" in capsys.readouterr().err
