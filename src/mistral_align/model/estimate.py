"""Will it fit? GPU memory of a training run, from the config alone (no download, no model built).

    report = estimate_memory(cfg)                 # the recipes' resolved config
    print(format_estimate(report))
    warn_if_wont_fit(cfg, gpu_bytes)              # a recipe, before build_model

Parts, per GPU:

- weights: every linear layer as bitsandbytes stores it. NF4/FP4 per layer of n = in x out weights:
  packed 4-bit bytes ceil(n/2); one absmax per 64-block, with double quant quantised to uint8
  (ceil(n/64) bytes) plus a second-level fp32 absmax per 256 of those, an fp32 offset and the
  256-entry fp32 code table; the 16-entry fp32 NF4 code table. Without double quant, fp32 absmax.
  int8 (LLM.int8()): n bytes plus one fp32 scale per output row. Layers in `quant.skip_modules`
  (lm_head), embeddings, norms and the Mixtral router stay in `model.dtype`; under QLoRA, peft's
  `prepare_model_for_kbit_training` then upcasts those to fp32 (reported as `weights`; the
  as-loaded figure is `weights_as_loaded`).
- lora: r x (in + out) per adapted linear (fp32), plus full copies of `peft.modules_to_save`.
- gradients (same dtype as the trainable parameters) and optimizer state: AdamW 8 bytes per
  trainable parameter (two fp32 moments); 8-bit AdamW (`*adamw*8bit` optims) 2 bytes + one fp32
  absmax per 256-block per moment; paged optimizers hold the same bytes but can spill to CPU.
- reference (DPO): the reference's own weights: a frozen copy of the model under full
  fine-tuning, a frozen copy of the SFT adapter under LoRA (the base weights are shared).
- activations at `train.max_length` x `train.per_device_batch_size` (DPO: 2 x batch, chosen and
  rejected), with or without gradient checkpointing, TRL's fused LM head, and DPO's reference
  forward (see `activation_bytes`; the decoder-stack part is checked against measured memory).
- parallelism (`SHARDED`): DDP keeps a whole copy per GPU; ZeRO-1 splits the optimizer state over
  `num_gpus`, ZeRO-2 also the gradients, ZeRO-3 and FSDP (FULL_SHARD) also the weights
  (activations are never split). `parallel_kind` reads which from `accelerate launch`'s
  environment, `parallel_from_accelerate_config` from an accelerate config file.

Figures are bytes; the table shows GiB (2^30). A GPU "fits" when the total is at most
`FIT_FRACTION` of its memory (CUDA context, allocator fragmentation and kernels' workspace take
the rest).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from mistral_align.chat.encoder import get_encoder
from mistral_align.errors import ConfigError
from mistral_align.names import PARALLEL_KINDS
from mistral_align.schema.recipe import stage_max_length

log = logging.getLogger(__name__)

GPU_SIZES_GB = (24, 40, 48, 80, 141)
FIT_FRACTION = 0.92
GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NF4_CODE_BYTES = 16 * 4  # the 16-value NF4/FP4 code table, fp32, one per layer
NESTED_CODE_BYTES = 256 * 4  # the 8-bit dynamic code table of the double quantisation, fp32
BLOCKSIZE_4BIT = 64
BLOCKSIZE_NESTED = 256


@dataclass
class Shape:
    type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    num_local_experts: int = 0
    num_experts_per_tok: int = 2
    tie_word_embeddings: bool = False


def model_shape(model_cfg: Any) -> Shape:
    """The architecture numbers: `model.architecture` (inline; vocab = the tokenizer's) or `model.shape`."""
    if model_cfg.get("architecture") is not None:
        a = model_cfg.architecture
        vocab = get_encoder(model_cfg.tokenizer_version).vocab_size
        experts = a.num_local_experts if a.type == "mixtral" else 0
        tie = a.tie_word_embeddings
    elif model_cfg.get("shape") is not None:
        a = model_cfg.shape
        vocab, experts, tie = a.vocab_size, (a.num_local_experts if a.type == "mixtral" else 0), a.tie_word_embeddings
    else:
        raise ConfigError(f"model.shape: {model_cfg.name} has no architecture numbers; add a `shape:` node to its config")
    return Shape(
        type=a.type,
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_hidden_layers,
        num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_key_value_heads,
        head_dim=a.head_dim or a.hidden_size // a.num_attention_heads,
        vocab_size=vocab,
        num_local_experts=experts,
        num_experts_per_tok=a.num_experts_per_tok,
        tie_word_embeddings=tie,
    )


def linear_layers(s: Shape) -> list[tuple[str, str, int, int]]:
    """(name, kind, in_features, out_features) of every nn.Linear, in model order (lm_head last)."""
    h, hd = s.hidden_size, s.head_dim
    out = []
    for i in range(s.num_hidden_layers):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.self_attn.q_proj", "attention", h, s.num_attention_heads * hd),
            (f"{p}.self_attn.k_proj", "attention", h, s.num_key_value_heads * hd),
            (f"{p}.self_attn.v_proj", "attention", h, s.num_key_value_heads * hd),
            (f"{p}.self_attn.o_proj", "attention", s.num_attention_heads * hd, h),
        ]
        if s.num_local_experts:
            for e in range(s.num_local_experts):
                q = f"{p}.mlp.experts.{e}"
                out += [
                    (f"{q}.gate_proj", "experts", h, s.intermediate_size),
                    (f"{q}.up_proj", "experts", h, s.intermediate_size),
                    (f"{q}.down_proj", "experts", s.intermediate_size, h),
                ]
        else:
            out += [
                (f"{p}.mlp.gate_proj", "mlp", h, s.intermediate_size),
                (f"{p}.mlp.up_proj", "mlp", h, s.intermediate_size),
                (f"{p}.mlp.down_proj", "mlp", s.intermediate_size, h),
            ]
    if not s.tie_word_embeddings:
        out.append(("lm_head", "embeddings", h, s.vocab_size))
    return out


def other_parameters(s: Shape) -> list[tuple[str, str, int]]:
    """(name, kind, numel) of the parameters that are not linear weights."""
    h = s.hidden_size
    out = [("model.embed_tokens", "embeddings", s.vocab_size * h)]
    for i in range(s.num_hidden_layers):
        out += [(f"model.layers.{i}.input_layernorm", "norms", h), (f"model.layers.{i}.post_attention_layernorm", "norms", h)]
        if s.num_local_experts:
            out.append((f"model.layers.{i}.mlp.gate", "router", s.num_local_experts * h))
    out.append(("model.norm", "norms", h))
    return out


def nf4_layer_bytes(n: int, double_quant: bool = True, storage_bytes: int = 1) -> int:
    """Bytes bitsandbytes holds for one 4-bit layer of n weights (packed weight + quant state)."""
    packed = math.ceil(math.ceil(n / 2) / storage_bytes) * storage_bytes
    blocks = math.ceil(n / BLOCKSIZE_4BIT)
    if double_quant:
        state = blocks + 4 * math.ceil(blocks / BLOCKSIZE_NESTED) + 4 + NESTED_CODE_BYTES
    else:
        state = 4 * blocks
    return packed + state + NF4_CODE_BYTES


def int8_layer_bytes(in_features: int, out_features: int) -> int:
    """LLM.int8(): int8 weight plus one fp32 scale per output row (SCB)."""
    return in_features * out_features + 4 * out_features


def _skipped(name: str, skip: list[str]) -> bool:
    return any(name == k or name.endswith("." + k) or name.split(".")[-1] == k for k in skip)


def weight_bytes(s: Shape, quant_cfg: Any, dtype: str, kbit_prepared: bool = True,
                 fused_experts: bool = False) -> dict[str, Any]:
    """Weight bytes by module kind and by dtype. `kbit_prepared`: after peft's k-bit preparation
    (non-quantised half-precision weights upcast to fp32), as during QLoRA training.
    `fused_experts`: stock transformers 5's Mixtral, whose fused 3-D experts bitsandbytes skips
    (the "before" of issue 9; mistral-align quantises every expert)."""
    mode = quant_cfg.mode
    skip = list(quant_cfg.get("skip_modules") or [])
    full = DTYPE_BYTES[dtype]
    if mode != "none" and kbit_prepared:
        full = 4
    full_dtype = "float32" if full == 4 else dtype
    by_kind: dict[str, int] = {}
    by_dtype: dict[str, int] = {}
    params_quantised = 0

    def add(kind: str, dt: str, b: int) -> None:
        by_kind[kind] = by_kind.get(kind, 0) + b
        by_dtype[dt] = by_dtype.get(dt, 0) + b

    for name, kind, i, o in linear_layers(s):
        n = i * o
        if fused_experts and kind == "experts":
            add(kind, full_dtype, n * full)
        elif mode in ("nf4", "fp4") and not _skipped(name, skip):
            storage = 1 if quant_cfg.get("storage_dtype", "uint8") == "uint8" else DTYPE_BYTES[quant_cfg.storage_dtype]
            packed = math.ceil(math.ceil(n / 2) / storage) * storage
            total = nf4_layer_bytes(n, quant_cfg.get("double_quant", True), storage)
            add(kind, f"{mode} (packed)", packed)
            by_kind[kind] += total - packed
            by_dtype["quant_state"] = by_dtype.get("quant_state", 0) + total - packed
            params_quantised += n
        elif mode == "int8" and not _skipped(name, skip):
            add(kind, "int8", n)
            by_kind[kind] += 4 * o
            by_dtype["quant_state"] = by_dtype.get("quant_state", 0) + 4 * o
            params_quantised += n
        else:
            add(kind, full_dtype, n * full)
    for _name, kind, n in other_parameters(s):
        add(kind, full_dtype, n * full)
    total_params = sum(i * o for _, _, i, o in linear_layers(s)) + sum(n for _, _, n in other_parameters(s))
    return {
        "total": sum(by_kind.values()),
        "by_kind": by_kind,
        "by_dtype": by_dtype,
        "params": total_params,
        "params_quantised": params_quantised,
    }


def lora_params(s: Shape, peft_cfg: Any) -> int:
    """Trainable parameters of the adapter (LoRA A and B, modules_to_save copies, router LoRA)."""
    if peft_cfg.method == "none":
        return sum(i * o for _, _, i, o in linear_layers(s)) + sum(n for _, _, n in other_parameters(s))
    targets = list(peft_cfg.target_modules)
    all_linear = targets == ["all-linear"]
    r = peft_cfg.r
    total = 0
    for name, kind, i, o in linear_layers(s):
        leaf = name.split(".")[-1]
        if name == "lm_head":
            if not all_linear and "lm_head" in targets:
                total += r * (i + o)
            continue
        if kind == "experts" and not peft_cfg.get("experts", True) and all_linear:
            continue
        if all_linear or leaf in targets:
            total += r * (i + o)
    if s.num_local_experts and peft_cfg.get("train_router", False):
        total += s.num_hidden_layers * r * (s.num_local_experts + s.hidden_size)
    for m in peft_cfg.get("modules_to_save") or []:
        if m in ("embed_tokens", "lm_head"):
            total += s.vocab_size * s.hidden_size
    return total


def optimizer_bytes(trainable: int, optim: str) -> int:
    """Optimizer state: AdamW two fp32 moments; 8-bit variants one byte per moment plus block absmax."""
    if "8bit" in optim:
        return 2 * trainable + 2 * 4 * math.ceil(trainable / 256)
    if "sgd" in optim:
        return 0
    if "adafactor" in optim:
        return 4 * trainable // 64  # factored second moment; a rough figure
    return 8 * trainable


# TRL's fused LM head (trl.trainer.utils.add_fused_lm_head, used by SFTTrainer and DPOTrainer) projects
# hidden states through the head in tiles of at most this many tokens x vocabulary entries
# (trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE, trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE).
HEAD_TILE_TOKENS = 4096
HEAD_TILE_VOCAB = 32768


def layer_activation_bytes(s: Shape, act_dtype_bytes: int, lora_r: int = 0) -> int:
    """Bytes per token that one decoder layer keeps for its backward pass.

    Counted from what autograd saves in transformers' Mistral / Mixtral layers (the figures are
    checked against measured memory in tests/test_estimate.py): the two norms' inputs and outputs
    (4 x hidden), q and k after rotary and v (SDPA's inputs) and the attention output (o_proj's
    input); dense MLP: gate, act(gate), up and their product (4 x intermediate); Mixtral, per routed
    expert: its gathered input, those four and its weighted output, plus the router's fp32 logits
    and softmax; LoRA: the fp32 r-wide intermediate of each adapted linear."""
    h, hd = s.hidden_size, s.head_dim
    q, kv = s.num_attention_heads * hd, s.num_key_value_heads * hd
    attention = 4 * h + 2 * q + 2 * kv
    if s.num_local_experts:
        k = s.num_experts_per_tok
        mlp = k * (4 * s.intermediate_size + 2 * h)
        extra = 4 * 2 * s.num_local_experts + 4 * lora_r * (4 + 3 * k)
    else:
        mlp = 4 * s.intermediate_size
        extra = 4 * lora_r * 7
    return (attention + mlp) * act_dtype_bytes + extra


def stack_activation_bytes(s: Shape, batch: int, length: int, act_dtype_bytes: int, checkpointing: bool,
                           lora_r: int = 0, reference: bool = False) -> dict[str, int]:
    """Peak memory of one step's decoder stack (the LM head aside), by phase, in bytes.

    - kept: what the forward pass leaves for the backward: every layer's activations, or with
      gradient checkpointing only each layer's input; plus the final norm's input and output.
    - backward: the most the backward adds at once: the gradient of the residual stream and of the
      layer's output (2 x hidden per token) and the first large one the layer's backward makes, its
      MLP down-projection's input gradient (intermediate; Mixtral: one expert's share of the
      tokens, the experts running one at a time); with gradient checkpointing also that layer's
      activations, recomputed.
    - reference: DPO's reference forward (no gradients), run after the policy's forward as TRL's
      DPOTrainer does: the working set of one layer (dense: its input, the norm's output and the
      four MLP tensors; Mixtral: the experts run one at a time on their share of the tokens).
    The peak is kept + the larger of backward and reference."""
    h, a = s.hidden_size, act_dtype_bytes
    tokens = batch * length
    layer = layer_activation_bytes(s, a, lora_r)
    per_token_kept = (s.num_hidden_layers * (h * a if checkpointing else layer)) + 2 * h * a
    share = s.num_experts_per_tok / s.num_local_experts if s.num_local_experts else 1
    per_token_backward = int((2 * h + share * s.intermediate_size) * a) + (layer if checkpointing else 0)
    if not reference:
        per_token_reference = 0
    elif s.num_local_experts:
        per_token_reference = int((3 * h + share * (4 * s.intermediate_size + 2 * h)) * a)
    else:
        per_token_reference = (2 * h + 4 * s.intermediate_size) * a
    kept, backward, ref = tokens * per_token_kept, tokens * per_token_backward, tokens * per_token_reference
    return {"kept": kept, "backward": backward, "reference": ref, "total": kept + max(backward, ref)}


def lm_head_bytes(s: Shape, tokens: int, act_dtype_bytes: int, head_trainable: bool = False) -> dict[str, int]:
    """TRL's fused LM head as it runs on a GPU (Triton kernels): the logits are never materialised
    whole. Kept: the labelled positions' hidden states (copied). Working set, forward and again in
    the backward: one logits tile of HEAD_TILE_TOKENS x HEAD_TILE_VOCAB; in the backward also the
    fp32 gradient of the hidden states and, when the head trains, the fp32 gradient of its weight.
    Modelled from TRL's code, not measured: on the CPU TRL runs the tile in plain torch, which holds
    several tile-sized temporaries at once."""
    a = act_dtype_bytes
    tile = min(tokens, HEAD_TILE_TOKENS) * min(s.vocab_size, HEAD_TILE_VOCAB) * a
    backward = tile + 4 * tokens * s.hidden_size + (4 * s.vocab_size * s.hidden_size if head_trainable else 0)
    kept = tokens * s.hidden_size * a
    return {"kept": kept, "working": backward, "total": kept + backward}


def activation_bytes(s: Shape, batch: int, length: int, act_dtype_bytes: int, checkpointing: bool,
                     lora_r: int = 0, reference: bool = False, head_trainable: bool = False) -> dict[str, int]:
    """Peak activation memory of one training step, by part: the decoder stack
    (`stack_activation_bytes`) and TRL's fused LM head (`lm_head_bytes`), whose working set comes
    before the stack's backward and so counts only where it is the larger."""
    stack = stack_activation_bytes(s, batch, length, act_dtype_bytes, checkpointing, lora_r, reference)
    head = lm_head_bytes(s, batch * length, act_dtype_bytes, head_trainable)
    working = max(stack["backward"], stack["reference"], head["working"])
    total = stack["kept"] + head["kept"] + working
    return {"layers": stack["kept"], "lm_head": head["kept"], "working": working,
            "reference_forward": stack["reference"], "total": total}


# What each way of running on several GPUs splits among them (the rest is a whole copy per GPU):
# ZeRO-1 the optimizer state, ZeRO-2 also the gradients, ZeRO-3 and FSDP (FULL_SHARD) also the
# parameters. DDP (and ZeRO stage 0) shards nothing.
SHARDED = {
    "ddp": frozenset(),
    "zero1": frozenset({"optimizer"}),
    "zero2": frozenset({"optimizer", "gradients"}),
    "zero3": frozenset({"optimizer", "gradients", "weights"}),
    "fsdp": frozenset({"optimizer", "gradients", "weights"}),
}
assert tuple(SHARDED) == PARALLEL_KINDS


def _stage_train(cfg: Any, stage: str | None) -> Any:
    return cfg[stage or "sft"].train


def _length(cfg: Any, train: Any, stage: str | None) -> int:
    return stage_max_length(cfg[stage or "sft"])


def estimate_memory(cfg: Any, num_gpus: int = 1, parallel: str = "ddp", stage: str | None = None) -> dict[str, Any]:
    """Per-GPU memory of training with `cfg` (the recipes' resolved config), in bytes.

    parallel: one of PARALLEL_KINDS. stage: None / "sft" uses `cfg.sft.train`; "dpo" uses
    `cfg.dpo.train` and counts the chosen and rejected halves (2 x batch; KTO's batch is rows, each
    one sequence with gradients: its KL and reference forwards run without them), the reference's
    weights (full fine-tuning: a frozen copy of the model; LoRA: a frozen copy of the SFT adapter,
    shared base weights) and, without `dpo.precompute_ref_log_probs`, the reference's forward (no
    gradients)."""
    if parallel not in SHARDED:
        raise ConfigError(f"parallel must be one of {', '.join(PARALLEL_KINDS)}, got {parallel!r}")
    s = model_shape(cfg.model)
    train = _stage_train(cfg, stage)
    length = _length(cfg, train, stage)
    batch = train.per_device_batch_size
    quant, peft = cfg.quant, cfg.peft
    weights = weight_bytes(s, quant, cfg.model.dtype, kbit_prepared=True)
    loaded = weight_bytes(s, quant, cfg.model.dtype, kbit_prepared=False)
    trainable = lora_params(s, peft)
    full_ft = peft.method == "none"
    param_bytes = 0 if full_ft else 4 * trainable  # LoRA weights are fp32; full fine-tune: counted in weights
    grad_bytes = (DTYPE_BYTES[cfg.model.dtype] if full_ft else 4) * trainable
    optim = str(train.get("optim", "adamw_torch_fused"))
    opt_bytes = optimizer_bytes(trainable, optim)
    dpo = stage == "dpo"
    reference_bytes = 0
    if dpo:
        # LoRA: counted whether or not the run starts from an SFT adapter (the pipeline sets
        # dpo.init_from only once SFT has run); without one the reference is the base, adapter off.
        reference_bytes = loaded["total"] if full_ft else param_bytes
    reference_forward = dpo and not bool(cfg.dpo.get("precompute_ref_log_probs", False))
    act_bytes = DTYPE_BYTES[quant.compute_dtype] if quant.mode != "none" else DTYPE_BYTES[cfg.model.dtype]
    act_batch = 2 * batch if dpo and cfg.dpo.get("objective", "dpo") != "kto" else batch
    checkpointing = bool(train.get("gradient_checkpointing", True))
    head_trainable = full_ft or "lm_head" in list(peft.get("modules_to_save") or [])

    def acts(gc: bool) -> dict[str, int]:
        return activation_bytes(s, act_batch, length, act_bytes, gc, lora_r=0 if full_ft else peft.r,
                                reference=reference_forward, head_trainable=head_trainable)

    sharded = SHARDED[parallel]

    def per_gpu_share(part: str, b: int) -> int:
        return math.ceil(b / num_gpus) if part in sharded else b

    per_gpu = {
        "weights": per_gpu_share("weights", weights["total"]),
        "lora": per_gpu_share("weights", param_bytes),
        "gradients": per_gpu_share("gradients", grad_bytes),
        "optimizer": per_gpu_share("optimizer", opt_bytes),
        "reference": per_gpu_share("weights", reference_bytes),
        "activations": acts(checkpointing)["total"],
    }
    total = sum(per_gpu.values())
    return {
        "model": cfg.model.name,
        "quant": quant.mode,
        "peft": peft.method,
        "stage": stage or "sft",
        "parallel": parallel,
        "num_gpus": num_gpus,
        "batch": batch,
        "length": length,
        "gradient_checkpointing": checkpointing,
        "optim": optim,
        "paged_optimizer": "paged" in optim,
        "params": weights["params"],
        "params_quantised": weights["params_quantised"],
        "trainable_params": trainable,
        "weights_as_loaded": loaded["total"],
        "weights_by_kind": weights["by_kind"],
        "weights_by_dtype": weights["by_dtype"],
        "activations_detail": acts(checkpointing),
        "activations_other_checkpointing": acts(not checkpointing)["total"],
        "per_gpu": per_gpu,
        "total_per_gpu": total,
        "fits": {f"{g}GB": total <= FIT_FRACTION * g * GiB for g in GPU_SIZES_GB},
    }


def format_estimate(r: dict[str, Any]) -> str:
    g = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    lines = [
        f"model {r['model']}  quant {r['quant']}  peft {r['peft']}  stage {r['stage']}  {r['parallel']} x{r['num_gpus']}  "
        f"batch {r['batch']} x length {r['length']}  gradient checkpointing {'on' if r['gradient_checkpointing'] else 'off'}  optim {r['optim']}",
        f"parameters {r['params']:,} ({r['params_quantised']:,} quantised), trainable {r['trainable_params']:,}",
        "",
        "per GPU:",
    ]
    for part, b in r["per_gpu"].items():
        if part != "reference" or r["stage"] == "dpo":  # only DPO has a reference model
            lines.append(f"  {part:<12}{g(b)}")
    lines.append(f"  {'total':<12}{g(r['total_per_gpu'])}")
    lines.append("")
    lines.append("weights by module kind: " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in r["weights_by_kind"].items()) + " GiB")
    lines.append("weights by dtype: " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in r["weights_by_dtype"].items()) + " GiB")
    lines.append(f"weights as loaded (before k-bit preparation): {r['weights_as_loaded'] / GiB:.2f} GiB")
    other = "off" if r["gradient_checkpointing"] else "on"
    lines.append(f"activations with gradient checkpointing {other}: {r['activations_other_checkpointing'] / GiB:.2f} GiB")
    lines.append("")
    lines.append("fits on " + " / ".join(f"{k}: {'yes' if v else 'no'}" for k, v in r["fits"].items()))
    return "\n".join(lines)


def _zero_kind(stage: Any) -> str:
    if str(stage) not in ("0", "1", "2", "3"):
        raise ConfigError(f"DeepSpeed ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    return "ddp" if str(stage) == "0" else f"zero{stage}"


def _deepspeed_json_kind(path: str | Path) -> str:
    """The ZeRO stage a DeepSpeed JSON config asks for (DeepSpeed's default: 0, no sharding)."""
    try:
        ds = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"DeepSpeed config {path}: cannot read it ({e})") from None
    return _zero_kind((ds.get("zero_optimization") or {}).get("stage", 0))


def parallel_kind(env: Mapping[str, str] | None = None) -> str:
    """How `accelerate launch` shards this run, from the environment it sets: fsdp, zero1/zero2/zero3
    (DeepSpeed: the stage of `--deepspeed_config_file`, else of the accelerate config's `zero_stage`,
    else accelerate's default, 2) or ddp (whole copies)."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        ds_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        if ds_file != "none":
            return _deepspeed_json_kind(ds_file)
        return _zero_kind(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))
    return "ddp"


def parallel_from_accelerate_config(path: str | Path) -> tuple[str, int]:
    """(parallel kind, number of GPUs) of an `accelerate launch --config_file` YAML."""
    import yaml

    path = Path(path)
    try:
        acc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"accelerate config {path}: cannot read it ({' '.join(str(e).split())})") from None
    gpus = int(acc.get("num_processes") or 1)
    kind = str(acc.get("distributed_type", "NO")).upper()
    if kind == "FSDP":
        return "fsdp", gpus
    if kind == "DEEPSPEED":
        ds = acc.get("deepspeed_config") or {}
        if ds.get("deepspeed_config_file"):
            ds_file = Path(ds["deepspeed_config_file"])
            return _deepspeed_json_kind(ds_file if ds_file.is_absolute() else path.parent / ds_file), gpus
        return _zero_kind(ds.get("zero_stage", 2)), gpus
    return "ddp", gpus


def warn_if_wont_fit(cfg: Any, gpu_bytes: int | None = None, num_gpus: int = 1, parallel: str | None = None,
                     stage: str | None = None) -> dict[str, Any] | None:
    """Log a warning before loading when the estimate exceeds `gpu_bytes` (default: this process's
    CUDA device's memory; nothing on the CPU). `parallel`: None reads it from `accelerate launch`'s
    environment (`parallel_kind`). Returns the estimate, or None when not estimated."""
    if gpu_bytes is None:
        try:
            import torch

            if not torch.cuda.is_available():
                return None
            gpu_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        except Exception:  # noqa: BLE001 - an estimate must never stop a run
            return None
    try:
        r = estimate_memory(cfg, num_gpus=num_gpus, parallel=parallel or parallel_kind(), stage=stage)
    except Exception as e:  # noqa: BLE001 - no shape known, an unreadable DeepSpeed config, ...
        log.info("memory estimate skipped: %s", e)
        return None
    if r["total_per_gpu"] > FIT_FRACTION * gpu_bytes:
        parts = ", ".join(f"{part} {b / GiB:.1f}" for part, b in r["per_gpu"].items())
        log.warning(
            "memory estimate: %.1f GiB per GPU (%s) but this GPU has %.1f GiB; lower %s.train.per_device_batch_size "
            "or the length, turn on %s.train.gradient_checkpointing, or use quant=nf4 (see `mistral-align estimate`)",
            r["total_per_gpu"] / GiB, parts, gpu_bytes / GiB, stage or "sft", stage or "sft",
        )
    return r
