"""Held-out evaluation by greedy generation, scored by exact match on token ids.

Prompts and references come straight from a tokenised eval set (input_ids + labels): the prompt
is everything before the last trained run of labels (the final assistant reply), the reference
is that run (reply + EOS). So the prompt is exactly the mistral-common encoding and a reply
counts as correct only if the model produces the reference ids and then stops; a reference that
calls tools is matched by its calls instead (`reply_matches`): a call's id is the model's to choose.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch

from mistral_align.chat.decode import decode_reply
from mistral_align.chat.encoder import IGNORE_INDEX
from mistral_align.chat.messages import ConversationError, Message

log = logging.getLogger("mistral_align")


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


def _calls(m: Message) -> list[tuple[str, object]]:
    return [(c.name, json.loads(c.arguments)) for c in m.tool_calls]


def reply_matches(encoder, output: Sequence[int], reference: Sequence[int]) -> bool:
    """Whether a generated reply is the reference: the same ids; or, where the reference calls tools,
    the same calls (each one's name and arguments equal as JSON, in order; ids aside) and text, read
    with mistral-common's own decoding (chat/decode.py), and the reply stops (its EOS) as the reference does."""
    output, reference = list(output), list(reference)
    if output == reference:
        return True
    expected = decode_reply(encoder, reference)
    stops = bool(output) and output[-1] == encoder.eos_id
    if not expected.tool_calls or (reference[-1:] == [encoder.eos_id] and not stops):
        return False
    try:
        got = decode_reply(encoder, output)
    except ConversationError:  # a call that is not one: no JSON list, no name
        return False
    return got.content == expected.content and _calls(got) == _calls(expected)


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
    return score_replies(encoder, pairs, outputs, group)


def score_replies(encoder, pairs: Sequence[tuple[list[int], list[int]]], outputs: Sequence[list[int]],
                  group: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Exact match (`reply_matches`) of generated replies to their (prompt, reference) pairs, overall
    and per group of the prompt's text, with every sample as text."""
    samples = []
    by_group: dict[str, list[bool]] = defaultdict(list)
    for (prompt, ref), out in zip(pairs, outputs):
        ok = reply_matches(encoder, out, ref)
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


def check_bars(by_skill: dict[str, float], bars: dict[str, float], stage: str) -> dict[str, dict]:
    """Each barred skill's held-out exact match against its bar (`<stage>.synthetic.bars`), as
    {skill: {"bar", "exact_match", "cleared"}}; one warning line for each skill below its bar."""
    out = {}
    for skill, bar in bars.items():
        value = by_skill.get(skill, 0.0)
        out[skill] = {"bar": bar, "exact_match": value, "cleared": value >= bar}
        if value < bar:
            log.warning("%s: %s reached %.1f%% held-out exact match, below its bar of %.0f%% (%s.synthetic.bars)",
                        stage.upper(), skill, 100 * value, 100 * bar, stage)
    return out
