"""Padding-free DPO batches: every chosen and rejected sequence of a batch packed into one row.

TRL 1.16 pads the 2B sequences of a DPO batch (B chosen, then B rejected) to the longest one and
disables `padding_free` for DPO. On a long-tailed length mix most of that batch is padding that
the backbone still computes. Here the model instead sees one row of T = sum of the real lengths,
with `position_ids` restarting at 0 at every sequence and no `attention_mask`: transformers'
`create_causal_mask` detects the restarts and builds a block-diagonal causal mask (sdpa, eager,
flex), flash-attention gets `cu_seq_lens`, so no token attends across a sequence boundary.

TRL's loss and metrics code stays untouched: the collator still emits the padded `input_ids`,
`attention_mask` and `completion_mask` TRL computes labels, masks and token counts from, plus the
packed row. A forward pre-hook on the model swaps the padded inputs for the packed ones (the
labels are gathered from the padded labels, so they are TRL's own), and a forward hook scatters
the per-token outputs of TRL's fused LM head (log-probs, entropy, mean logits, top-1) back into
the padded (2B, L-1) layout. Every per-token field of the fused head is 0 where the label is
-100; the label at each sequence start is -100 (BOS, part of the prompt), so the prediction
across a boundary is never scored. The loss, rewards and every logged metric are therefore TRL's,
computed from the same per-token values up to float summation order
(tests/test_dpo_padding_free.py: within 1e-5 of the padded path, float32 and NF4 QLoRA).
"""

from __future__ import annotations

from typing import Any

import torch

PACKED_KEYS = ("packed_input_ids", "packed_position_ids")
_PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


class PaddingFreePreferenceCollator:
    """Wraps TRL's DataCollatorForPreference: its padded batch, plus the same sequences as one row."""

    def __init__(self, padded_collator):
        self.padded_collator = padded_collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.padded_collator(examples)
        mask = batch["attention_mask"].bool()  # right-padded: each row's real tokens are a prefix
        lengths = mask.sum(dim=1).tolist()
        batch["packed_input_ids"] = batch["input_ids"][mask].unsqueeze(0)
        batch["packed_position_ids"] = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
        return batch


def packing_stats(batch: dict[str, Any]) -> tuple[int, int]:
    """(real tokens, padded slots) of one collated batch."""
    mask = batch["attention_mask"]
    return int(mask.sum()), int(mask.numel())


class PackedForward:
    """Forward hooks that run a padded DPO batch as one packed row and hand back padded outputs.

    Only calls that carry the collator's `packed_*` keyword arguments are changed; any other call
    (generation, a plain forward) goes through as it is.
    """

    def __init__(self):
        self._masks: list[torch.Tensor] = []
        self.handles: list[Any] = []

    def attach(self, module: torch.nn.Module) -> None:
        self.handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
        self.handles.append(module.register_forward_hook(self._post, with_kwargs=True))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _pre(self, module, args, kwargs):
        if "packed_input_ids" not in kwargs:
            return None
        if args:
            raise ValueError("padding-free DPO expects keyword arguments only")
        input_ids = kwargs.pop("packed_input_ids")
        position_ids = kwargs.pop("packed_position_ids")
        kwargs.pop("input_ids")
        mask = kwargs.pop("attention_mask").bool()
        labels = kwargs.pop("labels", None)
        kwargs["input_ids"] = input_ids
        kwargs["position_ids"] = position_ids
        kwargs["attention_mask"] = None
        if labels is not None:
            packed = labels[mask].unsqueeze(0).clone()
            packed[position_ids == 0] = -100  # never score a prediction across a sequence boundary
            kwargs["labels"] = packed
        self._masks.append(mask)
        return args, kwargs

    def _post(self, module, args, kwargs, output):
        if not self._masks or kwargs.get("position_ids") is None or kwargs.get("attention_mask", 0) is not None:
            return None
        mask = self._masks.pop()
        if not hasattr(output, "log_probs") or output.log_probs is None:
            raise ValueError("padding-free DPO needs TRL's fused LM head (model(..., fused_lm_head=True))")
        fields = {}
        for name in _PER_TOKEN_FIELDS:
            value = getattr(output, name, None)
            fields[name] = None if value is None else unpack_shifted(value, mask)
        return type(output)(**{**{k: getattr(output, k, None) for k in output.keys()}, **fields})


def unpack_shifted(packed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token values of a packed row, shifted (1, T-1), back in the padded shifted layout (R, L-1).

    Packed position j scores token j+1; padded [r, t] scores token t+1 of row r, i.e. packed position
    offset_r + t for t < len_r - 1. Scattering the (T,) row extended by one zero into the real slots
    of the (R, L) mask and dropping the last column gives exactly that; the slot t = len_r - 1 gets
    the boundary prediction, which the fused head set to 0 (its label is -100).
    """
    row = torch.cat([packed[0], packed.new_zeros(1)])
    full = packed.new_zeros(mask.shape).masked_scatter(mask, row)
    return full[:, :-1]
