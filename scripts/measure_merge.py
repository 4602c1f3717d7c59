"""Measure `merge --base original` vs `--base dequantized` against the trained QLoRA model.

    python scripts/measure_merge.py RUN_DIR [--prompts-file FILE]

Reference: the run's base quantised as its quant node says, with the adapter (the model that was
trained and evaluated). For each merge: max |logit difference| over held-out rows (teacher-forced,
all positions), and greedy exact match of 16 new tokens on held-out prompts (prompts built by
MistralEncoder.encode_prompt). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv=None) -> int:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mistral_align.chat.encoder import get_encoder
    from mistral_align.chat.schema import Message
    from mistral_align.export.merge import load_merged
    from mistral_align.model.bnb_cpu import disable_cpu_inference_repacking
    from mistral_align.rundir.finished import quantization_config, resolve_source

    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--prompts", nargs="*", default=["copy: sun moon star", "copy: left right", "copy: apple pear plum",
                                                     "copy: up down", "copy: north south east", "copy: one one two"])
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--stage", default=None)
    a = ap.parse_args(argv)
    src = resolve_source(a.run_dir, a.stage)
    enc = get_encoder(src.tokenizer_version)
    rows = [enc.encode_sft([Message("user", p), Message("assistant", p.split(": ", 1)[-1])]).input_ids for p in a.prompts]
    prompts = [enc.encode_prompt([Message("user", p)]) for p in a.prompts]

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[(src.config.get("model") or {}).get("dtype", "float32")]
    qbase = AutoModelForCausalLM.from_pretrained(src.base, dtype=dtype, quantization_config=quantization_config(src.quant))
    disable_cpu_inference_repacking(qbase)
    ref = PeftModel.from_pretrained(qbase, str(src.adapter_dir)).eval()

    def logits(m):
        with torch.no_grad():
            return [m(input_ids=torch.tensor([r])).logits[0].float() for r in rows]

    def greedy(m):
        outs = []
        with torch.no_grad():
            for p in prompts:
                g = m.generate(input_ids=torch.tensor([p]), max_new_tokens=a.max_new_tokens, do_sample=False,
                               eos_token_id=enc.eos_id, pad_token_id=enc.eos_id)
                outs.append(g[0, len(p):].tolist())
        return outs

    ref_logits, ref_greedy = logits(ref), greedy(ref)
    scale = max(float(l.abs().max()) for l in ref_logits)
    result = {"run_dir": str(src.path), "quant": src.quant_mode, "rows": len(rows), "reference_max_abs_logit": scale}
    for base in ("original", "dequantized"):
        m = load_merged(src, torch.float32, base)
        lg, gr = logits(m), greedy(m)
        diffs = [float((x - y).abs().max()) for x, y in zip(lg, ref_logits)]
        argmax_agree = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(lg, ref_logits))
        positions = sum(x.shape[0] for x in lg)
        result[base] = {
            "max_abs_logit_diff": max(diffs),
            "mean_abs_logit_diff": sum(float((x - y).abs().mean()) for x, y in zip(lg, ref_logits)) / len(lg),
            "next_token_argmax_agreement": f"{argmax_agree}/{positions}",
            "greedy_exact_match": f"{sum(g == r for g, r in zip(gr, ref_greedy))}/{len(prompts)}",
        }
        del m
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
