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
import time
from pathlib import Path

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
