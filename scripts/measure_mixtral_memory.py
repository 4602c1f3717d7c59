"""Mixtral-8x7B-shaped NF4 memory on one GPU, measured against `mistral-align estimate`.

    python scripts/measure_mixtral_memory.py [--length 2048] [--json OUT.json]
    python scripts/measure_mixtral_memory.py --shape tiny-mixtral --length 128     # the CPU dry run

1. The config `mistral-align estimate model=mixtral-8x7b-v0.1 quant=nf4 ...` composes (the same
   overrides; `--shape tiny-mixtral` overrides its shape numbers to 2 x 128, 4 experts), and its
   estimate (model.estimate.estimate_memory, stage sft).
2. That model (its `shape:` numbers) with random weights, quantised to NF4 as it loads: our
   per-expert Mixtral class (model/mixtral_unfused.py) through `from_pretrained` with the config's
   own BitsAndBytesConfig, fed a state dict under the Hub's names whose tensors are drawn on the
   device in bf16 one at a time as transformers reads them (bench_common.random_checkpoint), not
   files: a bf16 folder of 46.7 B weights is 93 GB, more than the device's disk.
3. Measured against the estimate: torch.cuda.memory_allocated after loading (vs weights_as_loaded)
   and after peft's k-bit preparation (vs weights), the tensors' own bytes (model.facts.
   parameter_bytes); goal: within 3%. Then one QLoRA step of our SFT trainer (LoRA on attention
   and every expert, gradient checkpointing, one row of --length tokens, fused AdamW): its peak
   (max_memory_allocated, reset after the adapter goes on) against the estimate's total per GPU.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

GiB = 2**30
GOAL = 0.03


def overrides(shape_name: str, length: int, cuda: bool) -> list[str]:
    """The estimate's overrides: the model, NF4, one row of `length`; the tiny stand-in's shape and float32 on the CPU."""
    out = ["model=mixtral-8x7b-v0.1", "quant=nf4", f"sft.train.max_length={length}", "sft.train.per_device_batch_size=1",
           "sft.train.max_steps=1", "sft.train.warmup_ratio=0.0", "sft.train.logging_steps=1",
           "sft.train.save_steps=1000000", "peft.dropout=0.0"]  # fmt: skip
    if shape_name in bc.TINY_SHAPES:
        out += [f"model.shape.{k}={v}" for k, v in bc.TINY_SHAPES[shape_name].items() if k != "type"]
    if not cuda:
        out += ["model.dtype=float32", "quant.compute_dtype=float32"]
    return out


def load_quantised(cfg, device: str):
    """The composed config's model with random weights, NF4 as it loads (from_pretrained + its BitsAndBytesConfig)."""
    from omegaconf import OmegaConf

    from mistral_align.model.load import model_class
    from mistral_align.model.quantize import DTYPE, quantization_config
    from mistral_align.schema.model import ShapeConfig

    shape = ShapeConfig(**OmegaConf.to_container(cfg.model.shape))
    config = bc.transformers_config(shape)
    dtype = DTYPE[cfg.model.dtype]
    model = model_class(config).from_pretrained(
        None, config=config, state_dict=bc.random_checkpoint(config, dtype, device), dtype=dtype,
        attn_implementation=cfg.model.attn_implementation, quantization_config=quantization_config(cfg.quant),
        device_map={"": device},
    )  # fmt: skip
    model.config.use_cache = False
    return model, shape


def one_step(model, cfg, length: int, vocab: int, out: Path) -> dict:
    """One optimizer step of our SFT trainer on one row of `length` random tokens."""
    from datasets import Dataset

    from mistral_align.chat.hf_tokenizer import load_hf_tokenizer, save_hf_tokenizer
    from mistral_align.train.sft import build_sft_trainer, keeps_float32, make_sft_args

    rng = random.Random(0)
    ids = [1] + [rng.randrange(3, vocab) for _ in range(length - 1)]
    data = Dataset.from_list([{"input_ids": ids, "labels": ids}])
    tokenizer = load_hf_tokenizer(save_hf_tokenizer(cfg.model.tokenizer_version, out / "tokenizer"))
    args = make_sft_args(cfg.sft, 0, out, ["none"], has_eval=False)
    args.save_strategy, args.disable_tqdm = "no", True
    trainer = build_sft_trainer(model, tokenizer, args, data, keep_float32=keeps_float32(cfg))
    t = time.perf_counter()
    result = trainer.train()
    return {"step_s": round(time.perf_counter() - t, 2), "loss": result.training_loss}


def ratio(measured, estimated):
    return None if not measured or not estimated else measured / estimated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8x7b", help="8x7b (the model config's shape) or tiny-mixtral (CPU dry run)")
    ap.add_argument("--length", type=int, default=2048, help="tokens in the one training row")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args()

    import torch

    from mistral_align.entry.estimate_command import compose_config
    from mistral_align.model.estimate import estimate_memory
    from mistral_align.model.facts import parameter_bytes
    from mistral_align.model.lora import apply_peft
    from mistral_align.schema.recipe import check_config

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    res: dict = {"overrides": overrides(args.shape, args.length, cuda), "goal": f"within {GOAL:.0%}"}
    res["command"] = "mistral-align estimate " + " ".join(res["overrides"]) + " --json"
    cfg = compose_config("sft_dpo", res["overrides"])
    check_config(cfg, stages=("sft",), need_data=False)
    est = estimate_memory(cfg, stage="sft")
    res["estimate"] = {k: est[k] for k in ("weights_as_loaded", "per_gpu", "total_per_gpu", "params", "params_quantised",
                                           "weights_by_kind", "trainable_params")}  # fmt: skip

    def write():
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1, default=str))

    write()
    base = torch.cuda.memory_allocated() if cuda else 0
    t = time.perf_counter()
    model, shape = load_quantised(cfg, device)
    res["load_s"] = round(time.perf_counter() - t, 1)
    measured = {"gpu_bytes_after_load": torch.cuda.memory_allocated() - base if cuda else None,
                "tensor_bytes_after_load": parameter_bytes(model)["total"]}  # fmt: skip
    model = apply_peft(model, cfg.peft, quantized=True, gradient_checkpointing=cfg.sft.train.gradient_checkpointing)
    lora = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    prepared = parameter_bytes(model)
    measured.update(gpu_bytes_kbit_prepared=torch.cuda.memory_allocated() - base - lora if cuda else None,
                    tensor_bytes_kbit_prepared=prepared["total"] - prepared["by_kind"].get("lora", 0),
                    lora_bytes=lora, by_kind_kbit_prepared=prepared["by_kind"])  # fmt: skip
    e = res["estimate"]
    res["measured"] = measured
    res["ratios"] = {
        "gpu_after_load / weights_as_loaded": ratio(measured["gpu_bytes_after_load"], e["weights_as_loaded"]),
        "tensors_after_load / weights_as_loaded": ratio(measured["tensor_bytes_after_load"], e["weights_as_loaded"]),
        "gpu_kbit_prepared / weights": ratio(measured["gpu_bytes_kbit_prepared"], e["per_gpu"]["weights"]),
        "tensors_kbit_prepared / weights": ratio(measured["tensor_bytes_kbit_prepared"], e["per_gpu"]["weights"]),
        "lora / lora": ratio(lora, e["per_gpu"]["lora"]),
    }
    res["weights_within_goal"] = all(abs(r - 1) <= GOAL for k, r in res["ratios"].items() if r is not None and "lora" not in k)
    write()
    print(json.dumps({k: res[k] for k in ("load_s", "measured", "ratios", "weights_within_goal")}, indent=1), flush=True)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step = one_step(model, cfg, args.length, shape.vocab_size, Path(tempfile.mkdtemp(prefix="mixtral_step_")))
    step["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    step["peak_rss_mib"] = bc.peak_rss_mib()
    step["peak / estimate total_per_gpu"] = ratio(step["peak_gpu_bytes"], e["total_per_gpu"])
    res["qlora_step"] = step
    write()
    print(json.dumps(step, indent=1))


if __name__ == "__main__":
    main()
