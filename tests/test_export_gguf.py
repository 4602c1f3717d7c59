"""export-gguf: gguf's reader and transformers read the file back; llama.cpp runs it and agrees."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from runfixtures import make_run, needs_llama

pytestmark = pytest.mark.slow
gguf = pytest.importorskip("gguf", reason="gguf is not installed")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

PROMPTS = ["copy: sun moon star", "copy: left right", "Hello, who are you?", "copy: [INST] stays text"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from mistral_align.entry.cli import main

    root = tmp_path_factory.mktemp("gguf")
    run = make_run(root / "run", arch="mistral-small", quant="nf4", steps=16)
    assert main(["merge", str(run), "--out", str(root / "merged"), "--dtype", "fp32"]) == 0
    assert main(["export-gguf", str(run), "--out", str(root / "model.f16.gguf")]) == 0  # a run: merged on the fly
    return run, root / "merged", root / "model.f16.gguf"


def _prompts():
    from mistral_align.chat.encoder import get_encoder
    from mistral_align.chat.schema import Message

    enc = get_encoder("v3")
    return enc, [enc.encode_prompt([Message("user", p)]) for p in PROMPTS]


def test_gguf_reader_reads_metadata_vocab_and_tensors(exported):
    _, _, f16 = exported
    r = gguf.GGUFReader(str(f16))

    def field(name):
        f = r.fields[name]
        v = f.parts[f.data[0]]
        return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v[0]

    assert field("general.architecture") == "llama"
    assert field("llama.embedding_length") == 64 and field("llama.block_count") == 2
    assert field("llama.attention.head_count_kv") == 2 and field("llama.rope.dimension_count") == 16
    assert field("tokenizer.ggml.model") == "llama"
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id"), field("tokenizer.ggml.unknown_token_id")) == (1, 2, 0)
    assert "[INST]" in field("tokenizer.chat_template")
    tokens = r.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == 32768
    assert bytes(tokens.parts[tokens.data[3]]).decode() == "[INST]"
    types = r.fields["tokenizer.ggml.token_type"]
    assert int(types.parts[types.data[3]][0]) == gguf.TokenType.CONTROL
    assert len(r.fields["tokenizer.ggml.scores"].data) == 32768
    names = {t.name for t in r.tensors}
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight"} <= names
    kinds = {t.name: t.tensor_type for t in r.tensors}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_transformers_loads_the_gguf_back(exported):
    from transformers import AutoModelForCausalLM

    _, merged, f16 = exported
    back = AutoModelForCausalLM.from_pretrained(str(f16.parent), gguf_file=f16.name, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    _, prompts = _prompts()
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor([p])
            a, b = back(x).logits, ref(x).logits
            assert float((a - b).abs().max()) < 0.05 * float(b.abs().max())  # f16 rounding only
            assert torch.equal(a.argmax(-1), b.argmax(-1))


@needs_llama
def test_llama_cpp_greedy_equals_the_merged_model(exported):
    from measure_gguf import hf_greedy, llama_greedy

    _, merged, f16 = exported
    _, prompts = _prompts()
    assert llama_greedy(str(f16), prompts, 12) == hf_greedy(str(merged), prompts, 12)


@needs_llama
def test_llama_cpp_tokenizes_text_like_our_encoder(exported):
    from llama_cpp import Llama

    _, _, f16 = exported
    enc, _ = _prompts()
    llm = Llama(model_path=str(f16), n_ctx=64, vocab_only=True, verbose=False)
    for text in ["Hello world", "copy: [INST] stays text", "  two  spaces", "héllo 数字 123"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == enc.text(text)


@needs_llama
def test_quantised_types_are_written_and_run(exported, tmp_path):
    from llama_cpp import Llama

    from mistral_align.entry.cli import main

    _, merged, f16 = exported
    sizes = {"f16": f16.stat().st_size}
    for t in ("q8_0", "q4_k_m"):
        out = tmp_path / f"model.{t}.gguf"
        assert main(["export-gguf", str(merged), "--out", str(out), "--type", t]) == 0
        sizes[t] = out.stat().st_size
        llm = Llama(model_path=str(out), n_ctx=64, verbose=False)
        assert len(llm.tokenize(b"hi")) >= 1
    assert sizes["q4_k_m"] < sizes["q8_0"] < sizes["f16"]


def test_a_vocabulary_the_model_does_not_have_and_bad_targets_are_one_line_errors(exported, tmp_path, capsys):
    """A folder that names tekken (131,072 tokens) for a model of 32,768 embeddings; --out a folder."""
    from mistral_align.entry.cli import main

    _, merged, _ = exported
    tek = tmp_path / "tek"
    shutil.copytree(merged, tek)
    cfg = json.loads((tek / "tokenizer_config.json").read_text())
    cfg["mistral_tokenizer_version"] = "v3-tekken"
    (tek / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert main(["export-gguf", str(tek), "--out", str(tmp_path / "t.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "131072 tokens but the model 32768 embeddings" in err
    assert main(["export-gguf", str(merged), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


@needs_llama
def test_gguf_chat_template_rendered_by_llama_cpp_python_gives_our_ids(exported):
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from mistral_align.chat.schema import Message

    _, _, f16 = exported
    enc, _ = _prompts()
    r = gguf.GGUFReader(str(f16))
    f = r.fields["tokenizer.chat_template"]
    template = bytes(f.parts[f.data[0]]).decode()
    llm = Llama(model_path=str(f16), n_ctx=64, vocab_only=True, verbose=False)
    fmt = Jinja2ChatFormatter(template, eos_token="</s>", bos_token="<s>")
    convs = [[("user", "Hi")], [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye")],
             [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"), ("user", "e")]]
    for c in convs:
        prompt = fmt(messages=[{"role": a, "content": b} for a, b in c]).prompt
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        assert ids == enc.encode_prompt([Message(a, b) for a, b in c]), prompt
    # A typed "[INST]" cannot stay text through any text template (llama.cpp parses specials in the
    # rendered prompt); only our own encoder (mistral-align chat) keeps it text.


@needs_llama
def test_mixtral_gguf_logits_match_transformers(tmp_path):
    import numpy as np
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    from mistral_align.entry.cli import main

    run = make_run(tmp_path / "mix", arch="mixtral", quant="none", steps=8)
    assert main(["merge", str(run), "--out", str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    out = tmp_path / "mix.f16.gguf"
    assert main(["export-gguf", str(tmp_path / "merged"), "--out", str(out)]) == 0
    r = gguf.GGUFReader(str(out))
    assert {"blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight", "blk.0.ffn_down_exps.weight",
            "blk.0.ffn_gate_inp.weight"} <= {t.name for t in r.tensors}
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    llm = Llama(model_path=str(out), n_ctx=128, logits_all=True, verbose=False)
    _, prompts = _prompts()
    for p in prompts:
        with torch.no_grad():
            want = ref(torch.tensor([p])).logits[0].numpy()
        llm.reset()
        llm.eval(p)
        got = np.array(llm.scores[: len(p)])
        # f16 weights: differences of a few 1e-4 on logits of about 1; a layout error gives O(1).
        assert np.abs(got - want).max() < 0.02 * np.abs(want).max()
