"""Held-out evaluation by greedy generation, scored by exact match on token ids.

Prompts and references come straight from a tokenised eval set (input_ids + labels): the prompt
is everything before the last trained run of labels (the final assistant reply), the reference
is that run (reply + EOS). So the prompt is exactly the mistral-common encoding and a reply
counts as correct only if the model produces the reference ids and then stops.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Sequence

import torch

from mistral_align.chat.encoder import IGNORE_INDEX


def _text(encoder, ids) -> str:
    # mistral-common keeps sentencepiece's "▁" when control tokens are kept; show plain spaces
    return encoder.decode(list(ids)).replace("\u2581", " ").strip()


def split_prompt_reference(input_ids: Sequence[int], labels: Sequence[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, reference ids) for the last trained run of `labels`."""
    end = max(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return list(input_ids[:start]), list(input_ids[start:end])


@torch.no_grad()
def greedy_generate(model, prompts: list[list[int]], eos_id: int, pad_id: int, max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """Greedy continuations (ids, cut after the first EOS, EOS kept) of left-padded prompt batches."""
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    outs: list[list[int]] = []
    for b in range(0, len(prompts), batch_size):
        batch = prompts[b : b + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )
        for row in gen[:, width:].tolist():
            outs.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    if was_training:
        model.train()
    return outs


def generation_eval(
    model,
    encoder,
    eval_ds,
    max_prompts: int = 64,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    group: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """Exact match of greedy replies on up to `max_prompts` held-out rows (overall and per group)."""
    rows = eval_ds.select(range(min(max_prompts, len(eval_ds))))
    pairs = [split_prompt_reference(r["input_ids"], r["labels"]) for r in rows]
    pad_id = encoder.pad_id if encoder.pad_id >= 0 else 0
    outputs = greedy_generate(model, [p for p, _ in pairs], encoder.eos_id, pad_id, max_new_tokens, batch_size)
    samples = []
    by_group: dict[str, list[bool]] = defaultdict(list)
    for (prompt, ref), out in zip(pairs, outputs):
        ok = out == ref
        text = _text(encoder, [i for i in prompt if i != encoder.bos_id])
        samples.append(
            {
                "prompt": text,
                "reference": _text(encoder, [i for i in ref if i != encoder.eos_id]),
                "output": _text(encoder, [i for i in out if i != encoder.eos_id]),
                "correct": ok,
            }
        )
        if group is not None:
            by_group[group(text)].append(ok)
    n = len(samples)
    return {
        "exact_match": sum(s["correct"] for s in samples) / max(n, 1),
        "n": n,
        "by_group": {k: sum(v) / len(v) for k, v in sorted(by_group.items())},
        "samples": samples,
    }
