"""The model card (README.md) pushed with an adapter: YAML front matter and a body a person reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mistral_align.chat.encoder import get_encoder
from mistral_align.chat.schema import Message, parse_sft_row
from mistral_align.names import REPO_ID, STAGES
from mistral_align.rundir.finished import RunSource
from mistral_align.schema.objectives import DEFAULT_BETA, NAMES, OWN_KEYS

_LOCAL_SUFFIX = (".jsonl", ".json", ".parquet", ".csv", ".txt")


def hub_datasets(config: dict, stage: str | None) -> list[str]:
    """Data sources of the run's stages that are Hub dataset ids (local files left out)."""
    out: list[str] = []
    stages = [s for s in ("sft", "dpo") if s in config] or []
    if stage == "sft":
        stages = [s for s in stages if s == "sft"]
    for s in stages:
        data = (config.get(s) or {}).get("data") or {}
        for src in list(data.get("train") or []) + list(data.get("eval") or []):
            path = str((src or {}).get("path", ""))
            if REPO_ID.fullmatch(path) and not path.endswith(_LOCAL_SUFFIX) and not Path(path).exists() and path not in out:
                out.append(path)
    return out


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(d, dict):
        rows = []
        for k, v in d.items():
            rows += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return rows
    if isinstance(d, (int, float)) and not isinstance(d, bool):
        return [(prefix, d)]
    return []


def metrics_table(summary: dict) -> str:
    rows = _flatten(summary)
    if not rows:
        return "_No final metrics were recorded (summary.json missing or empty)._\n"
    lines = ["| metric | value |", "|---|---|"]
    for k, v in rows:
        lines.append(f"| `{k}` | {v:.4g} |" if isinstance(v, float) else f"| `{k}` | {v} |")
    return "\n".join(lines) + "\n"


def _yaml_list(items: list[str]) -> str:
    return "".join(f"\n  - {json.dumps(i)}" for i in items) if items else " []"


def _pieces(enc, ids: list[int]) -> str:
    return " ".join(enc.piece(i).replace(" ", "▁").replace("\n", "\\n") for i in ids)


def prompt_format_section(version: str, tokenizer_file: Path | None = None) -> str:
    enc = get_encoder(version, tokenizer_file)
    conv = [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "Bye")]
    ids = enc.encode_prompt(conv)
    pieces = _pieces(enc, ids)
    return (
        f"Tokenizer `{version}` (mistral-common). Training and the shipped tokenizer build prompts exactly as "
        "mistral-common does; text a user types as `[INST]` stays text, never a control token. A conversation "
        "with a system prompt, one finished exchange and a new user turn, ready for generation:\n\n"
        "```python\n"
        f"{[{'role': m.role, 'content': m.content} for m in conv]!r}\n"
        "```\n\n"
        f"ids (BOS={enc.bos_id}, EOS={enc.eos_id}):\n\n```\n{ids}\n```\n\npieces:\n\n```\n{pieces}\n```\n\n"
        "Every assistant reply ends with EOS; BOS appears once. `tokenizer.apply_chat_template(messages, "
        "add_generation_prompt=True)` with the tokenizer in this repository gives these ids.\n"
    )


def data_has_tools(src: RunSource) -> bool:
    """Whether the run trained on rows with tools (the data report in manifest.json counts them)."""
    path = src.path / "manifest.json"
    if not path.is_file():
        return False
    manifest = json.loads(path.read_text(encoding="utf-8"))
    reports = [manifest.get("data")] + [(manifest.get(s) or {}).get("data") for s in STAGES]
    return any(((r or {}).get("report") or {}).get("tool_rows") for r in reports)


# The tool conversation the card shows: an OpenAI-shaped row, as the run's data spells them.
TOOL_EXAMPLE = {
    "tools": [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": "a1b2c3d4e", "type": "function",
                                              "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "a1b2c3d4e", "content": "{\"sky\": \"clear\", \"c\": 21}"},
        {"role": "assistant", "content": "Clear, 21 °C."},
    ],
}


def tool_format_section(version: str, tokenizer_file: Path | None = None) -> str:
    """How this model's tokenizer writes tools, a call and its result, with the ids (runs whose data has tools)."""
    enc = get_encoder(version, tokenizer_file)
    conv = parse_sft_row(TOOL_EXAMPLE, version=version)
    messages = list(conv.messages)
    ask = enc.encode_prompt(messages[:1], tools=conv.tools)
    call = enc.encode_reply(messages[1])
    answer = enc.encode_prompt(messages[:3], tools=conv.tools)[len(ask) + len(call):]
    return (
        "The training data had tool calls. A row, in the OpenAI shape the data used:\n\n"
        f"```json\n{json.dumps(TOOL_EXAMPLE, indent=1, ensure_ascii=False)}\n```\n\n"
        "The prompt up to the first reply (the tools are written before the last user message; v13: the first):\n\n"
        f"```\n{ask}\n```\n\n```\n{_pieces(enc, ask)}\n```\n\n"
        "The model's reply that calls the tool (trained, with its EOS):\n\n"
        f"```\n{call}\n```\n\n```\n{_pieces(enc, call)}\n```\n\n"
        "The tool's result, given back to the model (not trained):\n\n"
        f"```\n{answer}\n```\n\n```\n{_pieces(enc, answer)}\n```\n\n"
        "`tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)` with the tokenizer in "
        "this repository gives these prompt ids; `mistral-align chat RUN --tools tools.json` reads a generated "
        "call back with mistral-common's own decoding.\n"
    )


def objective_settings(stage_cfg: dict, objective: str) -> dict[str, Any]:
    """The preference stage's settings its objective reads (schema/objectives.py), as configured."""
    keys = ["beta"] + [k for k, (owners, _) in OWN_KEYS.items() if objective in owners]
    settings = {k: stage_cfg.get(k) for k in keys if k in stage_cfg}
    if settings.get("beta") is None and objective in DEFAULT_BETA:
        settings["beta"] = DEFAULT_BETA[objective]
    return settings


def render_card(src: RunSource, repo_id: str, base_id: str, license: str = "apache-2.0",
                stock_rank: int | None = None) -> str:
    """The model card. `stock_rank`: the rank of a Mixtral adapter converted to stock transformers'
    layout for the upload (hub/push.py), None where the adapter is uploaded as trained."""
    config = src.config
    stage = src.stage or "sft"
    quant = src.quant_mode
    peft = config.get("peft") or {}
    method = "full" if src.is_full else "qlora" if quant in ("nf4", "fp4") else "lora"
    st = config.get(stage) or {}
    # The preference stage's objective (runs from before dpo.objective existed trained DPO).
    objective = (st.get("objective") or "dpo") if stage == "dpo" else stage
    tags = ["trl", objective, method, "mistral-align"] + ([] if src.is_full else ["peft"])
    if stage == "dpo" and "sft" in config:
        tags.insert(1, "sft")
    datasets = hub_datasets(config, stage)
    summary_path = (src.stage_dir or src.path) / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    if not summary and (src.path / "summary.json").is_file():
        summary = json.loads((src.path / "summary.json").read_text(encoding="utf-8"))
    model = config.get("model") or {}
    front = (
        "---\n"
        f"base_model: {json.dumps(base_id)}\n"
        f"library_name: {'transformers' if src.is_full else 'peft'}\n"
        f"license: {license}\n"
        f"datasets:{_yaml_list(datasets)}\n"
        "pipeline_tag: text-generation\n"
        f"tags:{_yaml_list(tags)}\n"
        "---\n"
    )
    setup = [
        f"- base model: `{base_id}`" + (" (an inline random-init model kept with the run)" if src.is_inline else ""),
        f"- stage: `{stage}`" + (f", objective `{objective}` ({NAMES.get(objective, objective)})" if stage == "dpo" else "")
        + (" (after SFT)" if stage == "dpo" and "sft" in config else ""),
        ("- weights: every weight trained (full fine-tuning, peft none); this repository holds the whole model"
         if src.is_full else
         f"- adapter: LoRA r={peft.get('r')}, alpha={peft.get('alpha')}, dropout={peft.get('dropout')}, "
         f"targets {peft.get('target_modules')}"
         + (f"; uploaded in stock transformers' Mixtral layout (the fused experts through peft `target_parameters`, "
            f"rank {stock_rank}: the same function as the per-expert adapter trained)"
            if stock_rank else "")),
        f"- quantisation during training: `{quant}`"
        + (f" (double quant {src.quant.get('double_quant')}, compute dtype {src.quant.get('compute_dtype')})" if quant != "none" else ""),
        f"- tokenizer: mistral-common `{src.tokenizer_version}`",
    ]
    train = st.get("train") or {}
    if train:
        keys = ("lr", "epochs", "max_steps", "per_device_batch_size", "grad_accum", "packing")
        setup.append("- training: " + ", ".join(f"{k}={train[k]}" for k in keys if k in train))
    if stage == "dpo":
        settings = objective_settings(st, objective)
        setup.append(f"- {NAMES.get(objective, objective)}: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    if datasets:
        setup.append("- datasets: " + ", ".join(f"`{d}`" for d in datasets))
    usage = usage_snippet(repo_id, base_id, src.is_full)
    tool_calls = ("## Tool calls\n\n" + tool_format_section(src.tokenizer_version, src.tokenizer_file) + "\n"
                  if data_has_tools(src) else "")
    what = "A full fine-tune of" if src.is_full else "A LoRA adapter for"
    files = ("`model.safetensors` (or its shards and index), `config.json`, `generation_config.json`" if src.is_full
             else "`adapter_model.safetensors`, `adapter_config.json`")
    return (
        front
        + f"\n# {repo_id}\n\n{what} `{base_id}` trained with "
        f"mistral-align ({NAMES.get(objective, stage.upper())} stage, {method.upper()}).\n\n"
        "## Training set-up\n\n" + "\n".join(setup) + "\n\n"
        "## Final metrics\n\n" + metrics_table(summary) + "\n"
        "## Prompt format\n\n" + prompt_format_section(src.tokenizer_version, src.tokenizer_file) + "\n"
        + tool_calls
        + f"## Usage (plain {'transformers' if src.is_full else 'peft + transformers'})\n\n" + usage + "\n"
        f"Files: {files}, the tokenizer, the resolved training "
        "config (`config.yaml`), the loss plot (`loss.png`) and `summary.json`.\n"
    )


def usage_snippet(repo_id: str, base_id: str, full: bool) -> str:
    """Loading and prompting the upload with plain transformers (and peft, for an adapter)."""
    load = (f"model = AutoModelForCausalLM.from_pretrained({repo_id!r}, dtype=torch.bfloat16)\n" if full else
            f"base = AutoModelForCausalLM.from_pretrained({base_id!r}, dtype=torch.bfloat16)\n"
            f"model = PeftModel.from_pretrained(base, {repo_id!r})\n")
    return (
        "```python\n"
        "import torch\n"
        + ("" if full else "from peft import PeftModel\n")
        + "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        + load
        + f"tokenizer = AutoTokenizer.from_pretrained({repo_id!r})  # mistral-common backend, exact ids\n"
        'inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,\n'
        '                                       return_dict=True, return_tensors="pt")\n'
        "out = model.generate(**inputs, max_new_tokens=64, do_sample=False)\n"
        'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n'
        "```\n"
    )
