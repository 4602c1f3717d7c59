"""Measure the peak extra memory of one forward + backward of a tiny QLoRA model on the CPU.

Run in a fresh process (tests/test_estimate.py does):
`python measure_activation_peak.py MODEL gc|nogc B S OVERRIDE...` prints one JSON line {"peak": bytes}.

How: with MALLOC_MMAP_THRESHOLD_=65536 glibc serves every tensor bigger than 64 KiB with its own
mmap and unmaps it on free, so the resident set follows the live tensors. The peak is the
process's high-water RSS (getrusage ru_maxrss) minus the RSS just before the step, so each
mode (gradient checkpointing on / off) runs in its own process. One thread; a warm-up step at
length 16 first.
"""

from __future__ import annotations

import json
import os
import resource
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    from test_model_build import cfg_for

    from mistral_align.chat import get_encoder
    from mistral_align.model.load import build_model
    from mistral_align.model.lora import apply_peft

    torch.set_num_threads(1)
    model, gc, batch, length = sys.argv[1], sys.argv[2] == "gc", int(sys.argv[3]), int(sys.argv[4])
    cfg = cfg_for(model, "peft.r=4", "peft.dropout=0", *sys.argv[5:])
    vocab = get_encoder(cfg.model.tokenizer_version).vocab_size
    m = build_model(cfg.model, cfg.quant, vocab_size=vocab, seed=0, device_map={"": "cpu"})
    m = apply_peft(m, cfg.peft, quantized=True, gradient_checkpointing=gc)
    m.train()
    torch.manual_seed(0)
    warm = torch.randint(0, vocab, (batch, 16))
    m(input_ids=warm, labels=warm).loss.backward()
    ids = torch.randint(0, vocab, (batch, length))
    m.zero_grad(set_to_none=True)
    base = rss()
    m(input_ids=ids, labels=ids).loss.backward()
    print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base}))


if __name__ == "__main__":
    main()
