"""Padding-free preference batches: every chosen and rejected sequence of a batch packed into one row.

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

Every objective of the preference stage runs through the same hooks, since each scores its
sequences with TRL's fused LM head: DPO, SimPO and ORPO batches hold B chosen then B rejected
sequences; KTO's hold its rows and its KL rows (each prompt with another row's reply), which are
packed apart, and each of KTO's forwards takes the pack that holds exactly its tokens
(`matching_pack`). SimPO and ORPO run TRL's fused head through our `concatenated_forward`
(train/reference_free.py).

`shared_prompt=True` goes one step further: a pair's chosen and rejected sequences begin with the
same prompt, so the prompt is computed once. Each pair becomes one unit, [prompt + chosen] then
[the last prompt token again + rejected], with the rejected tokens' positions continuing from the
prompt and a 4-D attention mask that lets them see the prompt but not the chosen reply. The last
prompt token is kept twice because its output scores two different next tokens (the first chosen
and the first rejected token). In general the shared part is the longest common prefix of the two
sequences, tokens and completion mask alike, less that one token; a unit's hidden states are then
exactly those of the two separate sequences. The mask is dense, so this needs sdpa or eager
attention (FlashAttention's varlen kernel cannot express it).

Mixture-of-Experts models (Mixtral): TRL adds the router's load-balancing loss, which the model
computes over the rows it is given, counting every unmasked token once. Packed rows hold padding
blocks, a 4-D mask it cannot read, and shared prefixes that stand for two tokens of the padded
batch; so for packed calls the model is asked for no router loss, the router logits are recorded
instead, and the loss is computed here with each packed token weighted by how many real tokens of
the padded batch it stands for (0, 1 or 2): exactly the padded batch's router loss.
"""

from __future__ import annotations

from typing import Any

import torch

PACKED_KEYS = ("packed_input_ids", "packed_position_ids", "packed_index")
# KTO's batches hold two sets of sequences, each packed: its rows, and its KL rows under this prefix.
KL_PREFIX = "KL_"
# shared_prompt only: per packed token, its segment, the segment whose prefix it may also see (-1: none),
# and how many positions of that prefix it sees.
SHARED_KEYS = ("packed_segment_ids", "packed_parent_ids", "packed_shared")
_PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


class PaddingFreePreferenceCollator:
    """Wraps TRL's DataCollatorForPreference (DPO, SimPO, ORPO) or DataCollatorForUnpairedPreference
    (KTO): its padded batch, plus the same sequences packed (KTO: its rows, and its KL rows under
    `KL_packed_*`, each packed on their own).

    `rows="one"`: every sequence in one row (what FlashAttention-2's varlen kernel wants).
    `rows="longest"`: first-fit-decreasing into rows as long as the batch's longest sequence, the
    rest of each row a block of padding with its own position ids. Attention kernels that build the
    block-diagonal mask densely (sdpa and eager: the CPU, or GPUs without FA2) cost T^2 on one row
    of T tokens, more than the padded batch; rows of the longest length keep that to about
    (real tokens x longest) while computing almost no padding in the linear layers.
    """

    def __init__(self, padded_collator, rows: str = "one", pad_token_id: int = 0, shared_prompt: bool = False):
        if rows not in ("one", "longest"):
            raise ValueError(f"rows must be 'one' or 'longest', got {rows!r}")
        if shared_prompt and rows != "longest":
            raise ValueError("shared_prompt packs pairs into rows of the longest pair (rows='longest')")
        self.padded_collator, self.rows, self.pad_token_id = padded_collator, rows, pad_token_id
        self.shared_prompt = shared_prompt

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.padded_collator(examples)
        if self.shared_prompt:
            return self._pack_pairs_sharing_prefixes(batch, batch["attention_mask"].bool().sum(dim=1).tolist())
        batch.update(pack_sequences(batch["input_ids"], batch["attention_mask"], self.rows, self.pad_token_id))
        if "KL_input_ids" in batch:  # KTO: its KL sequences (each prompt with another row's reply) packed too
            packed = pack_sequences(batch["KL_input_ids"], batch["KL_attention_mask"], self.rows, self.pad_token_id)
            batch.update({KL_PREFIX + k: v for k, v in packed.items()})
        return batch

    def _pack_pairs_sharing_prefixes(self, batch: dict[str, Any], lengths: list[int]) -> dict[str, Any]:
        """Each pair as one unit [chosen][rejected past the shared prefix], units first-fit decreasing
        into rows as long as the longest unit; the rest of each row a padding block of its own."""
        ids, completion = batch["input_ids"], batch["completion_mask"]
        pairs = len(lengths) // 2  # rows 0..B-1 chosen, B..2B-1 rejected (TRL's order)
        shared = [shared_prefix_length(ids[i], ids[pairs + i], completion[i], completion[pairs + i],
                                       lengths[i], lengths[pairs + i]) for i in range(pairs)]  # fmt: skip
        units = [lengths[i] + lengths[pairs + i] - shared[i] for i in range(pairs)]
        width = max(units)
        bins = first_fit_decreasing(units, width)
        shape = (len(bins), width)
        packed = torch.full(shape, self.pad_token_id, dtype=ids.dtype)
        pos, seg = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
        parent, limit = torch.full(shape, -1, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
        index: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * len(lengths)
        next_segment = 0
        for r, members in enumerate(bins):
            c = 0
            for i in members:
                lc, lr, s = lengths[i], lengths[pairs + i], shared[i]
                chosen, rejected = next_segment, next_segment + 1
                next_segment += 2
                packed[r, c : c + lc] = ids[i, :lc]
                pos[r, c : c + lc] = torch.arange(lc)
                seg[r, c : c + lc] = chosen
                own = slice(c + lc, c + lc + lr - s)
                packed[r, own] = ids[pairs + i, s:lr]
                pos[r, own] = torch.arange(s, lr)
                seg[r, own], parent[r, own], limit[r, own] = rejected, chosen, s
                base = r * width + c
                index[i] = torch.arange(base, base + lc)
                index[pairs + i] = torch.cat([torch.arange(base, base + s), torch.arange(base + lc, base + lc + lr - s)])
                c += lc + lr - s
            pos[r, c:] = torch.arange(width - c)  # the padding is a block of its own
            seg[r, c:] = next_segment
            next_segment += 1
        batch["packed_input_ids"], batch["packed_position_ids"] = packed, pos
        batch["packed_index"] = torch.cat(index)
        batch["packed_segment_ids"], batch["packed_parent_ids"], batch["packed_shared"] = seg, parent, limit
        return batch


def pack_sequences(input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: str, pad_token_id: int) -> dict:
    """The `packed_*` tensors of one right-padded batch (see PaddingFreePreferenceCollator)."""
    mask = attention_mask.bool()  # right-padded: each row's real tokens are a prefix
    lengths = mask.sum(dim=1).tolist()
    if rows == "one":
        return {"packed_input_ids": input_ids[mask].unsqueeze(0),
                "packed_position_ids": torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0),
                "packed_index": torch.arange(int(mask.sum()))}
    width = max(lengths)
    bins = first_fit_decreasing(lengths, width)
    ids = torch.full((len(bins), width), pad_token_id, dtype=input_ids.dtype)
    pos = torch.zeros((len(bins), width), dtype=torch.long)
    start = [0] * len(lengths)  # flat packed index of each sequence's first token
    for r, members in enumerate(bins):
        c = 0
        for i in members:
            n = lengths[i]
            ids[r, c : c + n] = input_ids[i, :n]
            pos[r, c : c + n] = torch.arange(n)
            start[i] = r * width + c
            c += n
        pos[r, c:] = torch.arange(width - c)  # the padding is a block of its own
    # For each real token in the padded batch's row-major order, its flat index in the packed rows.
    index = torch.cat([torch.arange(start[i], start[i] + lengths[i]) for i in range(len(lengths))])
    return {"packed_input_ids": ids, "packed_position_ids": pos, "packed_index": index}


def first_fit_decreasing(lengths: list[int], width: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `width`, longest first, each into the first bin it fits."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        j = next((j for j, r in enumerate(room) if r >= lengths[i]), None)
        if j is None:
            bins.append([]), room.append(width)
            j = len(bins) - 1
        bins[j].append(i)
        room[j] -= lengths[i]
    return bins


def shared_prefix_length(a: torch.Tensor, b: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor,
                         len_a: int, len_b: int) -> int:
    """How many leading tokens two sequences can compute once: their common prefix (tokens and
    completion mask alike) less one, since the last common token's output scores a different next
    token in each; never the whole of either sequence."""
    n = min(len_a, len_b)
    differs = (a[:n] != b[:n]) | (mask_a[:n] != mask_b[:n])
    common = int(differs.int().argmax()) if bool(differs.any()) else n
    return max(common - 1, 0)


def shared_prefix_mask(position_ids: torch.Tensor, segments: torch.Tensor, parents: torch.Tensor,
                       shared: torch.Tensor, sliding_window: int | None, boolean: bool) -> torch.Tensor:
    """The (R, 1, T, T) attention mask of shared-prompt rows: causal within a segment, plus a rejected
    segment's view of its chosen segment's first `shared` positions; Mistral's sliding window, if any.
    Boolean (True: attend) for sdpa, additive float32 for eager."""
    q_pos, k_pos = position_ids[:, :, None], position_ids[:, None, :]
    same = segments[:, :, None] == segments[:, None, :]
    prefix = (parents[:, :, None] == segments[:, None, :]) & (k_pos < shared[:, :, None])
    visible = (same | prefix) & (k_pos <= q_pos)
    if sliding_window:
        visible &= q_pos - k_pos < sliding_window
    visible = visible[:, None]
    if boolean:
        return visible
    return torch.zeros(visible.shape, dtype=torch.float32, device=visible.device).masked_fill(
        ~visible, torch.finfo(torch.float32).min)


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
        self._masks: list[tuple] = []
        self.handles: list[Any] = []
        self._router_logits: list[torch.Tensor] | None = None  # recorded during a packed MoE forward

    def attach(self, module: torch.nn.Module) -> None:
        self.handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
        self.handles.append(module.register_forward_hook(self._post, with_kwargs=True))
        for router in _routers(module):
            self.handles.append(router.register_forward_hook(self._record_router))

    def _record_router(self, module, args, output):
        if self._router_logits is not None:
            self._router_logits.append(output[0] if isinstance(output, tuple) else output)

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _pre(self, module, args, kwargs):
        if "packed_input_ids" not in kwargs:
            return None
        if args:
            raise ValueError("padding-free DPO expects keyword arguments only")
        # KTO's batches carry two packs (its rows, its KL rows) into both of its forwards: take the
        # one that holds this call's tokens.
        packs = [{k: kwargs.pop(prefix + k) for k in PACKED_KEYS} for prefix in ("", KL_PREFIX)
                 if prefix + PACKED_KEYS[0] in kwargs]
        segments, parents, shared = (kwargs.pop(key, None) for key in SHARED_KEYS)
        mask = kwargs.pop("attention_mask").bool()
        input_ids, position_ids, index = matching_pack(packs, kwargs.pop("input_ids"), mask)
        labels = kwargs.pop("labels", None)
        kwargs["input_ids"] = input_ids
        kwargs["position_ids"] = position_ids
        if segments is None:
            kwargs["attention_mask"] = None  # transformers derives the block-diagonal mask from the positions
            starts = position_ids == 0
        else:
            config = module.config
            attn = getattr(config, "_attn_implementation", None) or "sdpa"
            if attn not in ("sdpa", "eager"):
                raise ValueError(f"shared-prompt DPO needs sdpa or eager attention, not {attn}")
            kwargs["attention_mask"] = shared_prefix_mask(position_ids, segments, parents, shared,
                                                          getattr(config, "sliding_window", None), attn == "sdpa")
            starts = torch.ones_like(segments, dtype=torch.bool)
            starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        if labels is not None:
            packed = labels.new_full(input_ids.shape, -100)
            # A shared prefix token is written by both of its sequences, with equal labels.
            packed.view(-1)[index] = labels[mask]
            packed[starts] = -100  # never score a prediction across a sequence boundary
            kwargs["labels"] = packed
        weights = None
        # Asked for by TRL's policy forward, or by the config (our inline Mixtral sets it) in any forward.
        if kwargs.get("output_router_logits", getattr(module.config, "output_router_logits", False)):
            # How many real tokens of the padded batch each packed token stands for (module docstring).
            weights = torch.zeros(input_ids.numel(), device=input_ids.device).index_add_(
                0, index, torch.ones(index.numel(), device=input_ids.device)).view(input_ids.shape)
            kwargs["output_router_logits"] = False
            self._router_logits = []
        self._masks.append((mask, index, weights))
        return args, kwargs

    def _post(self, module, args, kwargs, output):
        attention_mask = kwargs.get("attention_mask", 0)
        packed_call = attention_mask is None or (torch.is_tensor(attention_mask) and attention_mask.dim() == 4)
        if not self._masks or kwargs.get("position_ids") is None or not packed_call:
            return None
        mask, index, weights = self._masks.pop()
        if not hasattr(output, "log_probs") or output.log_probs is None:
            raise ValueError("padding-free DPO needs TRL's fused LM head (model(..., fused_lm_head=True))")
        fields = {}
        for name in _PER_TOKEN_FIELDS:
            value = getattr(output, name, None)
            fields[name] = None if value is None else unpack_shifted(value, mask, index)
        if weights is not None:
            fields["aux_loss"] = router_loss(module.config, self._router_logits, weights)
            self._router_logits = None
        return type(output)(**{**{k: getattr(output, k, None) for k in output.keys()}, **fields})


def matching_pack(packs: list[dict], input_ids: torch.Tensor, mask: torch.Tensor) -> tuple:
    """(packed ids, positions, index) of the pack whose tokens are exactly the real tokens of the
    padded `input_ids`."""
    real = input_ids[mask]
    for pack in packs:
        ids, index = pack["packed_input_ids"], pack["packed_index"]
        if index.numel() == real.numel() and torch.equal(ids.reshape(-1)[index], real):
            return ids, pack["packed_position_ids"], index
    raise ValueError("padding-free: no packed rows of this batch hold the tokens this forward was given")


def _routers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose outputs are a MoE model's router logits (transformers records them by class)."""
    recorders = [getattr(m, "_can_record_outputs", None) or {} for m in module.modules()]
    found = [r["router_logits"] for r in recorders if "router_logits" in r]
    classes = tuple({getattr(r, "target_class", r) for r in found})
    return [m for m in module.modules() if classes and isinstance(m, classes)]


def router_loss(config: Any, router_logits: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """transformers' load-balancing loss, each token weighted (a 0/1 attention mask there)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func(tuple(router_logits), config.num_local_experts, config.num_experts_per_tok, weights)


def unpack_shifted(packed: torch.Tensor, mask: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token values of packed rows, shifted (R', T'-1), back in the padded shifted layout (R, L-1).

    Packed [r', c] scores token c+1 of its row; padded [r, t] scores token t+1 of row r. With each
    packed row extended by one zero column, the value for a real token is found at its flat packed
    index (`index`, in the padded batch's row-major order; default: one row, in order); scattering
    those into the real slots of the (R, L) mask and dropping the last column gives exactly the
    padded layout. The slot of each sequence's last token gets the prediction across the boundary
    (or the zero column), which the fused head set to 0: its label is -100.
    """
    ext = torch.cat([packed, packed.new_zeros(packed.shape[0], 1)], dim=1).reshape(-1)
    values = ext if index is None else ext[index]
    full = packed.new_zeros(mask.shape).masked_scatter(mask, values)
    return full[:, :-1]
