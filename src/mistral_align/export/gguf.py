"""GGUF export for llama.cpp and its bindings, written with the `gguf` package.

    export_gguf("runs/demo", "demo.f16.gguf")                   # merged on the fly (dequantized base)
    export_gguf("merged/", "demo.q4_k_m.gguf", gguf_type="q4_k_m")

Follows llama.cpp's `convert_hf_to_gguf.py` (LlamaModel / MixtralModel): architecture `llama`,
q/k projection rows permuted from transformers' rotate-half layout to llama.cpp's interleaved
one, 2-D weights in f16 and norms in f32, experts stacked as `ffn_{gate,up,down}_exps`; the
vocabulary from the sentencepiece model that mistral-common ships (pieces, scores, token types:
normal / unknown / control / unused / byte), BOS/EOS/UNK ids, add-BOS on, and a Jinja chat
template for the tokenizer version. q8_0 and q4_k_m are made from the f16 file by llama.cpp's own
quantiser (`llama_cpp.llama_model_quantize`, from the optional `llama-cpp-python`).

Tekken (v3-tekken) is not exported: llama.cpp reads tekken vocabularies as a BPE tokenizer with
its own pre-tokenizer, which this exporter does not write yet; the error says so.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from mistral_align.chat.encoder import tokenizer_file
from mistral_align.chat.hf_tokenizer import native_file
from mistral_align.errors import UserError
from mistral_align.export.merge import merge_run
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


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute: HF rotate-half rows -> llama.cpp interleaved pairs.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab(version: str, n_vocab: int, model_dir: Path | None = None):
    import sentencepiece as spm
    from gguf import TokenType

    # The folder's own tokenizer file (the one its run encoded with), else mistral-common's for the version.
    path = (native_file(model_dir, version) if model_dir is not None else None) or tokenizer_file(version)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.IdToPiece(i).encode("utf-8"))
        scores.append(sp.GetScore(i))
        if sp.IsUnknown(i):
            t = TokenType.UNKNOWN
        elif sp.IsControl(i):
            t = TokenType.CONTROL
        elif sp.IsUnused(i):
            t = TokenType.UNUSED
        elif sp.IsByte(i):
            t = TokenType.BYTE
        else:
            t = TokenType.NORMAL
        types.append(t)
    for i in range(sp.vocab_size(), n_vocab):  # embeddings beyond the tokenizer: padding rows
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(TokenType.UNUSED)
    return tokens, scores, types, sp


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"{path}: no *.safetensors weights")
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def write_f16(model_dir: Path, out: Path, version: str, name: str = "mistral-align") -> Path:
    """Write an f16 GGUF from a plain transformers folder (Mistral or Mixtral)."""
    import json

    import gguf

    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    mtype = cfg.get("model_type")
    if mtype not in ("mistral", "mixtral", "llama"):
        raise GGUFExportError(f"{model_dir}: model_type {mtype!r}; only mistral and mixtral are exported")
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hidden, n_layer = cfg["hidden_size"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or hidden // n_head
    n_vocab = cfg["vocab_size"]
    tokens, scores, types, sp = _vocab(version, n_vocab, model_dir)
    if len(tokens) != n_vocab:
        raise GGUFExportError(f"tokenizer has {sp.vocab_size()} pieces but the model {n_vocab} embeddings")

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
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
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
    src = resolve_source(source, stage, allow_pickle)
    version = src.tokenizer_version
    if version is None:
        raise GGUFExportError(f"{src.path}: cannot tell the tokenizer version")
    if version == "v3-tekken":
        raise GGUFExportError(
            "tokenizer v3-tekken: GGUF export supports the sentencepiece vocabularies (v1, v2, v3, v7) only; "
            "llama.cpp reads tekken as a BPE vocabulary with its own pre-tokenizer, which this exporter does not write"
        )
    if gguf_type != "f16":
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise GGUFExportError(
                f"--type {gguf_type} needs llama-cpp-python (pip install 'mistral-align[gguf]'); --type f16 works without it"
            ) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mistral_align_gguf_") as tmp:
        if src.kind == "merged":
            model_dir = src.path
        else:
            model_dir = merge_run(src.path, Path(tmp) / "merged", dtype="fp32", base=base, stage=stage,
                                  allow_pickle=allow_pickle)
        name = src.path.name
        if gguf_type == "f16":
            return write_f16(model_dir, out, version, name)
        f16 = write_f16(model_dir, Path(tmp) / "model.f16.gguf", version, name)
        return quantize(f16, out, gguf_type)
