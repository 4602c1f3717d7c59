"""7B-shaped QLoRA speed and memory on one GPU: ours against TRL, side by side in one process.

    python scripts/bench_7b.py [--pairs sft:2048,dpo:2048,sft:4096] [--rounds 2] [--seconds 30]
                               [--budget-s 0] [--json OUT.json]
    python scripts/bench_7b.py --shape tiny --seconds 10 ...        # the CPU dry run, same code

The base: the architecture of configs/model/mistral-7b-v0.3.yaml (its `shape:` numbers; `--shape
tiny` is a 2 x 128 stand-in), random weights drawn on the device in bf16 (float32 on the CPU) and
written once as a Hub-style safetensors folder (/dev/shm when it has room), then loaded by our
`model.load.build_model` as a Hub model is: NF4, double quantisation, bf16 compute, sdpa. Loaded
once, k-bit prepared once with gradient checkpointing (non-reentrant); each contender of each round
gets a fresh LoRA adapter (r=16, alpha 32, every linear layer, the same seed), taken off again
afterwards (peft `unload`), so no contender pays for loading a 7B model.

Pairs, rounds alternating A B A B (`kind:max_length`):
    sft:L   ours        bench_sft.our_sft_trainer: exact mistral-common ids and masks, bfd packing,
                        padding-free rows of L (--packed-batch rows per step)
            trl-packed  bench_sft.trl_sft_trainer: handbook tokenizer and template, TRL's own bfd
                        packing (padding-free), the same rows per step
            trl         (optional, --sft-contenders) the same unpacked: padded batches of --sft-batch
    dpo:L   ours-pf     bench_dpo.our_dpo_trainer, padding_free=True, --dpo-batch pairs per step
            trl         bench_dpo.plain_trl_trainer: plain DPOTrainer on text rows
            ours-padded, ours-shared   (optional, --dpo-contenders)

Each contender trains --warmup optimizer steps, then --seconds of timed steps (bench_common.TimeBox;
the data repeats when it runs out), its peak GPU memory reset before its adapter goes on. Per
contender and round: real tokens/s, pairs/s, steps, peak GPU memory (max_memory_allocated), MFU
(bench_common.FLOPS_FORMULA) against the dense bf16 peak and the measured matmul rate, the loss of
every step. Per pair: medians, per-round ratios against TRL, whether the losses agree (mean over the
steps both ran, within bf16 tolerance) and whether both train on the same tokens over one epoch and
on our exact masks. The JSON report is rewritten after every contender round, so a run stopped by
a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
import bench_dpo  # noqa: E402
import bench_sft  # noqa: E402

BASELINE = {"sft": "trl-packed", "dpo": "trl"}
SFT_LOSS_RTOL = 2e-2  # mean loss over the common steps, bf16 activations (tests/test_gpu.py uses the same)
DPO_LOSS_ATOL = 2e-2
GiB = 2**30


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def device_facts() -> dict:
    import importlib.metadata as md
    import platform

    import torch

    versions = {}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "mistral-common"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    facts = {"python": platform.python_version(), "versions": versions, "cpu_count": os.cpu_count()}
    if cuda():
        p = torch.cuda.get_device_properties(0)
        facts.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / GiB, 1), cuda=torch.version.cuda,
                     multiprocessors=p.multi_processor_count, peak_bf16_dense_tflops=bc.H200_BF16_DENSE_TFLOPS
                     if "H100" in p.name or "H200" in p.name else None)  # fmt: skip
    return facts


# -- the base, once ---------------------------------------------------------------------------------------


def base_configs(args):
    """(ModelConfig for the folder, QuantConfig, PeftConfig, ShapeConfig): our typed nodes, as a recipe has them."""
    from mistral_align.schema.model import ModelConfig, PeftConfig, QuantConfig

    shape, tokenizer_version = bc.bench_shape(args.shape, args.model)
    dtype = "bfloat16" if cuda() else "float32"  # 4-bit layers compute in float32 on the CPU
    model_cfg = ModelConfig(name=f"{args.model}-shaped-random", hub_id=None, tokenizer_version=tokenizer_version,
                            dtype=dtype, attn_implementation=args.attn)  # fmt: skip
    quant_cfg = QuantConfig(mode="nf4", compute_dtype=dtype)
    return model_cfg, quant_cfg, PeftConfig(r=16, alpha=32, dropout=0.0), shape


def estimated_weight_bytes(model_cfg, quant_cfg, shape, kbit_prepared: bool) -> int:
    """`mistral-align estimate`'s weight bytes for this model (model.estimate.weight_bytes)."""
    from omegaconf import OmegaConf

    from mistral_align.model.estimate import model_shape, weight_bytes

    node = OmegaConf.structured(model_cfg)
    node.shape = OmegaConf.structured(shape)
    return weight_bytes(model_shape(node), OmegaConf.structured(quant_cfg), model_cfg.dtype, kbit_prepared)["total"]


def load_base(args, report: dict):
    """Random weights -> Hub-style folder -> build_model (NF4) -> k-bit preparation; times and bytes into report["base"]."""
    import torch

    from mistral_align.model.facts import parameter_bytes
    from mistral_align.model.load import build_model
    from mistral_align.model.lora import prepare_for_adapter
    from mistral_align.model.quantize import DTYPE

    model_cfg, quant_cfg, peft_cfg, shape = base_configs(args)
    config = bc.transformers_config(shape)
    dtype, device = DTYPE[model_cfg.dtype], "cuda" if cuda() else "cpu"
    params = sum(math.prod(t.shape) for t in bc.random_checkpoint(config, dtype, "meta").values())
    folder = bc.scratch_dir(params * torch.finfo(dtype).bits // 8)
    t = time.perf_counter()
    bc.write_random_base(config, folder, dtype, device)
    write_s = time.perf_counter() - t
    if cuda():
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
    model_cfg.hub_id = str(folder)
    t = time.perf_counter()
    model = build_model(model_cfg, quant_cfg, vocab_size=shape.vocab_size)
    load_s = time.perf_counter() - t
    loaded = torch.cuda.memory_allocated() - before if cuda() else None
    measured = parameter_bytes(model)["total"]
    shutil.rmtree(folder, ignore_errors=True)
    model = prepare_for_adapter(model, quantized=True, gradient_checkpointing=True)
    report["base"] = {
        "shape": vars(shape), "params": params, "folder": str(folder.parent), "dtype": model_cfg.dtype,
        "write_random_folder_s": round(write_s, 1), "build_model_nf4_s": round(load_s, 1),
        "weights_gpu_bytes_after_load": loaded, "weights_tensor_bytes_after_load": measured,
        "weights_estimate_bytes_as_loaded": estimated_weight_bytes(model_cfg, quant_cfg, shape, kbit_prepared=False),
        "weights_gpu_bytes_kbit_prepared": torch.cuda.memory_allocated() - before if cuda() else None,
        "weights_tensor_bytes_kbit_prepared": parameter_bytes(model)["total"],
        "weights_estimate_bytes_kbit_prepared": estimated_weight_bytes(model_cfg, quant_cfg, shape, kbit_prepared=True),
        "quant": "nf4, double quant, compute " + quant_cfg.compute_dtype, "attn": model_cfg.attn_implementation,
        "lora": f"r={peft_cfg.r} alpha={peft_cfg.alpha} all linear layers", "gradient_checkpointing": True,
    }  # fmt: skip
    return model, SimpleNamespace(model=model_cfg, quant=quant_cfg, peft=peft_cfg, shape=shape)


def fresh_adapter(base, peft_cfg):
    """A new LoRA adapter on the prepared base, the same initial values for every contender."""
    import torch
    from peft import get_peft_model

    from mistral_align.model.lora import lora_config

    torch.manual_seed(0)
    return get_peft_model(base, lora_config(peft_cfg, base))


# -- data ----------------------------------------------------------------------------------------------------


def write_data(args, work: Path, lengths: dict[str, list[int]]) -> dict[str, Path]:
    """The long-tailed chat mix (bench_common's generators), kept to rows that fit the shortest
    max_length of their kind by our exact encoding: no contender skips or cuts a row."""
    from mistral_align.chat import get_encoder
    from mistral_align.chat.schema import parse_preference, parse_sft_messages

    enc = get_encoder("v3")
    files = {}
    if lengths.get("sft"):
        limit = min(lengths["sft"])
        rows = [r for r in bc.sft_conversations(args.sft_rows, seed=0)
                if len(enc.encode_sft(parse_sft_messages(r["messages"])).input_ids) <= limit]  # fmt: skip
        files["sft"] = bc.write_jsonl(work / "chats.jsonl", rows)
    if lengths.get("dpo"):
        limit = min(lengths["dpo"])

        def fits(row):
            e = enc.encode_dpo(parse_preference(row))
            return len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) <= limit

        files["dpo"] = bc.write_jsonl(work / "pairs.jsonl", [r for r in bc.dpo_pairs(args.dpo_pairs, seed=0) if fits(r)])
    return files


# -- one contender, one round -----------------------------------------------------------------------------


def build_trainer(kind: str, name: str, model, cfg, args, length: int, data: Path, out: Path, cache: dict):
    from mistral_align.train.sft import keeps_float32

    keep32 = keeps_float32(SimpleNamespace(quant=cfg.quant, model=cfg.model))
    batch = args.sft_batch if kind == "sft" else args.dpo_batch
    ns = SimpleNamespace(max_length=length, packed_batch=args.packed_batch, batch=batch, epochs=args.epochs)
    if kind == "sft" and name == "ours":
        if length not in cache:  # our exact ids and masks, loaded once per length
            cache[length] = bench_sft.our_sft_data(ns, data, out)
        stage, rows, tokenizer = cache[length]
        return bench_sft.our_sft_trainer(stage, model, rows, tokenizer, out, keep_float32=keep32)
    if kind == "sft":
        return bench_sft.trl_sft_trainer(ns, model, data, out, packing=name == "trl-packed")
    if name == "trl":
        return bench_dpo.plain_trl_trainer(ns, data, out, model=model)
    return bench_dpo.our_dpo_trainer(ns, data, out, padding_free=name != "ours-padded", precompute=False,
                                     shared_prompt=name == "ours-shared", model=model, keep_float32=keep32)  # fmt: skip


def run_contender(kind: str, name: str, base, cfg, args, length: int, data: Path, terms: dict, peaks: dict, cache: dict,
                  first: bool):
    """Train one contender for one round on a fresh adapter; returns (result, the base with the adapter taken off).
    The `first` round also counts what one epoch trains on (the same in every round)."""
    import torch

    if cuda():
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start_bytes = torch.cuda.memory_allocated() if cuda() else None  # the base; should not grow round by round
    out = Path(tempfile.mkdtemp(prefix=f"bench_7b_{kind}_{name}_"))
    t0 = time.perf_counter()
    model = fresh_adapter(base, cfg.peft)
    trainer = build_trainer(kind, name, model, cfg, args, length, data, out, cache)
    measure = bc.sft_batch_counts if kind == "sft" else bc.dpo_batch_counts
    box = bc.TimeBox(args.seconds, args.warmup)
    trainer.add_callback(box)
    counter = bc.StepCounter(trainer, box, measure)
    setup_s = time.perf_counter() - t0
    trainer.train()
    seconds, timed = box.elapsed, counter.totals
    flops = bc.model_flops(terms, timed.get("tokens", 0), timed.get("scored", 0), timed.get("sum_sq", 0),
                           reference_forward=kind == "dpo")  # fmt: skip
    res = {
        "setup_s": round(setup_s, 2), "warmup_s": round(box.warmup_seconds, 2), "timed_s": round(seconds, 2),
        "timed_steps": box.steps, "ran_out": box.ran_out, **{f"timed_{k}": v for k, v in timed.items()},
        "tokens_per_s": timed.get("tokens", 0) / seconds if seconds else None,
        "scored_tokens_per_s": timed.get("scored", 0) / seconds if seconds else None,
        "flops": flops, "mfu_vs_peak": bc.mfu(flops, seconds, peaks.get("peak")),
        "mfu_vs_measured_matmul": bc.mfu(flops, seconds, peaks.get("matmul")),
        "start_gpu_bytes": start_bytes, "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda() else None,
        "peak_rss_mib": bc.peak_rss_mib(),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }  # fmt: skip
    if kind == "dpo":
        res["pairs_per_s"] = timed.get("pairs", 0) / seconds if seconds else None
    if first and kind == "dpo":
        res.update(bench_dpo.token_accounting(trainer, data))
    if first:
        res["epoch"] = bc.epoch_counts(trainer, measure)
    if first and kind == "sft":
        res["exact_trained_tokens"] = bench_sft.mask_accounting(trainer, data, "ours")["exact_trained_tokens"]
    base = trainer.accelerator.unwrap_model(trainer.model).unload()
    assert not any("lora_" in n for n, _ in base.named_parameters()), "the adapter is still on the base"
    del trainer, model
    shutil.rmtree(out, ignore_errors=True)
    return res, base


# -- a pair: rounds, summary --------------------------------------------------------------------------------


def median(values):
    values = [v for v in values if v is not None]
    return bc.median(values) if values else None


def summarise(kind: str, runs: dict[str, list[dict]]) -> dict:
    base = BASELINE[kind] if BASELINE[kind] in runs else next(iter(runs))
    # SFT: trained tokens/s, the time one epoch of the same trained tokens takes (the handbook template
    # drops a system prompt from conversations that end with a reply, so TRL's rows hold fewer real tokens).
    rate = "scored_tokens_per_s" if kind == "sft" else "pairs_per_s"
    out = {"ratio_against": base, "rate": rate, "contenders": {}}
    for name, rounds in runs.items():
        n = min(len(rounds), len(runs[base]))
        ratios = [rounds[i][rate] / runs[base][i][rate] for i in range(n) if rounds[i][rate] and runs[base][i][rate]]
        out["contenders"][name] = {
            "rounds": len(rounds), "tokens_per_s": median([r["tokens_per_s"] for r in rounds]),
            "trained_tokens_per_s": median([r["scored_tokens_per_s"] for r in rounds]),
            "pairs_per_s": median([r.get("pairs_per_s") for r in rounds]),
            "ratio": median(ratios), "ratio_per_round": [round(x, 3) for x in ratios],
            "peak_gpu_gib": median([r["peak_gpu_bytes"] / GiB if r["peak_gpu_bytes"] else None for r in rounds]),
            "mfu_vs_peak": median([r["mfu_vs_peak"] for r in rounds]),
            "mfu_vs_measured_matmul": median([r["mfu_vs_measured_matmul"] for r in rounds]),
            "timed_s": median([r["timed_s"] for r in rounds]), "timed_steps": median([r["timed_steps"] for r in rounds]),
            "setup_s": median([r["setup_s"] for r in rounds]), "warmup_s": median([r["warmup_s"] for r in rounds]),
            "ran_out": any(r["ran_out"] for r in rounds), "epoch": rounds[0]["epoch"],
        }  # fmt: skip
        for key in ("exact_trained_tokens", "completion_tokens", "exact_completion_tokens", "sequences_equal_to_ours"):
            if key in rounds[0]:
                out["contenders"][name][key] = rounds[0][key]
    out["losses"] = compare_losses(kind, runs)
    out["equal_trained_tokens"] = equal_tokens(kind, runs)
    return out


def compare_losses(kind: str, runs: dict[str, list[dict]]) -> dict:
    """Each contender's mean loss over the steps every contender logged, per round, and whether they agree."""
    res = {"tolerance": f"relative {SFT_LOSS_RTOL}" if kind == "sft" else f"absolute {DPO_LOSS_ATOL}", "rounds": []}
    names = list(runs)
    for i in range(min(len(r) for r in runs.values())):
        k = min(len(runs[n][i]["losses"]) for n in names)
        means = {n: sum(runs[n][i]["losses"][:k]) / k for n in names} if k else {}
        ref = means.get(names[0])
        agree = bool(means) and all(
            (abs(m - ref) <= SFT_LOSS_RTOL * abs(ref)) if kind == "sft" else (abs(m - ref) <= DPO_LOSS_ATOL)
            for m in means.values())  # fmt: skip
        res["rounds"].append({"steps": k, "mean_loss": means, "agree": agree})
    res["agree"] = bool(res["rounds"]) and all(r["agree"] for r in res["rounds"])
    return res


def equal_tokens(kind: str, runs: dict[str, list[dict]]) -> dict:
    """One epoch's scored tokens per contender, and whether they equal each other and our exact masks."""
    scored = {n: r[0]["epoch"].get("scored") for n, r in runs.items()}
    exact = next(iter(runs.values()))[0].get("exact_trained_tokens" if kind == "sft" else "exact_completion_tokens")
    return {"epoch_scored_tokens": scored, "exact": exact, "equal": len(set(scored.values()) | {exact}) == 1}


def run_pair(spec: str, base, cfg, args, files: dict, terms: dict, peaks: dict, report: dict, deadline: float | None,
             write) -> object:
    kind, length = spec.split(":")[0], int(spec.split(":")[1])
    names = (args.sft_contenders if kind == "sft" else args.dpo_contenders).split(",")
    entry = report["pairs"].setdefault(spec, {"kind": kind, "max_length": length, "contenders": names, "runs": {}})
    runs = entry["runs"] = {n: [] for n in names}
    cache: dict = {}
    round_s = len(names) * (args.seconds + 20.0)  # a first guess; then what a round took
    for r in range(args.rounds):
        left = None if deadline is None else deadline - time.perf_counter()
        if left is not None and left < round_s:
            entry["stopped"] = f"round {r} not started: {left:.0f} s left, a round takes about {round_s:.0f} s"
            print(f"  {spec}: {entry['stopped']}", flush=True)
            break
        t = time.perf_counter()
        for name in names:
            res, base = run_contender(kind, name, base, cfg, args, length, files[kind], terms, peaks, cache, first=r == 0)
            runs[name].append(res)
            entry["summary"] = summarise(kind, {n: v for n, v in runs.items() if v})
            write()
            print(f"  {spec} round {r} {name:<12} {res['tokens_per_s']:10.0f} tok/s"
                  + (f" {res['pairs_per_s']:7.2f} pairs/s" if kind == "dpo" else "")
                  + f"  {res['timed_steps']:4d} steps in {res['timed_s']:5.1f} s, setup {res['setup_s']:.1f} s,"
                  f" warm-up {res['warmup_s']:.1f} s", flush=True)  # fmt: skip
        round_s = time.perf_counter() - t
    return base


def print_table(report: dict) -> None:
    dev = report["device"]
    print(f"\n{dev.get('gpu', 'CPU')} | matmul {report['peaks'].get('matmul') or 0:.3g} TFLOP/s measured | "
          f"base {report['base']['shape']['num_hidden_layers']} x {report['base']['shape']['hidden_size']}, NF4 + LoRA r=16, "
          f"gradient checkpointing | loaded in {report['base']['build_model_nf4_s']} s")  # fmt: skip
    for spec, entry in report["pairs"].items():
        s = entry.get("summary")
        if not s:
            print(f"{spec}: {entry.get('stopped', 'not run')}")
            continue
        print(f"\n{spec}  (ratio = median of per-round {s['rate']} ratios against {s['ratio_against']}; losses agree: "
              f"{s['losses']['agree']}; equal trained tokens: {s['equal_trained_tokens']['equal']})")
        print(f"{'contender':<12} {'rounds':>6} {'tok/s':>9} {'trained/s':>9} {'pairs/s':>8} {'ratio':>6} "
              f"{'per round':>16} {'peak GiB':>8} {'MFU pk':>6} {'MFU mm':>6} {'steps':>5}")  # fmt: skip
        for name, c in s["contenders"].items():
            f = lambda v, fmt: format(v, fmt) if v is not None else "-"  # noqa: E731
            print(f"{name:<12} {c['rounds']:6d} {f(c['tokens_per_s'], '9.0f')} {f(c['trained_tokens_per_s'], '9.0f')} "
                  f"{f(c['pairs_per_s'], '8.2f')} {f(c['ratio'], '6.2f')} {str(c['ratio_per_round']):>16} "
                  f"{f(c['peak_gpu_gib'], '8.1f')} {f(c['mfu_vs_peak'], '6.3f')} {f(c['mfu_vs_measured_matmul'], '6.3f')} "
                  f"{f(c['timed_steps'], '5.0f')}")
        if entry.get("stopped"):
            print(f"  ({entry['stopped']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="7b", help="7b (the model config's shape) or tiny (the CPU dry run)")
    ap.add_argument("--model", default="mistral-7b-v0.3", help="configs/model/<name>.yaml whose shape is used")
    ap.add_argument("--pairs", default="sft:2048,dpo:2048,sft:4096", help="kind:max_length, in order of value")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=30.0, help="timed training per contender and round")
    ap.add_argument("--warmup", type=int, default=2, help="optimizer steps before the clock starts")
    ap.add_argument("--budget-s", type=float, default=0.0, help="no round starts past this many seconds (0: no limit)")
    ap.add_argument("--sft-rows", type=int, default=1000)
    ap.add_argument("--dpo-pairs", type=int, default=400)
    ap.add_argument("--sft-contenders", default="ours,trl-packed")
    ap.add_argument("--dpo-contenders", default="ours-pf,trl")
    ap.add_argument("--packed-batch", type=int, default=1, help="packed rows of max_length per SFT step")
    ap.add_argument("--sft-batch", type=int, default=8, help="conversations per padded SFT batch (trl)")
    ap.add_argument("--dpo-batch", type=int, default=8, help="pairs per DPO step")
    ap.add_argument("--epochs", type=int, default=1000, help="the time box stops training long before")
    ap.add_argument("--attn", default=os.environ.get("BENCH_ATTN", "sdpa"))
    ap.add_argument("--json", help="the report, rewritten after every contender round")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s if args.budget_s else None
    report: dict = {"args": vars(args), "flops_formula": bc.FLOPS_FORMULA, "device": device_facts(), "pairs": {}}

    def write() -> None:
        report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        if args.json:
            tmp = Path(args.json + ".tmp")
            tmp.write_text(json.dumps(report, indent=1, default=str))
            tmp.replace(args.json)

    report["peaks"] = {"peak": report["device"].get("peak_bf16_dense_tflops"),
                       "matmul": bc.matmul_tflops("cuda" if cuda() else "cpu")}  # fmt: skip
    base, cfg = load_base(args, report)
    write()
    print(f"base loaded: {json.dumps(report['base'])}", flush=True)
    specs = [s for s in args.pairs.split(",") if s]
    lengths: dict[str, list[int]] = {}
    for s in specs:
        lengths.setdefault(s.split(":")[0], []).append(int(s.split(":")[1]))
    work = Path(tempfile.mkdtemp(prefix="bench_7b_"))
    files = write_data(args, work, lengths)
    terms = bc.flop_terms(cfg.shape)
    report["flop_terms"] = terms
    for spec in specs:
        base = run_pair(spec, base, cfg, args, files, terms, report["peaks"], report, deadline, write)
        write()
    print_table(report)
    write()


if __name__ == "__main__":
    main()
