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

import json
import math
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import MixtralConfig
from transformers.activations import ACT2FN
from transformers.models.mixtral.modeling_mixtral import MixtralForCausalLM, MixtralModel

from mistral_align.files import follow_umask

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
        if self.training and torch.is_grad_enabled():
            # Every expert joins the graph, an expert that got no token with an empty batch: its
            # (LoRA) parameters then get a zero gradient instead of none, which DDP needs (it
            # runs with find_unused_parameters=False) and which keeps ranks in step.
            experts = range(self.num_experts)
        else:
            experts = [int(e[0]) for e in expert_hit if int(e[0]) != self.num_experts]
        for expert_idx in experts:
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            out = self[expert_idx](hidden_states[token_idx])
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


class UnfusedMixtralModel(MixtralModel):
    # Our experts run their own loop: transformers' experts kernels (grouped_mm, ...) do not apply.
    # Set explicitly: the class would otherwise inherit whatever MixtralModel's check cached.
    _can_set_experts_implementation_cached_value = False

    def __init__(self, config: MixtralConfig):
        super().__init__(config)
        for layer in self.layers:
            layer.mlp.experts = UnfusedMixtralExperts(config)
        self.post_init()


class UnfusedMixtralForCausalLM(MixtralForCausalLM):
    _can_set_experts_implementation_cached_value = False

    def __init__(self, config: MixtralConfig):
        super().__init__(config)
        self.model = UnfusedMixtralModel(config)
        self.post_init()


_HUB_NAMES = [
    (re.compile(r"\.mlp\.experts\.(\d+)\.gate_proj\."), r".block_sparse_moe.experts.\1.w1."),
    (re.compile(r"\.mlp\.experts\.(\d+)\.up_proj\."), r".block_sparse_moe.experts.\1.w3."),
    (re.compile(r"\.mlp\.experts\.(\d+)\.down_proj\."), r".block_sparse_moe.experts.\1.w2."),
    (re.compile(r"\.mlp\.gate\."), r".block_sparse_moe.gate."),
]


def hub_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of this class under the Hub checkpoint's names (what `save_pretrained` writes)."""
    out = {}
    for key, t in state.items():
        for pattern, repl in _HUB_NAMES:
            key = pattern.sub(repl, key)
        out[key] = t
    return out


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


# -- adapters for stock transformers ------------------------------------------------------------

EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
_EXPERT_KEY = re.compile(r"^(?P<pre>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.lora_(?P<ab>[AB])\.weight$")


def stock_adapter_state_dict(state: dict[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
    """Convert a LoRA state dict of `UnfusedMixtralForCausalLM` (per-expert `gate_proj/up_proj/
    down_proj` LoRA, rank r) into one for stock transformers-5 `MixtralForCausalLM` with peft
    `target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`, rank 2r, exactly.

    Stock Mixtral fuses gate and up into one (E, 2I, h) parameter: per expert the fused delta is
    [B_gate A_gate; B_up A_up], rank 2r with A' = [A_gate; A_up] and B' = blockdiag(B_gate, B_up).
    Every other adapted weight is zero-padded from rank r to 2r (A' = [A; 0], B' = [B, 0]), so one
    rank serves the whole adapter; with lora_alpha doubled (x sqrt(2) under rslora) every
    scaling, and so every output, is unchanged. peft's ParamWrapper layout: lora_A (E*r', in),
    row e*r' + k; lora_B (out, r'*E), column k*E + e."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, t in state.items():
        m = _EXPERT_KEY.match(key)
        if m:
            experts.setdefault(m["pre"], {}).setdefault(int(m["e"]), {})[f"{m['proj']}.{m['ab']}"] = t
        elif ".lora_A." in key:
            out[key] = torch.cat([t, t.new_zeros(r, t.shape[1])], dim=0)
        elif ".lora_B." in key:
            out[key] = torch.cat([t, t.new_zeros(t.shape[0], r)], dim=1)
        else:
            out[key] = t
    r2 = 2 * r
    for pre, by_e in experts.items():
        n = len(by_e)
        g0 = by_e[0]
        h, inter = g0["gate_proj.A"].shape[1], g0["gate_proj.B"].shape[0]
        dt = g0["gate_proj.A"].dtype
        a_gu, b_gu = torch.zeros(n * r2, h, dtype=dt), torch.zeros(2 * inter, r2 * n, dtype=dt)
        a_d, b_d = torch.zeros(n * r2, inter, dtype=dt), torch.zeros(h, r2 * n, dtype=dt)
        for e, w in by_e.items():
            a_gu[e * r2 : e * r2 + r] = w["gate_proj.A"]
            a_gu[e * r2 + r : e * r2 + r2] = w["up_proj.A"]
            a_d[e * r2 : e * r2 + r] = w["down_proj.A"]
            for k in range(r):
                b_gu[:inter, k * n + e] = w["gate_proj.B"][:, k]
                b_gu[inter:, (k + r) * n + e] = w["up_proj.B"][:, k]
                b_d[:, k * n + e] = w["down_proj.B"][:, k]
        # peft nests the second ParamWrapper on a module around the first: gate_up_proj (first in
        # target_parameters) sits at experts.base_layer, down_proj at experts.
        out[f"{pre}.base_layer.lora_A.weight"] = a_gu
        out[f"{pre}.base_layer.lora_B.weight"] = b_gu
        out[f"{pre}.lora_A.weight"] = a_d
        out[f"{pre}.lora_B.weight"] = b_d
    return out


def write_stock_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write to `out_dir` a copy of the peft adapter in `adapter_dir` (trained on this module's
    Mixtral) that plain `peft.PeftModel.from_pretrained` loads onto stock transformers-5
    `MixtralForCausalLM` (see `stock_adapter_state_dict`). Adapters of other models are copied as
    they are."""
    from safetensors.torch import load_file, save_file

    src, out = Path(adapter_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "adapter_config.json").read_text())
    state = load_file(str(src / "adapter_model.safetensors"))
    if not any(_EXPERT_KEY.match(k) for k in state):
        shutil.copytree(src, out, dirs_exist_ok=True)
        return out
    r = int(config["r"])
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("adapters with rank_pattern/alpha_pattern are not converted")
    converted = stock_adapter_state_dict(state, r)
    config["r"] = 2 * r
    config["lora_alpha"] = config["lora_alpha"] * (math.sqrt(2) if config.get("use_rslora") else 2)
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        raise ValueError("adapters with a regex target_modules are not converted")
    config["target_modules"] = sorted(t for t in targets if t not in EXPERT_NAMES)
    params = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    config["target_parameters"] = params + [p for p in (config.get("target_parameters") or []) if p not in params]
    config["lora_dropout"] = 0.0  # peft's parameter LoRA has no dropout (inference: none anyway)
    for f in src.iterdir():
        if f.name not in ("adapter_config.json", "adapter_model.safetensors") and f.is_file():
            shutil.copy2(f, out / f.name)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(converted, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    follow_umask(out)  # safetensors writes 0600, the other files follow the umask
    return out


def has_per_expert_lora(adapter_dir: str | os.PathLike) -> bool:
    """Whether a saved adapter holds LoRA on this module's per-expert linears (which stock
    transformers' fused Mixtral does not have); reads the file's tensor names only."""
    from safetensors import safe_open

    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        return False
    with safe_open(str(weights), "pt") as f:
        return any(_EXPERT_KEY.match(k) for k in f.keys())


# -- and back: a stock-layout adapter onto this module's Mixtral ---------------------------------

STOCK_EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
_STOCK_EXPERT_KEY = re.compile(r"^(?P<pre>.*\.mlp\.experts)\.(?P<fused>base_layer\.)?lora_(?P<ab>[AB])\.weight$")


def is_stock_adapter(adapter_dir: str | os.PathLike) -> bool:
    """Whether a saved adapter is in stock transformers' fused-expert layout (`write_stock_adapter`'s,
    what `mistral-align push` uploads for Mixtral)."""
    config = Path(adapter_dir) / "adapter_config.json"
    if not config.is_file():
        return False
    targets = json.loads(config.read_text()).get("target_parameters") or []
    return all(p in targets for p in STOCK_EXPERT_PARAMETERS)


def unfused_adapter_state_dict(state: dict[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
    """The inverse of `stock_adapter_state_dict`, exact at the stock adapter's rank r: expert e's
    fused gate/up delta B'[:, cols_e] A'[rows_e] is a gate LoRA (B' rows [:I]) and an up LoRA (rows
    [I:]) sharing A'[rows_e]; its down delta is a down LoRA. Other modules are kept as they are."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        m = _STOCK_EXPERT_KEY.match(key)
        if m:
            fused.setdefault(m["pre"], {})[("gate_up" if m["fused"] else "down") + "." + m["ab"]] = t
        else:
            out[key] = t
    for pre, w in fused.items():
        n = w["down.A"].shape[0] // r
        inter = w["gate_up.B"].shape[0] // 2
        for e in range(n):
            rows, cols = slice(e * r, (e + 1) * r), [k * n + e for k in range(r)]
            out[f"{pre}.{e}.gate_proj.lora_A.weight"] = w["gate_up.A"][rows].clone()
            out[f"{pre}.{e}.up_proj.lora_A.weight"] = w["gate_up.A"][rows].clone()
            out[f"{pre}.{e}.gate_proj.lora_B.weight"] = w["gate_up.B"][:inter, cols].clone()
            out[f"{pre}.{e}.up_proj.lora_B.weight"] = w["gate_up.B"][inter:, cols].clone()
            out[f"{pre}.{e}.down_proj.lora_A.weight"] = w["down.A"][rows].clone()
            out[f"{pre}.{e}.down_proj.lora_B.weight"] = w["down.B"][:, cols].clone()
    return out


def write_unfused_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write to `out_dir` the stock-layout Mixtral adapter in `adapter_dir` as one `PeftModel.from_pretrained`
    attaches to `UnfusedMixtralForCausalLM` (per-expert LoRA, same rank and scaling, the same function),
    so DPO can continue a pushed Mixtral adapter."""
    from safetensors.torch import load_file, save_file

    src, out = Path(adapter_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "adapter_config.json").read_text())
    state = unfused_adapter_state_dict(load_file(str(src / "adapter_model.safetensors")), int(config["r"]))
    config["target_modules"] = sorted({*(config.get("target_modules") or []), *EXPERT_NAMES})
    config["target_parameters"] = [p for p in config["target_parameters"] if p not in STOCK_EXPERT_PARAMETERS] or None
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out
