"""SFT real tokens per second against what users run instead, one process per run, A B C A B C ...

    .venv/bin/python scripts/bench_sft.py [--rounds 3] [--rows 256] [--layers 4] [--hidden 256] [--quant nf4]

Every contender trains the same tiny Mistral (real v3 vocabulary, 32768) with the same fresh
LoRA on the same generated chat rows (1-3 turns, lognormal reply lengths, ~3% long rows), one
epoch:

    ours          our SFT stage as the recipe runs it (`our_sft_stage`): exact mistral-common ids
                  and masks from load_sft_dataset, build_model + apply_peft, make_sft_args +
                  build_sft_trainer (bfd packing, padding-free rows of max_length)
    trl           plain trl.SFTTrainer the alignment-handbook way: conversational rows, the Hub
                  chat template on a converted tokenizer (bench_common.handbook_tokenizer, with
                  `{% generation %}` markers added so assistant_only_loss works), padded batches,
                  no packing
    trl-packed    the same with TRL's packing switched on (bfd, padding-free)
    ours-gpu-path ours with its two CPU-only changes switched off (the LM head scores every position,
                  the adapter is cast as TRL casts it), as on a CUDA GPU where both are moot: on the
                  CPU, its ratio to trl-packed is our own overhead beyond TRL's packing (not run
                  by default)

Reported (medians over rounds): real tokens/s (non-pad tokens / training seconds), batch fill
(real tokens / token slots), optimizer steps, peak RSS, mean train loss, ratios against `trl`
per round; and the tokens each contender trains on against our exact masks.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

CONTENDERS = ["trl", "ours", "trl-packed"]


class CountingCollator:
    """Counts real tokens, token slots and trained labels of every batch."""

    def __init__(self, inner):
        self.inner, self.real, self.slots, self.trained = inner, 0, 0, 0

    def __call__(self, examples):
        batch = self.inner(examples)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        self.real += int(mask.sum()) if mask is not None else ids.numel()
        self.slots += ids.numel()
        self.trained += int((batch["labels"] != -100).sum())
        return batch


def train_config(args, packing: bool, batch: int):
    from mistral_align.schema.train import SFTTrainConfig

    return SFTTrainConfig(epochs=getattr(args, "epochs", 1), lr=1e-4, lr_scheduler="constant", warmup_ratio=0.0, per_device_batch_size=batch,
                       grad_accum=1, packing=packing, packing_strategy="bfd", max_length=args.max_length,
                       gradient_checkpointing=False, bf16="auto", logging_steps=1, save_steps=10**6)  # fmt: skip


def our_sft_data(args, data_file: Path, out: Path):
    """(stage node, train rows, tokenizer) as `SFTStage` loads them: exact mistral-common ids and
    masks from load_sft_dataset, our tokenizer."""
    from mistral_align.chat import get_encoder
    from mistral_align.chat.hf_tokenizer import load_hf_tokenizer, save_hf_tokenizer
    from mistral_align.data.load import load_sft_dataset
    from mistral_align.schema.data import SFTDataConfig, SourceConfig

    stage = SimpleNamespace(data=SFTDataConfig(train=[SourceConfig(path=str(data_file))], max_length=args.max_length),
                            train=train_config(args, packing=True, batch=args.packed_batch))  # fmt: skip
    data = load_sft_dataset(stage.data, get_encoder("v3"))
    return stage, data.train, load_hf_tokenizer(save_hf_tokenizer("v3", out / "tokenizer"))


def our_sft_trainer(stage, model, train_rows, tokenizer, out: Path, keep_float32: bool):
    """Our SFT trainer on `model` (with its adapter): make_sft_args + build_sft_trainer, as `SFTStage`
    builds it (bfd packing, padding-free rows of max_length)."""
    from mistral_align.train.sft import build_sft_trainer, make_sft_args

    sft_args = make_sft_args(stage, 0, out, ["none"], has_eval=False)
    sft_args.save_strategy, sft_args.disable_tqdm = "no", True
    return build_sft_trainer(model, tokenizer, sft_args, train_rows, None, keep_float32=keep_float32)


def our_sft_stage(args, data_file: Path, out: Path, cpu_changes: bool = True):
    """Our SFT stage's calls in the order `train/stage.run_stage` makes them (data, tokenizer, model
    with LoRA, trainer), with the same functions `SFTStage` uses. `cpu_changes=False` switches off
    the two CPU-only changes (train/lm_head.py, train/precision.py)."""
    from mistral_align.chat import get_encoder
    from mistral_align.model.load import build_model
    from mistral_align.model.lora import apply_peft
    from mistral_align.train.sft import keeps_float32

    model_cfg, quant_cfg, peft_cfg = bc.tiny_mistral_configs(args.layers, args.hidden, args.quant)
    stage, train_rows, tokenizer = our_sft_data(args, data_file, out)
    cfg = SimpleNamespace(model=model_cfg, quant=quant_cfg, peft=peft_cfg, sft=stage)
    model = build_model(cfg.model, cfg.quant, vocab_size=get_encoder("v3").vocab_size, seed=0)
    model = apply_peft(model, cfg.peft, quantized=cfg.quant.mode != "none", gradient_checkpointing=stage.train.gradient_checkpointing)
    if not cpu_changes:
        import contextlib

        import mistral_align.train.hooks as hooks

        hooks.lm_head_scores_labelled_positions_only = contextlib.nullcontext
    return our_sft_trainer(stage, model, train_rows, tokenizer, out, keep_float32=cpu_changes and keeps_float32(cfg))


def plain_trl(args, data_file: Path, out: Path, packing: bool):
    from mistral_align.chat import get_encoder
    from mistral_align.model.load import build_model
    from mistral_align.model.lora import apply_peft

    model_cfg, quant_cfg, peft_cfg = bc.tiny_mistral_configs(args.layers, args.hidden, args.quant)
    model = build_model(model_cfg, quant_cfg, vocab_size=get_encoder("v3").vocab_size, seed=0)
    model = apply_peft(model, peft_cfg, quantized=args.quant != "none", gradient_checkpointing=False)
    return trl_sft_trainer(args, model, data_file, out, packing)


def trl_sft_trainer(args, model, data_file: Path, out: Path, packing: bool):
    """trl.SFTTrainer the alignment-handbook way on `model` (with its adapter): conversational rows, the
    Hub chat template on a converted tokenizer (with `{% generation %}` markers so assistant_only_loss
    works), padded batches, or TRL's own packing (bfd, padding-free) with `packing`."""
    import torch
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = bc.handbook_tokenizer(out / "tokenizer", generation_markers=True)
    cfg = SFTConfig(
        output_dir=str(out / "ckpt"), num_train_epochs=getattr(args, "epochs", 1), learning_rate=1e-4,
        lr_scheduler_type="constant", per_device_train_batch_size=args.packed_batch if packing else args.batch,
        max_length=args.max_length, packing=packing, assistant_only_loss=True, report_to=[], logging_steps=1,
        save_strategy="no", use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(),
        gradient_checkpointing=False, seed=0, disable_tqdm=True, pad_token="<unk>",
    )  # fmt: skip
    data = load_dataset("json", data_files=str(data_file), split="train")
    return SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tokenizer)


def mask_accounting(trainer, data_file: Path, name: str) -> dict:
    """Rows whose ids and trained positions equal our exact encoding (unpacked contenders only)."""
    from mistral_align.chat import get_encoder
    from mistral_align.chat.schema import parse_sft_messages

    enc = get_encoder("v3")
    ours = [enc.encode_sft(parse_sft_messages(json.loads(line)["messages"])) for line in open(data_file)]
    res = {"exact_trained_tokens": sum(sum(1 for x in o.labels if x != -100) for o in ours), "rows": len(ours)}
    if name != "trl":
        return res
    ds = trainer.train_dataset
    same_ids = same_masks = 0
    for row, o in zip(ds, ours):
        same_ids += row["input_ids"] == o.input_ids
        same_masks += row["input_ids"] == o.input_ids and row["labels"] == o.labels
    res.update(rows_equal_ids=same_ids, rows_equal_ids_and_mask=same_masks)
    return res


def child(args) -> None:
    import torch

    torch.manual_seed(0)
    out = Path(tempfile.mkdtemp(prefix=f"bench_sft_{args.child}_"))
    data = Path(args.data)
    if args.child.startswith("ours"):
        trainer = our_sft_stage(args, data, out, cpu_changes=args.child == "ours")
    else:
        trainer = plain_trl(args, data, out, args.child == "trl-packed")
    counter = trainer.data_collator = CountingCollator(trainer.data_collator)
    t = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t
    res = {
        "train_seconds": seconds, "steps": result.global_step, "real_tokens": counter.real, "slots": counter.slots,
        "trained_tokens": counter.trained, "real_tokens_per_s": counter.real / seconds,
        "batch_fill": counter.real / counter.slots, "train_loss": result.training_loss,
        "peak_rss_mib": bc.peak_rss_mib(), **mask_accounting(trainer, data, args.child),
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(res))


def report(results: dict, args) -> dict:
    import os

    summary = {}
    base = bc.ratio_base(results)
    for name, runs in results.items():
        ratios = bc.pair_ratios(results, name, base, "real_tokens_per_s")
        summary[name] = {
            "real_tokens_per_s": bc.median([r["real_tokens_per_s"] for r in runs]),
            "ratio_vs_trl": bc.median(ratios), "ratio_vs_trl_per_round": [round(x, 3) for x in ratios],
            "batch_fill": runs[0]["batch_fill"], "steps": runs[0]["steps"], "real_tokens": runs[0]["real_tokens"],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "train_loss": runs[0]["train_loss"],
            "trained_tokens": runs[0]["trained_tokens"], "exact_trained_tokens": runs[0]["exact_trained_tokens"],
            "load_during": [round(r["load"], 2) for r in runs],
            **{k: runs[0][k] for k in ("rows_equal_ids", "rows_equal_ids_and_mask") if k in runs[0]},
        }  # fmt: skip
        if "trl-packed" in results:
            summary[name]["ratio_vs_trl_packed"] = bc.median(bc.pair_ratios(results, name, "trl-packed", "real_tokens_per_s"))
    print(f"\nSFT, {args.rows} rows, max_length {args.max_length}, tiny Mistral {args.layers}x{args.hidden} vocab 32768, "
          f"{args.quant} + LoRA r=16, {args.rounds} rounds, cpu count {os.cpu_count()}; 'x trl' is against {base}")
    print(f"{'contender':<13} {'tok/s':>8} {'x trl':>6} {'x packed':>8} {'fill':>5} {'steps':>5} {'RSS MiB':>8} "
          f"{'loss':>7} {'trained':>8} {'exact':>6}")
    for name, s in summary.items():
        print(f"{name:<13} {s['real_tokens_per_s']:8.0f} {s['ratio_vs_trl']:6.2f} {s.get('ratio_vs_trl_packed', float('nan')):8.2f} "
              f"{s['batch_fill']:5.2f} {s['steps']:5d} {s['peak_rss_mib']:8.0f} {s['train_loss']:7.4f} "
              f"{s['trained_tokens']:8d} {s['exact_trained_tokens']:6d}")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="conversations per padded batch (trl)")
    ap.add_argument("--packed-batch", type=int, default=2, help="packed rows of max_length per batch")
    bc.add_shared_arguments(ap, CONTENDERS, max_length=2048)
    args = ap.parse_args()
    if args.child:
        return child(args)
    work = Path(tempfile.mkdtemp(prefix="bench_sft_"))
    data = bc.write_jsonl(work / "chats.jsonl", bc.sft_conversations(args.rows, seed=0))
    common = ["--data", str(data), "--rows", str(args.rows), "--batch", str(args.batch), "--packed-batch",
              str(args.packed_batch), *bc.model_arguments(args)]  # fmt: skip
    results = bc.run_rounds(__file__, args.contenders.split(","), args.rounds, common, work)
    bc.write_report(args, report(results, args), results)


if __name__ == "__main__":
    main()
