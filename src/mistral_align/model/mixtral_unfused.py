"""Mixtral with one `nn.Linear` per expert weight, so bitsandbytes quantises every expert.

transformers 5 stores each Mixtral MoE block's experts as two fused 3-D `nn.Parameter`s
(`MixtralExperts.gate_up_proj`, `down_proj`). bitsandbytes' integration swaps only `nn.Linear`
modules, so with stock transformers `quant=nf4` leaves every expert in bf16 (only attention is
4-bit: on Mixtral-8x7B 1.34 B of 46.7 B parameters).

`UnfusedMixtralForCausalLM` is stock `MixtralForCausalLM` (same attention, router, norms, rotary,
loss, aux loss, generation) whose `mlp.experts` is an `nn.ModuleList` of small MLPs with
`gate_proj` / `up_proj` / `down_proj` linears, the Hub checkpoint's `w1` / `w3` / `w2`. A
checkpoint conversion registered under this class name (transformers' public
`register_checkpoint_conversion_mapping`) maps the Hub names as it loads, so transformers' own
bnb path quantises every expert linear while loading, and "all-linear" LoRA covers them
(dropout allowed, no `target_parameters`). The router (`mlp.gate`, a plain parameter) stays
full precision. Saving reverses the mapping: `save_pretrained` writes the Hub's
`block_sparse_moe.experts.N.w1/w2/w3` names, which stock transformers loads.

Names are `gate_proj/up_proj/down_proj`, not `w1/w2/w3`: peft 0.21 rewrites LoRA targets named
`w1/w2/w3` on any `model_type == "mixtral"` model into fused-expert names.

Adapters trained on this class name modules `...mlp.experts.N.gate_proj`; stock transformers 5
has no such modules. `stock_adapter_state_dict` converts them (see its docstring).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import MixtralConfig
from transformers.activations import ACT2FN
from transformers.models.mixtral.modeling_mixtral import MixtralForCausalLM, MixtralModel

_REGISTERED = False


class MixtralExpertMLP(nn.Module):
    """One expert: down_proj(act(gate_proj(x)) * up_proj(x)) (the Hub's w2(act(w1 x) * w3 x))."""

    def __init__(self, config: MixtralConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UnfusedMixtralExperts(nn.ModuleList):
    """Drop-in for `MixtralExperts`: same call signature and routing arithmetic, one MLP per expert."""

    def __init__(self, config: MixtralConfig):
        super().__init__([MixtralExpertMLP(config) for _ in range(config.num_local_experts)])
        self.num_experts = config.num_local_experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = int(expert_idx[0])
            if expert_idx == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            out = self[expert_idx](hidden_states[token_idx])
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


class UnfusedMixtralModel(MixtralModel):
    def __init__(self, config: MixtralConfig):
        super().__init__(config)
        for layer in self.layers:
            layer.mlp.experts = UnfusedMixtralExperts(config)
        self.post_init()


class UnfusedMixtralForCausalLM(MixtralForCausalLM):
    def __init__(self, config: MixtralConfig):
        super().__init__(config)
        self.model = UnfusedMixtralModel(config)
        self.post_init()


def register() -> None:
    """Register the Hub-name <-> per-expert-linear checkpoint conversion (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    mapping = [
        WeightRenaming(r"\.block_sparse_moe\.", ".mlp."),
        WeightRenaming(r"\.experts\.(\d+)\.w1\.", r".experts.\1.gate_proj."),
        WeightRenaming(r"\.experts\.(\d+)\.w3\.", r".experts.\1.up_proj."),
        WeightRenaming(r"\.experts\.(\d+)\.w2\.", r".experts.\1.down_proj."),
    ]
    register_checkpoint_conversion_mapping("UnfusedMixtralForCausalLM", mapping, overwrite=True)
    # The inner model would otherwise fall back to model_type "mixtral", whose stock mapping fuses
    # the experts; an empty class-name mapping claims it.
    register_checkpoint_conversion_mapping("UnfusedMixtralModel", [], overwrite=True)
    _REGISTERED = True


register()
