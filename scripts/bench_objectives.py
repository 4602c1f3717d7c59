"""KTO, SimPO and ORPO against the plain TRL trainer for each, one process per run, A B C A B C ...

    .venv/bin/python scripts/bench_objectives.py [--objectives kto,simpo,orpo] [--rounds 3] [--pairs 64]
        [--layers 4] [--hidden 256] [--quant nf4]

The sibling of scripts/bench_dpo.py, on the same tiny Mistral (real v3 vocabulary, 32768), LoRA,
generated preference pairs (lognormal reply lengths, ~3% long replies) and starting adapter, one
epoch, 8 pairs a step (KTO: the same pairs split into 16 rows a step, each a desirable and an
undesirable reply). For each objective:

    trl-O        TRL's own trainer for it with its defaults, on conversational text rows through the
                 tokenizer's chat template (the Hub's Mistral v0.3 template on a converted tokenizer, as
                 in bench_dpo): trl.KTOTrainer; trl.experimental CPOTrainer(loss_type="simpo") and
                 ORPOTrainer, which compute every position's logits over the whole vocabulary
    ours-O       our trainer on the exact mistral-common ids, padded batches, TRL's fused LM head
    ours-O-pf    the same with dpo.padding_free (KTO: its rows and its KL rows each packed)

Reported per contender (medians over rounds): replies trained per second (2 per pair, 1 per KTO
row), the per-round ratio against trl-O, steps, peak RSS, mean train loss.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
from bench_dpo import build_policy  # noqa: E402

OBJECTIVES = ("kto", "simpo", "orpo")


def contenders(objectives: list[str]) -> list[str]:
    return [c for o in objectives for c in (f"trl-{o}", f"ours-{o}", f"ours-{o}-pf")]


def objective_args(objective: str, args, out: Path):
    """The objective's TRL config, as the preference stage makes it (train/objectives.py)."""
    import torch
    from trl import KTOConfig

    from mistral_align.train.reference_free import CPOConfig, ORPOConfig

    common = dict(
        output_dir=str(out), per_device_train_batch_size=args.batch * (2 if objective == "kto" else 1),
        per_device_eval_batch_size=args.batch, num_train_epochs=1, learning_rate=1e-4, lr_scheduler_type="constant",
        max_length=args.max_length, report_to=[], logging_steps=1, save_strategy="no",
        use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(), gradient_checkpointing=False, seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    if objective == "kto":
        return KTOConfig(beta=0.1, **common)
    if objective == "simpo":
        return CPOConfig(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0, **common)
    return ORPOConfig(beta=0.1, **common)


def our_trainer(objective: str, args, data_file: Path, out: Path, padding_free: bool):
    """Our preference stage's pieces: exact ids from our loader (KTO: the pairs split), tokenizer,
    model with LoRA, our trainer for the objective."""
    from types import SimpleNamespace

    from mistral_align.chat import get_encoder
    from mistral_align.chat.hf_tokenizer import load_hf_tokenizer, save_hf_tokenizer
    from mistral_align.data.load import load_dpo_dataset, load_kto_dataset
    from mistral_align.schema.data import DataConfig, SourceConfig
    from mistral_align.train.objectives import TRAINERS
    from mistral_align.train.sft import keeps_float32

    encoder = get_encoder("v3")
    load = load_kto_dataset if objective == "kto" else load_dpo_dataset
    data = load(DataConfig(train=[SourceConfig(path=str(data_file))], max_length=args.max_length), encoder)
    tokenizer = load_hf_tokenizer(save_hf_tokenizer("v3", out / "tokenizer"))
    model, quant_cfg = build_policy(args)
    keep = keeps_float32(SimpleNamespace(quant=quant_cfg, model=SimpleNamespace(dtype=quant_cfg.compute_dtype)))
    return TRAINERS[objective](model=model, args=objective_args(objective, args, out / "ckpt"), train_dataset=data.train,
                               processing_class=tokenizer, keep_float32=keep, padding_free=padding_free)  # fmt: skip


def plain_trl_trainer(objective: str, args, data_file: Path, out: Path):
    """What a TRL user runs: conversational text rows (pairs; KTOTrainer splits them itself), the
    tokenizer's chat template, the trainer's defaults."""
    from datasets import load_dataset
    from trl import KTOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOTrainer
        from trl.experimental.orpo import ORPOTrainer

    tokenizer = bc.handbook_tokenizer(out / "tokenizer", generation_markers=False)
    # The converted tokenizer has no pad token, and the experimental trainers build their collator before
    # they fall back to EOS themselves: set as their error message asks.
    tokenizer.pad_token = tokenizer.eos_token
    model, _ = build_policy(args)
    data = load_dataset("json", data_files=str(data_file), split="train")
    cls = {"kto": KTOTrainer, "simpo": CPOTrainer, "orpo": ORPOTrainer}[objective]
    return cls(model=model, args=objective_args(objective, args, out / "ckpt"), train_dataset=data, processing_class=tokenizer)


def child(args) -> None:
    import torch

    torch.manual_seed(0)
    name = args.child
    objective = name.split("-")[1]
    out = Path(tempfile.mkdtemp(prefix=f"bench_objectives_{name}_"))
    t0 = time.perf_counter()
    if name.startswith("trl-"):
        trainer = plain_trl_trainer(objective, args, Path(args.data), out)
    else:
        trainer = our_trainer(objective, args, Path(args.data), out, padding_free=name.endswith("-pf"))
    setup_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - t1
    rows = len(trainer.train_dataset)
    replies = rows if objective == "kto" else 2 * rows
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    Path(args.out).write_text(json.dumps({
        "rows": rows, "replies": replies, "steps": result.global_step, "train_seconds": train_seconds,
        "setup_seconds": setup_seconds, "replies_per_s": replies / train_seconds, "train_loss": result.training_loss,
        "last_loss": losses[-1], "peak_rss_mib": bc.peak_rss_mib(),
    }))  # fmt: skip


def report(results: dict, args) -> dict:
    import os

    summary = {}
    for name, runs in results.items():
        base = f"trl-{name.split('-')[1]}"
        ratios = bc.pair_ratios(results, name, base, "replies_per_s") if base in results else []
        summary[name] = {
            "replies_per_s": bc.median([r["replies_per_s"] for r in runs]),
            "ratio_vs_trl": bc.median(ratios) if ratios else None,
            "ratio_vs_trl_per_round": [round(x, 3) for x in ratios],
            "steps": runs[0]["steps"], "rows": runs[0]["rows"], "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "train_loss": runs[0]["train_loss"], "load_during": [round(r["load"], 2) for r in runs],
        }  # fmt: skip
    print(f"\nPreference objectives, {args.pairs} pairs, {args.batch} pairs a step (KTO: {2 * args.batch} rows), "
          f"max_length {args.max_length}, tiny Mistral {args.layers}x{args.hidden} vocab 32768, {args.quant} + LoRA "
          f"r=16, {args.rounds} rounds, cpu count {os.cpu_count()}; ratios against trl-<objective>")  # fmt: skip
    print(f"{'contender':<16} {'replies/s':>9} {'ratio':>6} {'steps':>5} {'RSS MiB':>8} {'loss':>8}  load")
    for name, s in summary.items():
        ratio = f"{s['ratio_vs_trl']:6.2f}" if s["ratio_vs_trl"] is not None else f"{'-':>6}"
        print(f"{name:<16} {s['replies_per_s']:9.2f} {ratio} {s['steps']:5d} {s['peak_rss_mib']:8.0f} "
              f"{s['train_loss']:8.4f}  {s['load_during']}")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objectives", default=",".join(OBJECTIVES))
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="pairs a step (KTO: twice as many rows)")
    ap.add_argument("--prompt-words", type=int, default=15, help="median words of a pair's prompt (lognormal)")
    bc.add_shared_arguments(ap, contenders(list(OBJECTIVES)), max_length=1024)
    args = ap.parse_args()
    if args.child:
        return child(args)
    objectives = args.objectives.split(",")
    names = [c for c in args.contenders.split(",") if c.split("-")[1] in objectives]
    work = Path(tempfile.mkdtemp(prefix="bench_objectives_"))
    data = bc.write_jsonl(work / "pairs.jsonl", bc.dpo_pairs(args.pairs, seed=0, prompt_words=args.prompt_words))
    common = ["--data", str(data), "--pairs", str(args.pairs), "--batch", str(args.batch), *bc.model_arguments(args)]
    results = bc.run_rounds(__file__, names, args.rounds, common, work)
    bc.write_report(args, report(results, args), results)


if __name__ == "__main__":
    main()
