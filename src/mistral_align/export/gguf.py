"""GGUF export for llama.cpp and its bindings, written with the `gguf` package.

    export_gguf("runs/demo", "demo.f16.gguf")                   # merged on the fly (dequantized base)
    export_gguf("merged/", "demo.q4_k_m.gguf", gguf_type="q4_k_m")

Follows llama.cpp's `convert_hf_to_gguf.py` (LlamaModel / MixtralModel): architecture `llama`,
q/k projection rows permuted from transformers' rotate-half layout to llama.cpp's interleaved
one, 2-D weights in f16 and norms in f32, experts stacked as `ffn_{gate,up,down}_exps`.

The vocabulary is read from the run's own tokenizer file (else mistral-common's for the version)
by gguf-py's `MistralVocab`, as llama.cpp's converter does for Mistral models:

- sentencepiece (v1, v2, v3, v7): `tokenizer.ggml.model = llama`, pieces, scores and token types
  (normal / unknown / control / unused / byte).
- tekken (v3-tekken, v7-tekken, v11, v13): `tokenizer.ggml.model = gpt2` with the `tekken`
  pre-tokenizer, the special tokens as control tokens (ids 0 .. 999), then the byte-level pieces
  and the BPE merges recovered from their ranks; the pad token `<pad>`. llama.cpp's `tekken`
  pre-tokenizer is Mistral-Nemo's split pattern, so a tekken file with another pattern is refused
  before anything is merged.

BOS/EOS/UNK ids, add-BOS on, and a Jinja chat template for the tokenizer version's layout. q8_0
and q4_k_m are made from the f16 file by llama.cpp's own quantiser (`llama_cpp.llama_model_quantize`,
from the optional `llama-cpp-python`).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mistral_align.chat.encoder import tokenizer_file
from mistral_align.chat.hf_tokenizer import NATIVE_FILE_NAMES, native_file
from mistral_align.errors import UserError
from mistral_align.export.merge import merge_run
from mistral_align.names import TEKKEN_VERSIONS, TOKENIZER_VERSIONS
from mistral_align.rundir.finished import resolve_source

TYPES = ("f16", "q8_0", "q4_k_m")


class GGUFExportError(UserError):
    """An export that cannot be done as asked (one line for the user)."""


# Jinja templates per tokenizer version. They render the same text as the exact encoder for
# plain conversations; llama.cpp recognises them as its built-in mistral formats.
CHAT_TEMPLATES = {
    "v1": (
        "{{ bos_token }}{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else none %}"
        "{% set ns = namespace(first=true) %}"
        "{% for m in messages %}{% if m['role'] == 'user' %}"
        "{% if ns.first and sys %}{{ '[INST] ' + sys + '\n\n' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endif %}{% set ns.first = false %}"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "v3": (
        "{{ bos_token }}{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else none %}"
        "{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last = loop.index0 %}"
        "{% endif %}{% endfor %}"
        "{% for m in messages %}{% if m['role'] == 'user' %}"
        "{% if loop.index0 == ns.last and sys %}{{ '[INST]' + sys + '\n\n' + m['content'] + '[/INST]' }}"
        "{% else %}{{ '[INST]' + m['content'] + '[/INST]' }}{% endif %}"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "v7": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ '[SYSTEM_PROMPT]' + m['content'] + '[/SYSTEM_PROMPT]' }}"
        "{% elif m['role'] == 'user' %}{{ '[INST]' + m['content'] + '[/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
}
CHAT_TEMPLATES["v2"] = CHAT_TEMPLATES["v3"]
# Tekken versions lay a prompt out as a sentencepiece one does (chat/encoder.py): v3-tekken as v3
# (the system prompt joins the last user message), the later ones as v7 (a [SYSTEM_PROMPT] block).
CHAT_TEMPLATES["v3-tekken"] = CHAT_TEMPLATES["v3"]
for _version in ("v7-tekken", "v11", "v13"):
    CHAT_TEMPLATES[_version] = CHAT_TEMPLATES["v7"]

# The split pattern that llama.cpp's `tekken` pre-tokenizer implements (llama-vocab.cpp,
# LLAMA_VOCAB_PRE_TYPE_TEKKEN): Mistral-Nemo's, which every tekken file mistral-common ships has.
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute: HF rotate-half rows -> llama.cpp interleaved pairs.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class Vocab:
    """What the GGUF's `tokenizer.*` keys hold."""

    model: str  # tokenizer.ggml.model: "llama" (sentencepiece) or "gpt2" (tekken, byte-level BPE)
    tokens: list[bytes]
    scores: list[float]
    types: list[int]  # gguf.TokenType
    merges: list[str]  # BPE merges ("left right"), tekken only
    bos: int
    eos: int
    unk: int
    pad: int | None  # tekken's <pad>; sentencepiece files have none

    @property
    def pre(self) -> str:
        return "tekken" if self.model == "gpt2" else "default"


def check_tokenizer_file(version: str, path: Path) -> None:
    """Refuse, in one line, a tokenizer file whose GGUF llama.cpp would tokenize differently."""
    if version not in TEKKEN_VERSIONS:
        return
    pattern = json.loads(path.read_text(encoding="utf-8")).get("config", {}).get("pattern")
    if pattern != TEKKEN_PATTERN:
        raise GGUFExportError(
            f"{path}: this tekken file splits text with another pattern than Mistral-Nemo's, the only one llama.cpp's "
            "tekken pre-tokenizer implements, so a GGUF of it would not tokenize as the model was trained; "
            "serve the merged folder (mistral-align merge) with transformers or vLLM instead"
        )


def read_vocab(version: str, path: Path, n_vocab: int) -> Vocab:
    """The vocabulary of the tokenizer file at `path`, as llama.cpp's converter writes it (gguf-py's
    `MistralVocab`), padded with unused `[PADi]` entries up to the model's `n_vocab` embeddings."""
    from gguf import TokenType
    from gguf.vocab import MistralVocab

    check_tokenizer_file(version, path)
    with tempfile.TemporaryDirectory(prefix="mistral_align_vocab_") as folder:
        # MistralVocab looks for the file in a folder, under a name mistral-common recognises.
        (Path(folder) / NATIVE_FILE_NAMES[version]).symlink_to(Path(path).absolute())
        vocab = MistralVocab(Path(folder))
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(float(score))
        types.append(kind)
    if len(tokens) > n_vocab:
        raise GGUFExportError(f"the tokenizer has {len(tokens)} tokens but the model {n_vocab} embeddings")
    for i in range(len(tokens), n_vocab):  # embeddings beyond the tokenizer: padding rows
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(TokenType.UNUSED)
    tekken = vocab.gguf_tokenizer_model == "gpt2"
    return Vocab(
        model=vocab.gguf_tokenizer_model, tokens=tokens, scores=scores, types=types,
        merges=vocab.extract_vocab_merges_from_model() if tekken else [],
        bos=vocab.bos_id, eos=vocab.eos_id, unk=vocab.unk_id, pad=vocab.tokenizer.pad_id if tekken else None,
    )


def _add_vocab(w, vocab: Vocab) -> None:
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    w.add_bos_token_id(vocab.bos)
    w.add_eos_token_id(vocab.eos)
    w.add_unk_token_id(vocab.unk)
    if vocab.pad is not None:
        w.add_pad_token_id(vocab.pad)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"{path}: no *.safetensors weights")
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def model_config(folder: Path) -> dict:
    """A transformers folder's config.json, refused unless it is a Mistral or Mixtral model."""
    cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    mtype = cfg.get("model_type")
    if mtype not in ("mistral", "mixtral", "llama"):
        raise GGUFExportError(f"{folder}: model_type {mtype!r}; only mistral and mixtral are exported")
    return cfg


def write_f16(model_dir: Path, out: Path, version: str, name: str = "mistral-align", tokenizer: Path | None = None,
              vocab: Vocab | None = None) -> Path:
    """Write an f16 GGUF from a plain transformers folder (Mistral or Mixtral). The vocabulary: `vocab`
    if read already, else the tokenizer file `tokenizer`, else the folder's own, else mistral-common's."""
    import gguf

    cfg = model_config(model_dir)
    mtype = cfg["model_type"]
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hidden, n_layer = cfg["hidden_size"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or hidden // n_head
    n_vocab = cfg["vocab_size"]
    if vocab is None:
        vocab = read_vocab(version, tokenizer or native_file(model_dir, version) or tokenizer_file(version), n_vocab)
    if len(vocab.tokens) != n_vocab:
        raise GGUFExportError(f"the vocabulary has {len(vocab.tokens)} entries but the model {n_vocab} embeddings")

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(name)
    w.add_context_length(cfg.get("max_position_embeddings", 32768))
    w.add_embedding_length(hidden)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-5))
    rope_theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    w.add_rope_freq_base(float(rope_theta))
    if head_dim != hidden // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    if mtype == "mixtral":
        w.add_expert_count(cfg["num_local_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    _add_vocab(w, vocab)
    if version in CHAT_TEMPLATES:
        w.add_chat_template(CHAT_TEMPLATES[version])

    sd = _state_dict(model_dir)

    def put(name: str, t: torch.Tensor, keep_f32: bool = False):
        a = t.detach().to(torch.float32).numpy()
        if a.ndim > 1 and not keep_f32:
            a = a.astype(np.float16)
        w.add_tensor(name, a)

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(n_layer):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], True)
        put(f"blk.{i}.attn_q.weight", torch.from_numpy(_permute(sd[p + "self_attn.q_proj.weight"].float().numpy(), n_head)))
        put(f"blk.{i}.attn_k.weight", torch.from_numpy(_permute(sd[p + "self_attn.k_proj.weight"].float().numpy(), n_kv)))
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], True)
        if mtype == "mixtral":
            if p + "mlp.experts.gate_up_proj" in sd:  # fused layout: [experts, 2*ff, hidden], gate rows then up rows
                gate_up = sd[p + "mlp.experts.gate_up_proj"]
                ff = gate_up.shape[1] // 2
                router, gate, up, down = sd[p + "mlp.gate.weight"], gate_up[:, :ff, :], gate_up[:, ff:, :], sd[p + "mlp.experts.down_proj"]
            else:  # the Hub layout transformers 5 saves: block_sparse_moe.experts.E.w1 (gate) / w3 (up) / w2 (down)
                n_exp = cfg["num_local_experts"]
                e = p + "block_sparse_moe.experts."
                router = sd[p + "block_sparse_moe.gate.weight"]
                gate = torch.stack([sd[f"{e}{j}.w1.weight"] for j in range(n_exp)])
                up = torch.stack([sd[f"{e}{j}.w3.weight"] for j in range(n_exp)])
                down = torch.stack([sd[f"{e}{j}.w2.weight"] for j in range(n_exp)])
            put(f"blk.{i}.ffn_gate_inp.weight", router, True)
            put(f"blk.{i}.ffn_gate_exps.weight", gate)
            put(f"blk.{i}.ffn_up_exps.weight", up)
            put(f"blk.{i}.ffn_down_exps.weight", down)
        else:
            put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
            put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
            put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    put("output_norm.weight", sd["model.norm.weight"], True)
    head = sd.get("lm_head.weight")
    if head is not None and not cfg.get("tie_word_embeddings", False):
        put("output.weight", head)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def quantize(src: Path, dst: Path, gguf_type: str) -> Path:
    try:
        import llama_cpp
    except ImportError:
        raise GGUFExportError(
            f"--type {gguf_type} needs llama-cpp-python (pip install 'mistral-align[gguf]'); --type f16 works without it"
        ) from None
    ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[gguf_type]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = max(1, (os.cpu_count() or 1))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise GGUFExportError(f"llama.cpp quantisation to {gguf_type} failed (code {rc})")
    return dst


def export_gguf(source: str | Path, out: str | Path, *, gguf_type: str = "f16", stage: str | None = None,
                base: str = "dequantized", allow_pickle: bool = False) -> Path:
    if gguf_type not in TYPES:
        raise GGUFExportError(f"--type must be one of {', '.join(TYPES)}, got {gguf_type!r}")
    out = Path(out)
    if out.is_dir():
        raise GGUFExportError(f"--out {out}: is a directory; give a file name such as model.{gguf_type}.gguf")
    if gguf_type != "f16":
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise GGUFExportError(
                f"--type {gguf_type} needs llama-cpp-python (pip install 'mistral-align[gguf]'); --type f16 works without it"
            ) from None
    src = resolve_source(source, stage, allow_pickle)
    version = src.tokenizer_version
    if version is None:
        raise GGUFExportError(f"{src.path}: cannot tell the tokenizer version")
    if version not in TOKENIZER_VERSIONS:
        raise GGUFExportError(f"{src.path}: tokenizer version {version!r} is not one of {', '.join(TOKENIZER_VERSIONS)}")
    # Everything that can refuse the export is checked before a merge: the tokenizer file, and where
    # the model's config.json is at hand (a merged folder, a full fine-tune, an inline base), its type
    # and vocabulary size.
    tokenizer = src.tokenizer_file or tokenizer_file(version)
    if src.kind == "merged":
        config_at_hand = src.path
    elif src.is_full:  # the trained model itself, not the base it started from
        config_at_hand = src.model_dir
    else:
        config_at_hand = Path(src.base) if src.is_inline else None
    vocab = None
    if config_at_hand is not None:
        vocab = read_vocab(version, tokenizer, model_config(config_at_hand)["vocab_size"])
    else:  # a Hub base: its config comes with the merge
        check_tokenizer_file(version, tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mistral_align_gguf_") as tmp:
        if src.kind == "merged":
            model_dir = src.path
        else:
            model_dir = merge_run(src.path, Path(tmp) / "merged", dtype="fp32", base=base, stage=stage,
                                  allow_pickle=allow_pickle)
        name = src.path.name
        if gguf_type == "f16":
            return write_f16(model_dir, out, version, name, tokenizer, vocab)
        f16 = write_f16(model_dir, Path(tmp) / "model.f16.gguf", version, name, tokenizer, vocab)
        return quantize(f16, out, gguf_type)
