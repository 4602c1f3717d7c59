"""DPO pairs per second against plain TRL, one process per run, A B C D A B C D ...

    .venv/bin/python scripts/bench_dpo.py [--rounds 3] [--pairs 64] [--layers 4] [--hidden 256] [--quant nf4]

Every contender trains the same tiny Mistral (real v3 vocabulary, 32768) with the same LoRA on
the same generated preference pairs (lognormal reply lengths, ~3% long replies), starting from
the same adapter (kept as the frozen reference, as after SFT), for one epoch, batch 8 pairs:

    trl             plain trl.DPOTrainer, conversational text rows through the tokenizer's chat
                    template (the Hub's Mistral v0.3 template on a converted tokenizer; see bench_common), its
                    defaults (padded [chosen; rejected] batch)
    ours-padded     PretokenizedDPOTrainer: exact mistral-common ids, padded batches
    ours-pf         the same with padding_free=True (one packed row per batch)
    ours-pf-precomp padding_free=True and precompute_ref_log_probs=True (the reference scored once,
                    before training; its time is reported apart and in the end-to-end figure)
    ours-shared     shared_prompt=True: packed as ours-pf, and each pair's prompt computed once
    ours-shared-precomp  shared_prompt=True and precompute_ref_log_probs=True

Reported per contender (medians over rounds): pairs/s over training, end to end pairs/s (with
the reference precompute), batch fill (real tokens / token slots the model computes; above 1 where
prompts are computed once), token slots computed per pair, steps, peak
RSS, mean train loss; the per-round ratio against `trl`; and how many completion tokens each
contender trains on, and how many of its sequences equal our exact ids.
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

CONTENDERS = ["trl", "ours-padded", "ours-pf", "ours-pf-precomp", "ours-shared", "ours-shared-precomp"]


class CountingCollator:
    """Counts real tokens and the token slots the model computes in every batch."""

    def __init__(self, inner):
        self.inner, self.real, self.slots = inner, 0, 0

    def __call__(self, examples):
        batch = self.inner(examples)
        self.real += int(batch["attention_mask"].sum())
        self.slots += int(batch["packed_input_ids"].numel() if "packed_input_ids" in batch else batch["attention_mask"].numel())
        return batch


def dpo_args(args, out: Path, precompute: bool):
    import torch
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(out), per_device_train_batch_size=args.batch, per_device_eval_batch_size=args.batch,
        num_train_epochs=getattr(args, "epochs", 1), learning_rate=1e-4, lr_scheduler_type="constant", beta=0.1, max_length=args.max_length,
        truncation_mode="keep_start", report_to=[], logging_steps=1, save_strategy="no", use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(), gradient_checkpointing=False, seed=0, disable_tqdm=True,
        precompute_ref_log_probs=precompute, dataloader_num_workers=0,
    )  # fmt: skip


def build_policy(args):
    """The tiny base model with a fresh LoRA adapter: what every contender starts from."""
    from mistral_align.chat import get_encoder
    from mistral_align.model.load import build_model
    from mistral_align.model.lora import apply_peft

    model_cfg, quant_cfg, peft_cfg = bc.tiny_mistral_configs(args.layers, args.hidden, args.quant)
    model = build_model(model_cfg, quant_cfg, vocab_size=get_encoder("v3").vocab_size, seed=0)
    return apply_peft(model, peft_cfg, quantized=args.quant != "none", gradient_checkpointing=False), quant_cfg


def our_dpo_trainer(args, data_file: Path, out: Path, padding_free: bool, precompute: bool, shared_prompt: bool,
                    model=None, keep_float32: bool | None = None):
    """Our DPO stage's pieces, in the recipe's order: exact ids from our loader, tokenizer, model
    with LoRA (the tiny one, or `model` with its adapter), PretokenizedDPOTrainer. (Re-point here
    when the stage moves into the library.)"""
    from mistral_align.chat import get_encoder
    from mistral_align.chat.hf_tokenizer import load_hf_tokenizer, save_hf_tokenizer
    from mistral_align.data.load import load_dpo_dataset
    from mistral_align.schema.data import DataConfig, SourceConfig
    from mistral_align.train.dpo_trainer import PretokenizedDPOTrainer
    from mistral_align.train.sft import keeps_float32

    encoder = get_encoder("v3")
    data = load_dpo_dataset(DataConfig(train=[SourceConfig(path=str(data_file))], max_length=args.max_length), encoder)
    tokenizer = load_hf_tokenizer(save_hf_tokenizer("v3", out / "tokenizer"))
    if model is None:
        model, quant_cfg = build_policy(args)
        keep_float32 = keeps_float32(SimpleNamespace(quant=quant_cfg, model=SimpleNamespace(dtype=quant_cfg.compute_dtype)))
    return PretokenizedDPOTrainer(
        model=model, args=dpo_args(args, out / "ckpt", precompute), train_dataset=data.train, processing_class=tokenizer,
        keep_float32=bool(keep_float32), padding_free=padding_free, shared_prompt=shared_prompt,
    )  # fmt: skip


def plain_trl_trainer(args, data_file: Path, out: Path, model=None):
    """What a handbook user runs: text rows, the tokenizer's chat template, trl.DPOTrainer defaults
    (on the tiny model, or on `model` with its adapter)."""
    from datasets import load_dataset
    from trl import DPOTrainer

    # transformers' MistralCommonBackend (our exact tokenizer) refuses a conversation that ends with an
    # assistant turn, which is how TRL tokenizes prompt + chosen: a TRL user gets the converted
    # tokenizer and the Hub's Jinja template instead.
    tokenizer = bc.handbook_tokenizer(out / "tokenizer", generation_markers=False)
    if model is None:
        model, _ = build_policy(args)
    data = load_dataset("json", data_files=str(data_file), split="train")
    return DPOTrainer(model=model, args=dpo_args(args, out / "ckpt", False), train_dataset=data, processing_class=tokenizer)


def token_accounting(trainer, data_file: Path) -> dict:
    """Completion tokens trained per pair, and how many sequences equal our exact ids."""
    from mistral_align.chat import get_encoder
    from mistral_align.chat.schema import parse_preference

    enc = get_encoder("v3")
    rows = [json.loads(line) for line in open(data_file)]
    ours = [enc.encode_dpo(parse_preference(r)) for r in rows]
    ds = trainer.train_dataset
    trained = sum(len(c) + len(r) for c, r in zip(ds["chosen_ids"], ds["rejected_ids"]))
    exact_trained = sum(len(o.chosen_ids) + len(o.rejected_ids) for o in ours)
    same = 0
    if len(ds) == len(ours):
        for p, c, r, o in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"], ours):
            same += (p + c == o.prompt_ids + o.chosen_ids) + (p + r == o.prompt_ids + o.rejected_ids)
    return {"completion_tokens": trained, "exact_completion_tokens": exact_trained, "sequences": 2 * len(ds),
            "sequences_equal_to_ours": same}  # fmt: skip


def child(args) -> None:
    import torch

    torch.manual_seed(0)
    out = Path(tempfile.mkdtemp(prefix=f"bench_dpo_{args.child}_"))
    t0 = time.perf_counter()
    if args.child == "trl":
        trainer = plain_trl_trainer(args, Path(args.data), out)
    else:
        trainer = our_dpo_trainer(args, Path(args.data), out, padding_free=args.child != "ours-padded",
                                  precompute=args.child.endswith("precomp"),
                                  shared_prompt=args.child.startswith("ours-shared"))  # fmt: skip
    setup_seconds = time.perf_counter() - t0
    counter = trainer.data_collator = CountingCollator(trainer.data_collator)
    t1 = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - t1
    pairs = len(trainer.train_dataset)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    res = {
        "pairs": pairs, "steps": result.global_step, "train_seconds": train_seconds, "setup_seconds": setup_seconds,
        "pairs_per_s": pairs / train_seconds, "real_tokens_per_s": counter.real / train_seconds,
        "batch_fill": counter.real / counter.slots, "slots_per_pair": counter.slots / pairs, "train_loss": result.training_loss, "last_loss": losses[-1],
        "peak_rss_mib": bc.peak_rss_mib(), **token_accounting(trainer, Path(args.data)),
    }  # fmt: skip
    if args.child.endswith("precomp"):
        # TRL scores the reference while the trainer is built; time that pass by itself on a copy.
        t2 = time.perf_counter()
        trainer._precompute_ref_logps(trainer.train_dataset.remove_columns(["ref_chosen_logps", "ref_rejected_logps"]).flatten_indices(),
                                      "bench", args.batch)  # fmt: skip
        res["precompute_seconds"] = time.perf_counter() - t2
    Path(args.out).write_text(json.dumps(res))


def report(results: dict, args) -> dict:
    import os

    summary = {}
    base = bc.ratio_base(results)
    for name, runs in results.items():
        e2e = [r["pairs"] / (r["train_seconds"] + r.get("precompute_seconds", 0.0)) for r in runs]
        summary[name] = {
            "pairs_per_s": bc.median([r["pairs_per_s"] for r in runs]),
            "pairs_per_s_end_to_end": bc.median(e2e),
            "ratio_vs_trl": bc.median(bc.pair_ratios(results, name, base, "pairs_per_s")),
            "ratio_vs_trl_per_round": [round(x, 3) for x in bc.pair_ratios(results, name, base, "pairs_per_s")],
            "ratio_end_to_end_vs_trl": bc.median([a / (b["pairs_per_s"]) for a, b in zip(e2e, results[base])]),
            "real_tokens_per_s": bc.median([r["real_tokens_per_s"] for r in runs]),
            "batch_fill": runs[0]["batch_fill"], "slots_per_pair": runs[0]["slots_per_pair"], "steps": runs[0]["steps"],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "train_loss": runs[0]["train_loss"], "last_loss": runs[0]["last_loss"],
            "completion_tokens": runs[0]["completion_tokens"], "exact_completion_tokens": runs[0]["exact_completion_tokens"],
            "sequences_equal_to_ours": f'{runs[0]["sequences_equal_to_ours"]}/{runs[0]["sequences"]}',
            "load_during": [round(r["load"], 2) for r in runs],
        }  # fmt: skip
        if "precompute_seconds" in runs[0]:
            summary[name]["precompute_seconds"] = bc.median([r["precompute_seconds"] for r in runs])
    print(f"\nDPO, {args.pairs} pairs, batch {args.batch}, max_length {args.max_length}, tiny Mistral "
          f"{args.layers}x{args.hidden} vocab 32768, {args.quant} + LoRA r=16, {args.rounds} rounds, cpu count {os.cpu_count()}, "
          f"prompts of median {args.prompt_words} words; ratios against {base}")
    hdr = f"{'contender':<20} {'pairs/s':>8} {'ratio':>6} {'e2e/s':>7} {'ratio':>6} {'fill':>5} {'tok/pair':>8} {'steps':>5} {'RSS MiB':>8} {'loss':>7} {'compl tok':>9} {'=ours':>7}"
    print(hdr)
    for name, s in summary.items():
        print(f"{name:<20} {s['pairs_per_s']:8.2f} {s['ratio_vs_trl']:6.2f} {s['pairs_per_s_end_to_end']:7.2f} "
              f"{s['ratio_end_to_end_vs_trl']:6.2f} {s['batch_fill']:5.2f} {s['slots_per_pair']:8.1f} {s['steps']:5d} {s['peak_rss_mib']:8.0f} "
              f"{s['train_loss']:7.4f} {s['completion_tokens']:9d} {s['sequences_equal_to_ours']:>7}")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-words", type=int, default=15, help="median words of a pair's prompt (lognormal)")
    bc.add_shared_arguments(ap, CONTENDERS, max_length=1024)
    args = ap.parse_args()
    if args.child:
        return child(args)
    work = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    data = bc.write_jsonl(work / "pairs.jsonl", bc.dpo_pairs(args.pairs, seed=0, prompt_words=args.prompt_words))
    common = ["--data", str(data), "--pairs", str(args.pairs), "--batch", str(args.batch), *bc.model_arguments(args)]
    contenders = args.contenders.split(",")
    results = bc.run_rounds(__file__, contenders, args.rounds, common, work)
    bc.write_report(args, report(results, args), results)


if __name__ == "__main__":
    main()
