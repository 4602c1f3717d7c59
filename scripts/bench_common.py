"""Shared pieces of scripts/bench_sft.py and scripts/bench_dpo.py: the generated chat data with a
long-tailed length mix, the tiny Mistral, and the A B A B ... driver (one process per run)."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from transformers import TrainerCallback

WORDS = (
    "the of and to in is that for it as with was on be by at this from or have an they which one you were her all "
    "she there would their we him been has when who will more no if out so said what up its about into than them can "
    "only other new some could time these two may then do first any my now such like our over man me even most made "
    "after also did many before must through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get here between both life being "
    "under never day same another know while last might us great old year off come since against go came right used "
    "take three, water; river. mountain? 1984 42 3.14 café naïve Zürich (see above) -- \"quoted\" x+y=z"
).split()


def lognormal_words(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, int(round(rng.lognormvariate(math.log(median), sigma)))))


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def sft_conversations(n: int, seed: int = 0) -> list[dict]:
    """`{"messages": [...]}` rows: 1-3 turns, an optional system prompt, lognormal reply lengths
    (median 40 words), short-ish prompts, and ~3% long rows (replies of 250-400 words)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        msgs = [{"role": "system", "content": text(rng, rng.randint(4, 15))}] if rng.random() < 0.3 else []
        long_row = rng.random() < 0.03
        for _turn in range(rng.choice([1, 1, 1, 2, 2, 3])):
            msgs.append({"role": "user", "content": text(rng, lognormal_words(rng, 12, 0.8, 2, 120))})
            words = rng.randint(250, 400) if long_row else lognormal_words(rng, 40, 0.9, 1, 400)
            msgs.append({"role": "assistant", "content": text(rng, words)})
        rows.append({"messages": msgs})
    return rows


def dpo_pairs(n: int, seed: int = 0, prompt_words: int = 15) -> list[dict]:
    """`{"prompt", "chosen", "rejected"}` rows (conversational, one user turn): lognormal lengths
    (prompts of median `prompt_words` words), ~3% long replies, chosen and rejected of independent lengths."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        long_row = rng.random() < 0.03
        reply = lambda: rng.randint(250, 400) if long_row else lognormal_words(rng, 40, 0.9, 1, 400)  # noqa: E731
        rows.append({
            "prompt": [{"role": "user", "content": text(rng, lognormal_words(rng, prompt_words, 0.8, 2, 10 * prompt_words))}],
            "chosen": [{"role": "assistant", "content": text(rng, reply())}],
            "rejected": [{"role": "assistant", "content": text(rng, reply())}],
        })  # fmt: skip
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def tiny_mistral_configs(layers: int, hidden: int, quant: str, attn: str | None = None):
    """(ModelConfig, QuantConfig, PeftConfig) of the benchmark model, our typed config nodes: float32 on
    the CPU (where 4-bit layers compute in float32), bfloat16 on a CUDA GPU. `attn` defaults to the
    BENCH_ATTN environment variable, else sdpa (flash_attention_2 on a GPU with flash-attn)."""
    import torch

    from mistral_align.schema.model import ArchitectureConfig, ModelConfig, PeftConfig, QuantConfig

    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    attn = attn or os.environ.get("BENCH_ATTN", "sdpa")

    arch = ArchitectureConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=8, num_key_value_heads=4)  # fmt: skip
    model_cfg = ModelConfig(name="bench", architecture=arch, tokenizer_version="v3", dtype=dtype, attn_implementation=attn)
    quant_cfg = QuantConfig(mode=quant, compute_dtype=dtype)
    return model_cfg, quant_cfg, PeftConfig(r=16, alpha=32, dropout=0.0)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def add_shared_arguments(ap, contenders: list[str], max_length: int) -> None:
    """The options both benchmarks take: model size, rounds, contenders, output; and the ones the
    parent passes to each child process."""
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--quant", default="nf4", choices=["nf4", "none"])
    ap.add_argument("--max-length", type=int, default=max_length)
    ap.add_argument("--contenders", default=",".join(contenders))
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)


def model_arguments(args) -> list[str]:
    """The shared options, as the parent passes them on to a child."""
    return ["--layers", str(args.layers), "--hidden", str(args.hidden), "--quant", args.quant,
            "--max-length", str(args.max_length)]  # fmt: skip


def write_report(args, summary: dict, results: dict) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "summary": summary, "runs": results}, indent=1))


def run_rounds(script: str, contenders: list[str], rounds: int, common_args: list[str], workdir: Path) -> dict:
    """Run `python script --child NAME --out FILE common_args` for every contender, A B C A B C ...,
    each in a fresh process; returns {name: [result dict per round]}."""
    results: dict[str, list[dict]] = {c: [] for c in contenders}
    for r in range(rounds):
        for name in contenders:
            out = workdir / f"{name}.{r}.json"
            t = time.time()
            proc = subprocess.run([sys.executable, script, "--child", name, "--out", str(out), *common_args],
                                  capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})  # fmt: skip
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
                raise SystemExit(f"{name} failed (round {r})")
            res = json.loads(out.read_text())
            res["load"] = os.getloadavg()[0]
            results[name].append(res)
            print(f"  round {r} {name:<22} {time.time() - t:6.1f}s wall, {res['train_seconds']:.1f}s training, "
                  f"load {res['load']:.2f}", flush=True)  # fmt: skip
    return results


def median(values):
    return statistics.median(values)


def ratio_base(results: dict) -> str:
    """The contender ratios are taken against: plain TRL (`trl`) when it ran, else the first one."""
    return "trl" if "trl" in results else next(iter(results))


def pair_ratios(results: dict, name: str, base: str, key: str) -> list[float]:
    """Per-round ratio name/base of `key` (rounds run back to back, so each pair shares the load)."""
    return [a[key] / b[key] for a, b in zip(results[name], results[base])]


# What a user of the alignment-handbook gets for Mistral-7B-Instruct-v0.3: a tokenizer converted from
# the sentencepiece file and the Hub repository's Jinja chat template. The Hub template is
# reconstructed here without its tool-calling branches (no network on this machine): BOS once,
# "[INST] " + user + "[/INST]", " " + trimmed reply + EOS, and the system prompt prepended to the
# *last* user message only (so a conversation that ends with an assistant turn loses it).
HUB_V03_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- generation %}{{- ' ' + message['content']|trim + eos_token }}{%- endgeneration %}"
    "{%- endif %}"
    "{%- endfor %}"
)


def handbook_tokenizer(out_dir: Path, generation_markers: bool = True):
    """A transformers tokenizer converted from mistral-common's v3 sentencepiece file, with the Hub
    chat template. `generation_markers=False` is the template as the Hub ships it (TRL's
    assistant_only_loss refuses it); True adds `{% generation %}` around each reply + EOS, which is
    what a user must do to get assistant-only loss from TRL."""
    import shutil

    from transformers import AutoTokenizer

    from mistral_align.chat.encoder import tokenizer_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(tokenizer_file("v3"), out_dir / "tokenizer.model")
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False,
    }))  # fmt: skip
    tok = AutoTokenizer.from_pretrained(out_dir)
    template = HUB_V03_TEMPLATE
    if not generation_markers:
        template = template.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    tok.chat_template = template
    return tok


# -- real-size runs on one GPU (scripts/bench_7b.py, scripts/measure_mixtral_memory.py) ------------------

ROOT = Path(__file__).resolve().parents[1]
# NVIDIA's datasheet figure for the H100 / H200 SXM, dense bf16 (no sparsity); H200.md's "about 990".
H200_BF16_DENSE_TFLOPS = 989.4
FLOPS_FORMULA = (
    "model FLOPs = p * (N_body*T + N_head*T_scored + L*d_attn*sum(s_i^2)): p = 6 for a training step "
    "(forward 2 + backward 4; QLoRA computes no weight gradients for the frozen base but recomputes the "
    "forward under gradient checkpointing, 6 again), 8 for DPO (the reference forward adds 2); N_body = the "
    "decoder layers' matmul weights (Mixtral: attention, router and the k routed experts), N_head = vocab x "
    "hidden (the LM head, at the T_scored positions the loss scores), T = real (non-pad) tokens, s_i = each "
    "sequence's length (causal: s^2/2 query-key pairs, for QK^T and AV), L layers, d_attn = heads x head_dim; "
    "padding, LoRA's own matmuls (<1%) and the embedding lookup are not counted"
)
TINY_SHAPES = {  # the CPU dry run's stand-ins: the same code path, 2 layers x 128
    "tiny": dict(type="mistral", hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=32768, num_local_experts=0),
    "tiny-mixtral": dict(type="mixtral", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=32000,
                         num_local_experts=4, num_experts_per_tok=2),
}  # fmt: skip


def bench_shape(name: str, model: str):
    """(ShapeConfig, tokenizer version) of the benchmark model: the `shape:` numbers of
    configs/model/<model>.yaml (e.g. mistral-7b-v0.3), or, for `name` tiny / tiny-mixtral, the CPU
    dry run's stand-in with that config's tokenizer."""
    from omegaconf import OmegaConf

    from mistral_align.schema.model import ShapeConfig

    node = OmegaConf.load(ROOT / "configs" / "model" / f"{model}.yaml")
    numbers = TINY_SHAPES[name] if name in TINY_SHAPES else OmegaConf.to_container(node.shape)
    return ShapeConfig(**numbers), node.tokenizer_version


def transformers_config(shape):
    """A transformers MistralConfig / MixtralConfig of `shape` (random init: inline_config's defaults)."""
    from mistral_align.model.inline import inline_config
    from mistral_align.schema.model import ArchitectureConfig, ModelConfig

    keys = ("type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "tie_word_embeddings", "num_experts_per_tok")  # fmt: skip
    arch = ArchitectureConfig(**{k: getattr(shape, k) for k in keys}, num_local_experts=shape.num_local_experts or 4)
    config = inline_config(SimpleNamespace(architecture=arch), shape.vocab_size)
    config.architectures = ["MixtralForCausalLM" if shape.type == "mixtral" else "MistralForCausalLM"]
    return config


class RandomTensor:
    """One checkpoint tensor, drawn when read (`t[...]`, as transformers reads a safetensors slice):
    norms 1, every other weight N(0, std), seeded by its name, made on `device` in `dtype`."""

    def __init__(self, name: str, shape, dtype, device, std: float = 0.02):
        self.name, self.shape, self.dtype, self.device, self.std = name, tuple(shape), dtype, device, std

    def get_shape(self):
        return list(self.shape)

    def __getitem__(self, index):
        import zlib

        import torch

        if "norm" in self.name:
            return torch.ones(self.shape, dtype=self.dtype, device=self.device)[index]
        gen = torch.Generator(device=self.device).manual_seed(zlib.crc32(self.name.encode()))
        return (torch.randn(self.shape, generator=gen, dtype=self.dtype, device=self.device) * self.std)[index]


def random_checkpoint(config, dtype, device) -> dict[str, RandomTensor]:
    """Every tensor of a checkpoint of `config` under the Hub's names (Mixtral: block_sparse_moe.experts.N.w1...),
    none of them drawn yet: a state dict that `from_pretrained(None, state_dict=...)` reads as it loads."""
    import torch
    from transformers import MistralForCausalLM

    from mistral_align.model.mixtral_unfused import UnfusedMixtralForCausalLM, hub_names

    cls = UnfusedMixtralForCausalLM if config.model_type == "mixtral" else MistralForCausalLM
    with torch.device("meta"):
        model = cls._from_config(config, dtype=dtype)
    names = hub_names(dict(model.state_dict())) if config.model_type == "mixtral" else dict(model.state_dict())
    return {k: RandomTensor(k, v.shape, dtype, device) for k, v in names.items()}


def write_random_base(config, folder: Path, dtype, device, shard_bytes: int = 2 * 2**30) -> Path:
    """A Hub-style folder (config.json, model-0000N-of-0000M.safetensors + index) of random weights,
    drawn on `device` in `dtype` one tensor at a time: what `build_model` then loads like a Hub model."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    for name, t in random_checkpoint(config, dtype, device).items():
        current[name] = t[...].cpu()
        size += current[name].numel() * current[name].element_size()
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    shards += [current] if current else []
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        total += sum(v.numel() * v.element_size() for v in shard.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))  # fmt: skip
    config.dtype = dtype
    config.to_json_file(str(folder / "config.json"))
    return folder


def scratch_dir(need_bytes: int) -> Path:
    """/dev/shm when it has room for `need_bytes` (and a margin), else the temporary directory."""
    import shutil

    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 1.2 * need_bytes:
        return Path(tempfile.mkdtemp(prefix="mistral_align_base_", dir=shm))
    return Path(tempfile.mkdtemp(prefix="mistral_align_base_"))


def flop_terms(shape) -> dict[str, int]:
    """The per-token and per-pair constants of FLOPS_FORMULA for `shape` (an estimate.Shape or ShapeConfig)."""
    h = shape.hidden_size
    hd = shape.head_dim or h // shape.num_attention_heads
    q, kv = shape.num_attention_heads * hd, shape.num_key_value_heads * hd
    attention = h * q + 2 * h * kv + q * h
    if shape.num_local_experts:
        mlp = shape.num_experts_per_tok * 3 * h * shape.intermediate_size + h * shape.num_local_experts
    else:
        mlp = 3 * h * shape.intermediate_size
    return {"n_body": shape.num_hidden_layers * (attention + mlp), "n_head": shape.vocab_size * h,
            "layers": shape.num_hidden_layers, "d_attn": q}  # fmt: skip


def model_flops(terms: dict[str, int], tokens: int, scored: int, sum_sq: int, reference_forward: bool = False) -> float:
    """FLOPS_FORMULA: the useful FLOPs of training on `tokens` real tokens (`scored` of them scored by
    the loss) in sequences whose squared lengths sum to `sum_sq`."""
    p = 8 if reference_forward else 6
    return float(p * (terms["n_body"] * tokens + terms["n_head"] * scored + terms["layers"] * terms["d_attn"] * sum_sq))


def mfu(flops: float, seconds: float, peak_tflops: float | None) -> float | None:
    return None if not peak_tflops or seconds <= 0 else flops / seconds / (peak_tflops * 1e12)


def matmul_tflops(device: str, n: int | None = None, iters: int = 10) -> float:
    """The measured dense matmul rate: bf16 n x n x n products on CUDA (n=8192, timed with events after 3
    warm-ups, random data), float32 on the CPU (n=512); TFLOP/s."""
    import torch

    cuda = device.startswith("cuda")
    n = n or (8192 if cuda else 512)
    dtype = torch.bfloat16 if cuda else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        seconds = time.perf_counter() - t
    return 2 * n**3 * iters / seconds / 1e12


def sequence_lengths(batch) -> list[int]:
    """The real sequences of a collated batch: padding-free rows (cu_seq_lens / restarting position_ids),
    else one per row of the attention mask, else every row whole."""
    import torch

    if batch.get("cu_seq_lens_q") is not None:
        return batch["cu_seq_lens_q"].diff().tolist()
    if batch.get("attention_mask") is not None:
        return batch["attention_mask"].sum(dim=1).tolist()
    if batch.get("position_ids") is not None:
        pos = batch["position_ids"].reshape(-1)
        starts = torch.cat([(pos == 0).nonzero().flatten(), torch.tensor([pos.numel()])])
        return starts.diff().tolist()
    ids = batch["input_ids"]
    return [ids.shape[1]] * ids.shape[0]


def sft_batch_counts(batch) -> dict[str, int]:
    """tokens (real), scored (labels the loss counts: each row's next-token labels that are not -100),
    sum_sq and sequences of an SFT batch, padded or padding-free."""
    lengths = sequence_lengths(batch)
    return {"tokens": sum(lengths), "scored": int((batch["labels"][..., 1:] != -100).sum()),
            "sum_sq": sum(n * n for n in lengths), "sequences": len(lengths)}  # fmt: skip


def dpo_batch_counts(batch) -> dict[str, int]:
    """The same for a DPO batch (TRL's padded [chosen; rejected] tensors, which our packed collator
    keeps beside the packed row), plus its pairs."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    return {"tokens": sum(lengths), "scored": int(batch["completion_mask"].sum()), "sum_sq": sum(n * n for n in lengths),
            "sequences": len(lengths), "pairs": len(lengths) // 2}  # fmt: skip


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class TimeBox(TrainerCallback):
    """Times `seconds` of training after `warmup` optimizer steps, then stops the trainer.

    The clock starts at the first step after the warm-up and stops at the end of the step that
    reaches `seconds` (or when the data runs out: `ran_out`), both after a device synchronisation;
    `timing` is True in between, for StepCounter."""

    def __init__(self, seconds: float, warmup: int, sync=_sync, clock=time.perf_counter):
        self.seconds, self.warmup, self.sync, self.clock = seconds, warmup, sync, clock
        self.timing, self.ran_out, self.t0, self.elapsed, self.steps = False, False, None, 0.0, 0
        self.warmup_seconds, self._t_start = 0.0, None

    def on_train_begin(self, args, state, control, **kwargs):
        self._t_start = self.clock()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.t0 is None and state.global_step >= self.warmup:
            self.sync()
            self.t0 = self.clock()
            self.warmup_seconds = self.t0 - self._t_start
            self.timing = True

    def on_step_end(self, args, state, control, **kwargs):
        if not self.timing:
            return
        self.steps += 1
        if self.clock() - self.t0 >= self.seconds:
            self._stop()
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self.timing:
            self._stop()
            self.ran_out = True

    def _stop(self):
        self.sync()
        self.elapsed = self.clock() - self.t0
        self.timing = False


class StepCounter:
    """Sums `measure(batch)` over the micro-batches the trainer trains on while `box.timing`: wraps
    the trainer's `training_step` (an instance attribute, which the Trainer's loop calls), so what
    is counted is exactly what went through a timed step, whatever the dataloader fetched ahead."""

    def __init__(self, trainer, box, measure):
        self.totals: dict[str, int] = {}
        inner = trainer.training_step

        def training_step(model, inputs, *args, **kwargs):
            if box.timing:
                for key, value in measure(inputs).items():
                    self.totals[key] = self.totals.get(key, 0) + value
            return inner(model, inputs, *args, **kwargs)

        trainer.training_step = training_step


def epoch_counts(trainer, measure) -> dict[str, int]:
    """`measure` summed over one pass of the trainer's training dataloader (no training): what one
    epoch trains on, for comparing contenders' trained tokens. Call it after training (the pass
    draws from the sampler's random generator)."""
    totals: dict[str, int] = {}
    for batch in trainer.get_train_dataloader():
        for key, value in measure(batch).items():
            totals[key] = totals.get(key, 0) + value
    return totals

