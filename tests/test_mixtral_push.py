"""A pushed Mixtral adapter loads right (issue 17, item 4). We train Mixtral as our per-expert class;
stock transformers' Mixtral fuses the experts, so the per-expert adapter attached to it only in part
(7,168 of 44,032 LoRA weights in the issue's run: attention only, every expert dropped, a warning at
most). push uploads the stock layout instead: the model card's own snippet, run as written against
the dry-run folder and the base on disk, attaches every LoRA weight in the file and gives our
model's logits. DPO from that pushed folder takes it back exactly."""

from __future__ import annotations

import pytest
import torch
from runfixtures import make_run, run_card_snippet
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    from mistral_align.hub.push import push_run

    tmp = tmp_path_factory.mktemp("mixtral_push")
    run = make_run(tmp / "run", arch="mixtral", quant="none", steps=6, lr=1e-2)
    push_run(run, "me/tiny-mixtral", dry_run=tmp / "push")
    return run, tmp / "push"


def _ours(run, dtype):
    """The run's model as mistral-align loads it (chat, merge): our Mixtral class with the trained adapter."""
    from mistral_align.model.load import load_pretrained
    from mistral_align.model.lora import attach_adapter

    return attach_adapter(load_pretrained(str(run / "base"), dtype=dtype), str(run / "adapter")).eval()


def _lora_state(model) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def test_the_cards_snippet_attaches_every_lora_weight_and_gives_our_logits(pushed, capsys):
    run, folder = pushed
    ns = run_card_snippet(folder, "me/tiny-mixtral")  # stock MixtralForCausalLM + plain PeftModel, bf16
    model, ids = ns["model"], ns["inputs"]["input_ids"]
    assert type(model.get_base_model()).__name__ == "MixtralForCausalLM"

    in_file = load_file(str(folder / "adapter_model.safetensors"))
    attached = _lora_state(model)
    matched = [k for k in in_file if k in attached and torch.equal(attached[k].float(), in_file[k].float())]
    total, loaded = sum(t.numel() for t in in_file.values()), sum(in_file[k].numel() for k in matched)
    print(f"\nLoRA weights attached by the card's snippet: {loaded:,} of {total:,} ({len(matched)} of {len(in_file)} tensors)")
    assert any(".mlp.experts." in k for k in matched)
    assert set(matched) == set(in_file) == set(attached) and loaded == total

    # The same function as our model: both loaded from the same files in bf16, compared in float32.
    ours = _ours(run, torch.bfloat16)
    stock = model.float().eval()
    ours = ours.float()
    with torch.no_grad():
        a, b = ours(ids).logits, stock(ids).logits
        bare = stock.get_base_model()
        with stock.disable_adapter():
            base = bare(ids).logits
    diff, effect = (a - b).abs().max().item(), (a - base).abs().max().item()
    print(f"max |logit diff| ours vs the card's snippet: {diff:.2e} (the adapter moves logits by up to {effect:.2e})")
    assert effect > 1e-2 and diff <= 1e-4


def test_dpo_from_the_pushed_folder_takes_the_stock_adapter_back_exactly(pushed):
    from mistral_align.model.load import load_pretrained
    from mistral_align.train.dpo import load_policy

    run, folder = pushed
    ours = _ours(run, torch.float32)
    policy = load_policy(load_pretrained(str(run / "base"), dtype=torch.float32), str(folder)).eval()
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable) and any(".experts.0.gate_proj." in n for n in trainable)
    ids = torch.randint(0, 32768, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids).logits - policy(ids).logits).abs().max().item()
    assert diff <= 1e-5, diff
