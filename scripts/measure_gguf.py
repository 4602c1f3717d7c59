"""Greedy agreement of GGUF files (run by llama-cpp-python) with the merged transformers model.

    python scripts/measure_gguf.py MERGED_DIR F16.gguf [Q8_0.gguf Q4_K_M.gguf ...] [--max-new-tokens 16]

Prompts are built by MistralEncoder.encode_prompt and fed to both as ids. The f16 file is compared
with transformers; every file is also compared with the f16 file. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

PROMPTS = ["copy: sun moon star", "copy: left right", "copy: apple pear plum", "copy: up down",
           "copy: north south east", "copy: one one two", "Hello, who are you?", "copy: [INST] stays text"]


def llama_greedy(path: str, prompts: list[list[int]], n: int, eos: int = 2) -> list[list[int]]:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=512, n_threads=2, verbose=False, seed=0)
    outs = []
    for p in prompts:
        llm.reset()
        toks = []
        for t in llm.generate(p, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if t == eos or len(toks) >= n:
                break
            toks.append(int(t))
        outs.append(toks)
    return outs


def hf_greedy(model_dir: str, prompts: list[list[int]], n: int, eos: int = 2) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            g = m.generate(input_ids=torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos)
            o = g[0, len(p):].tolist()
            outs.append([t for t in o if t != eos][: n] if eos not in o else o[: o.index(eos)])
    return outs


def main(argv=None) -> int:
    from mistral_align.chat.encoder import get_encoder
    from mistral_align.chat.schema import Message
    from mistral_align.rundir.finished import resolve_source

    ap = argparse.ArgumentParser()
    ap.add_argument("merged")
    ap.add_argument("f16")
    ap.add_argument("others", nargs="*")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    a = ap.parse_args(argv)
    enc = get_encoder(resolve_source(a.merged).tokenizer_version)
    prompts = [enc.encode_prompt([Message("user", p)]) for p in PROMPTS]
    hf = hf_greedy(a.merged, prompts, a.max_new_tokens)
    f16 = llama_greedy(a.f16, prompts, a.max_new_tokens)
    res = {"prompts": len(prompts), "max_new_tokens": a.max_new_tokens,
           "f16": {"bytes": os.path.getsize(a.f16), "exact_match_vs_transformers": f"{sum(x == y for x, y in zip(hf, f16))}/{len(prompts)}"}}
    for path in a.others:
        o = llama_greedy(path, prompts, a.max_new_tokens)
        res[os.path.basename(path)] = {"bytes": os.path.getsize(path),
                                       "exact_match_vs_f16": f"{sum(x == y for x, y in zip(o, f16))}/{len(prompts)}",
                                       "exact_match_vs_transformers": f"{sum(x == y for x, y in zip(o, hf))}/{len(prompts)}"}
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
