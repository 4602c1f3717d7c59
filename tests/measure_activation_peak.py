"""Measure the peak memory one training step adds, on the CPU, run as TRL 1.16's trainers run it.

    MALLOC_MMAP_THRESHOLD_=65536 python measure_activation_peak.py MODEL B S MODE[,MODE...] OVERRIDE...

prints one JSON line {MODE: bytes, ...}. MODEs: `sft` / `dpo`, with `-gc` or `-nogc` (gradient
checkpointing on / off). The model: MODEL's config with the overrides, NF4 + LoRA r=4, TRL's fused
LM head added before the adapter (`add_fused_lm_head`, as SFTTrainer and DPOTrainer do), scoring
labelled positions only as on a GPU (train/lm_head.py). One step: B rows of S random ids, every
position labelled; `dpo` runs 2B rows (chosen and rejected) and then, as DPOTrainer does after the
policy's forward, the reference's forward without gradients (the adapter switched off), before the
backward.

How: with MALLOC_MMAP_THRESHOLD_=65536 glibc serves every tensor bigger than 64 KiB with its own
mmap and unmaps it on free, so the resident set follows the live tensors. Before each step the
kernel's high-water mark of the resident set is reset (`/proc/self/clear_refs` <- 5, Linux 4.0+);
the figure is that mark after the step (VmHWM) minus the resident set just before it. So earlier
allocations (building and quantising the model, a warm-up step at length 16, another mode) never
count, and several modes can be measured in one process. Every weight is first copied out of the
safetensors file's mapping into anonymous memory: mapped, it became resident during the step page by
page (about 28 MB of a 64 MB embedding table for 1,024 random ids), and could be dropped again
under memory pressure. One thread.
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def reset_high_water_mark() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def step(model, ids, dpo: bool) -> None:
    backbone = model.get_base_model().model  # the decoder stack (LoRA sits inside it), without the LM head
    loss = backbone(input_ids=ids).last_hidden_state.square().mean()
    if dpo:
        with torch.no_grad(), model.disable_adapter():
            ref = backbone(input_ids=ids).last_hidden_state
        loss = loss + 0 * ref.sum()
    loss.backward()


def main() -> None:
    from test_model_build import cfg_for

    from mistral_align.chat import get_encoder
    from mistral_align.model.load import build_model
    from mistral_align.model.lora import apply_peft

    torch.set_num_threads(1)
    model_name, batch, length, modes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
    cfg = cfg_for(model_name, "peft.r=4", "peft.dropout=0", *sys.argv[5:])
    vocab = get_encoder(cfg.model.tokenizer_version).vocab_size
    m = build_model(cfg.model, cfg.quant, vocab_size=vocab, seed=0, device_map={"": "cpu"})
    m = apply_peft(m, cfg.peft, quantized=True, gradient_checkpointing=True)
    m.train()
    base_model = m.get_base_model()
    # Weights loaded from safetensors are mapped from the file: they become resident page by page as a
    # step first reads them, and the kernel may drop them again under memory pressure. Copies in
    # anonymous memory do neither, so neither is counted as (or against) a step's memory.
    for module in m.modules():
        for p in module.parameters(recurse=False):
            p.data = p.data.clone()
        for name, b in module.named_buffers(recurse=False):
            module._buffers[name] = b.clone()
    torch.manual_seed(0)
    peaks = {}
    for mode in modes:
        kind, checkpointing = mode.split("-")
        if checkpointing == "gc":
            base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            base_model.gradient_checkpointing_disable()
        rows = 2 * batch if kind == "dpo" else batch
        step(m, torch.randint(0, vocab, (rows, 16)), kind == "dpo")  # warm-up: lazy allocations
        ids = torch.randint(0, vocab, (rows, length))
        m.zero_grad(set_to_none=True)
        gc.collect()
        before = _status("VmRSS")
        reset_high_water_mark()
        step(m, ids, kind == "dpo")
        peaks[mode] = _status("VmHWM") - before
        m.zero_grad(set_to_none=True)
    print(json.dumps(peaks))


if __name__ == "__main__":
    main()
