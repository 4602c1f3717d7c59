"""export-gguf for tekken vocabularies (v3-tekken, v7-tekken, v11, v13): the GGUF's tokenizer gives
mistral-common's ids for text and for its chat template, read back by transformers' GGUF tokenizer
loader here and by llama.cpp where llama-cpp-python is installed (issue 17 item 2)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from runfixtures import make_run, needs_llama

pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

TEKKEN = ("v3-tekken", "v7-tekken", "v11", "v13")

# Text a user may send: several scripts, emoji (with a skin tone and a flag), runs of spaces, tabs
# and newlines, capitals with accents, a combining mark, code, and control tokens typed as text.
TEXTS = [
    "Hello world",
    "  two  spaces\tand a tab\n\nand blank lines\n",
    "多语言文本：中文，日本語のテキスト、한국어 문장",
    "emoji 🎉👍🏽 ok 🇫🇷!",
    "ÉCOLE Ünïcode naïve café ÀÉÎÕÜ",
    "e\u0301 combining and ﬁ ligature",
    "def f(x):\n    return x ** 2  # square\n",
    "3.14159 and 2024-12-06, 1,000,000",
    "مرحبا بالعالم",
    "path/to/file\n/next line",
    "[INST] typed [/INST] <s></s> [SYSTEM_PROMPT] [TOOL_CALLS] [THINK] <SPECIAL_20> <pad>",
]
# Devanagari: vowel signs and the virama are combining marks (\p{M}), which Mistral-Nemo's split
# pattern keeps in a word and llama.cpp's `tekken` pre-tokenizer (llama-cpp-python 0.3.36) splits off.
COMBINING_MARKS = "नमस्ते दुनिया"
CONVERSATIONS = [
    [("user", "Hi")],
    [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "数字は？")],
    [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d 🎉"), ("user", "e")],
]


def merged_folder(root: Path, version: str) -> Path:
    """A tiny random Mistral with the version's vocabulary, as `mistral-align merge` leaves it."""
    from transformers import MistralConfig, MistralForCausalLM

    from mistral_align.chat.encoder import get_encoder
    from mistral_align.chat.hf_tokenizer import save_hf_tokenizer

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=get_encoder(version).vocab_size, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    MistralForCausalLM(config).save_pretrained(root)
    save_hf_tokenizer(version, root)
    return root


@pytest.fixture(scope="module", params=TEKKEN)
def tekken_gguf(request, tmp_path_factory):
    """(version, GGUF path, the GGUF's tokenizer as transformers reads it, the run or merged folder).
    v3-tekken is exported from a run (an NF4 + LoRA adapter merged on the fly, the path that ended
    in a traceback), the others from a merged folder."""
    from transformers import PreTrainedTokenizerFast

    from mistral_align.entry.cli import main

    version = request.param
    root = tmp_path_factory.mktemp(f"gguf-{version}")
    if version == "v3-tekken":
        source = make_run(root / "run", arch="mistral-small", quant="nf4", steps=2, version=version)
    else:
        source = merged_folder(root / "merged", version)
    out = root / "gguf" / "model.f16.gguf"  # a folder of its own: AutoTokenizer must not see tokenizer_config.json
    assert main(["export-gguf", str(source), "--out", str(out)]) == 0
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(out.parent), gguf_file=out.name)
    return version, out, tokenizer, source


def test_the_gguf_holds_a_bpe_vocabulary_with_the_tekken_pre_tokenizer(tekken_gguf):
    from transformers.integrations.gguf import read_gguf_metadata

    from mistral_align.chat.encoder import get_encoder

    version, path, _, _ = tekken_gguf
    enc = get_encoder(version)
    meta, tensors = read_gguf_metadata(str(path), ("tokenizer.ggml.tokens",))
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "tekken"
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == enc.vocab_size == 131072 and meta["llama.vocab_size"] == 131072
    n_special = enc.raw.num_special_tokens
    assert tokens[:n_special] == [enc.raw.id_to_piece(i) for i in range(n_special)]
    assert list(types[:n_special]) == [3] * n_special and set(types[n_special:]) == {1}  # CONTROL, NORMAL
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.unknown_token_id"], meta["tokenizer.ggml.padding_token_id"]) == (1, 2, 0, 11)
    assert meta["tokenizer.ggml.add_bos_token"] is True and "[INST]" in meta["tokenizer.chat_template"]
    assert "blk.0.attn_q.weight" in tensors and "output.weight" in tensors


def test_text_is_tokenized_as_mistral_common_does(tekken_gguf):
    from mistral_align.chat.encoder import get_encoder

    version, _, tokenizer, _ = tekken_gguf
    enc = get_encoder(version)
    for text in (*TEXTS, COMBINING_MARKS):  # as data: control tokens typed by a user stay text
        assert tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True) == enc.text(text), text
    # Spelt as control tokens (what a chat template writes), each of the version's specials is its id.
    specials = [enc.raw.id_to_piece(i) for i in range(enc.raw.num_special_tokens)]
    assert tokenizer.convert_tokens_to_ids(specials) == list(range(len(specials)))
    assert tokenizer.encode("[INST]hi[/INST]", add_special_tokens=False) == [enc.begin_inst, *enc.text("hi"), enc.end_inst]


def test_the_chat_template_gives_our_encoders_ids(tekken_gguf):
    from mistral_align.chat.encoder import get_encoder
    from mistral_align.chat.schema import Message

    version, _, tokenizer, _ = tekken_gguf
    enc = get_encoder(version)
    for conversation in CONVERSATIONS:
        ids = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in conversation], tokenize=True,
                                            return_dict=True)["input_ids"]
        assert ids == enc.encode_prompt([Message(r, c) for r, c in conversation]), conversation


def test_a_tekken_file_llama_cpp_would_split_otherwise_is_refused_before_the_merge(tmp_path, capsys, monkeypatch):
    """llama.cpp's `tekken` pre-tokenizer is Mistral-Nemo's split pattern; a file with another is
    refused in one line before anything is merged."""
    import mistral_align.export.gguf as gguf_export
    from mistral_align.entry.cli import main

    run = make_run(tmp_path / "run", arch="mistral-small", quant="none", steps=1, version="v3-tekken")
    for folder in (run / "adapter", run / "tokenizer"):
        data = json.loads((folder / "tekken.json").read_text(encoding="utf-8"))
        data["config"]["pattern"] = r"\p{L}+|\p{N}|\s+|[^\s\p{L}\p{N}]+"
        (folder / "tekken.json").write_text(json.dumps(data), encoding="utf-8")

    def no_merge(*args, **kwargs):
        raise AssertionError("merged before the refusal")

    monkeypatch.setattr(gguf_export, "merge_run", no_merge)
    capsys.readouterr()
    assert main(["export-gguf", str(run), "--out", str(tmp_path / "t.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pattern" in err and "tekken" in err
    assert not (tmp_path / "t.gguf").exists()


@needs_llama
def test_llama_cpp_tokenizes_text_and_the_template_like_mistral_common(tekken_gguf):
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from mistral_align.chat.encoder import get_encoder
    from mistral_align.chat.schema import Message

    version, path, _, _ = tekken_gguf
    enc = get_encoder(version)
    llm = Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
    differ = {text: (llm.tokenize(text.encode(), add_bos=False, special=False), enc.text(text)) for text in TEXTS}
    differ = {t: v for t, v in differ.items() if v[0] != v[1]}
    assert not differ, differ
    # The known difference (README.md): other ids, more of them, for the same text.
    ids = llm.tokenize(COMBINING_MARKS.encode(), add_bos=False, special=False)
    assert len(ids) > len(enc.text(COMBINING_MARKS)) and llm.detokenize(ids).decode() == COMBINING_MARKS
    template = llm.metadata["tokenizer.chat_template"]
    fmt = Jinja2ChatFormatter(template, eos_token="</s>", bos_token="<s>")
    for conversation in CONVERSATIONS:
        prompt = fmt(messages=[{"role": r, "content": c} for r, c in conversation]).prompt
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == enc.encode_prompt(
            [Message(r, c) for r, c in conversation]), prompt


@needs_llama
@pytest.mark.parametrize("tekken_gguf", ["v3-tekken"], indirect=True)  # the run: weights are written alike for all
def test_llama_cpp_greedy_equals_the_merged_tekken_model(tekken_gguf, tmp_path):
    from measure_gguf import hf_greedy, llama_greedy

    from mistral_align.chat.encoder import get_encoder
    from mistral_align.chat.schema import Message
    from mistral_align.entry.cli import main

    version, path, _, source = tekken_gguf
    merged = tmp_path / "merged"
    assert main(["merge", str(source), "--out", str(merged), "--dtype", "fp32"]) == 0
    enc = get_encoder(version)
    prompts = [enc.encode_prompt([Message("user", p)]) for p in ("copy: sun moon star", "数字 🎉", "Hello, who are you?")]
    assert llama_greedy(str(path), prompts, 8) == hf_greedy(str(merged), prompts, 8)
