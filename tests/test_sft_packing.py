"""Packing is correct: packed conversations never attend across their boundaries, and the loss of a
packed batch equals the loss of the same rows unpacked (sdpa and eager, on the CPU).

The packed batch is exactly what SFTTrainer builds with packing=True (bfd => padding-free): TRL's
own collator, one row, position_ids restarting at 0, no attention_mask.

Finding (transformers 5.23): the block-diagonal mask is derived from position_ids only when no KV
cache is in play (`masking_utils._preprocess_mask_arguments` checks `past_key_values is None`).
A forward with `use_cache=True` (the config default, e.g. a plain `model(**batch)` in eval mode)
silently attends across the packed conversations. TRL's SFTTrainer passes `use_cache=False`, and
`build_model` sets `config.use_cache=False` for training too; the last test pins the behaviour.
"""

from __future__ import annotations

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from mistral_align.chat import Message, get_encoder
from mistral_align.model.load import build_model
from mistral_align.schema.model import ArchitectureConfig, ModelConfig, QuantConfig

ENC = get_encoder("v3")
CONVERSATIONS = [
    [("user", "Copy: apple river"), ("assistant", "apple river")],
    [("user", "Add: 3 + 4"), ("assistant", "7")],
    [("system", "Be brief."), ("user", "Reverse: stone cloud glass"), ("assistant", "glass cloud stone"),
     ("user", "Uppercase: bread"), ("assistant", "BREAD")],
]  # fmt: skip


def rows():
    out = []
    for conv in CONVERSATIONS:
        enc = ENC.encode_sft([Message(r, c) for r, c in conv])
        out.append({"input_ids": enc.input_ids, "labels": enc.labels})
    return out


def tiny(attn: str):
    arch = ArchitectureConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2)
    cfg = ModelConfig(name="tiny", architecture=arch, tokenizer_version="v3", dtype="float32", attn_implementation=attn)
    model = build_model(cfg, QuantConfig(mode="none"), vocab_size=ENC.vocab_size, seed=0, device_map={"": "cpu"})
    return model.eval()


def packed_batch(examples):
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    # what trl.pack_dataset (bfd) hands the collator: the rows concatenated, with their lengths
    row = {
        "input_ids": [i for e in examples for i in e["input_ids"]],
        "labels": [i for e in examples for i in e["labels"]],
        "seq_lengths": [len(e["input_ids"]) for e in examples],
    }
    return collate([row])


def unpacked_batch(examples):
    return DataCollatorForLanguageModeling(pad_token_id=0)(examples)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(attn):
    model = tiny(attn)
    examples = rows()
    packed = packed_batch(examples)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    unpacked = unpacked_batch(examples)
    with torch.no_grad():
        # transformers' loss is the mean over trained tokens in both cases
        loss_packed = model(**packed, use_cache=False).loss
        loss_unpacked = model(**unpacked, use_cache=False).loss
    torch.testing.assert_close(loss_packed, loss_unpacked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_do_not_attend_across_boundaries(attn):
    model = tiny(attn)
    examples = rows()
    packed = packed_batch(examples)
    changed = [dict(e) for e in examples]
    changed[0] = {"input_ids": [1] + [5000 + i for i in range(len(examples[0]["input_ids"]) - 1)],
                  "labels": examples[0]["labels"]}
    other = packed_batch(changed)
    n0 = len(examples[0]["input_ids"])
    with torch.no_grad():
        a = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        b = model(input_ids=other["input_ids"], position_ids=other["position_ids"], use_cache=False).logits
        # the second and third conversations alone, unpacked
        alone = model(input_ids=torch.tensor([examples[1]["input_ids"]])).logits
    assert not torch.allclose(a[:, :n0], b[:, :n0])  # the edited conversation changed
    torch.testing.assert_close(a[:, n0:], b[:, n0:], rtol=1e-5, atol=1e-5)  # the others did not
    torch.testing.assert_close(a[:, n0 : n0 + alone.shape[1]], alone, rtol=1e-5, atol=1e-5)


def test_trl_fused_loss_on_trained_positions_only_is_the_same():
    """Our CPU speed-up (TRL's fused LM head scoring only labelled positions) changes no number."""
    import trl.trainer.utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    from mistral_align.train.lm_head import lm_head_scores_labelled_positions_only

    model = tiny("sdpa").train()
    packed = packed_batch(rows())
    add_fused_lm_head(model)

    def loss_and_grad():
        model.zero_grad()
        out = model(**packed, fused_lm_head=True)
        out.loss.backward()
        return out.loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    assert not trl_utils._use_triton(torch.device("cpu"))
    full_loss, full_grad = loss_and_grad()
    with lm_head_scores_labelled_positions_only():
        assert trl_utils._use_triton(torch.device("cpu"))
        compact_loss, compact_grad = loss_and_grad()
    assert not trl_utils._use_triton(torch.device("cpu"))  # put back
    torch.testing.assert_close(compact_loss, full_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compact_grad, full_grad, rtol=1e-4, atol=1e-7)
    # and both equal the unpacked loss of the same rows
    with torch.no_grad():
        unpacked = model(**unpacked_batch(rows()), use_cache=False, fused_lm_head=True).loss
    torch.testing.assert_close(compact_loss, unpacked, rtol=1e-5, atol=1e-5)


def test_packing_mask_needs_the_cache_off():
    """Pins the transformers behaviour described above, and that our models train with the cache off."""
    model = tiny("sdpa")
    assert model.config.use_cache is False
    examples = rows()
    packed = packed_batch(examples)
    n0, n1 = len(examples[0]["input_ids"]), len(examples[1]["input_ids"])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([examples[1]["input_ids"]]), use_cache=False).logits
        leaky = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=True).logits
    assert not torch.allclose(leaky[:, n0 : n0 + n1], alone, atol=1e-4)
